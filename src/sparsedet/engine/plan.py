"""How long a run trains, and why it stopped."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import TrainConfig


@dataclass(frozen=True)
class Plan:
    """``total_steps`` optimiser steps (``train.max_steps``, or ``train.epochs`` x
    ``steps_per_epoch``) or ``budget_s`` seconds of training (``train.minutes``; 0: no budget),
    whichever ends first. Evaluation and checkpoint time do not count against the budget."""

    total_steps: int
    steps_per_epoch: int
    budget_s: float

    @classmethod
    def of(cls, t: TrainConfig, batches_per_epoch: int) -> "Plan":
        per_epoch = max(1, batches_per_epoch // t.accumulate)
        total = t.max_steps if t.max_steps > 0 else t.epochs * per_epoch
        return cls(total, per_epoch, t.minutes * 60.0)

    def eval_interval(self, eval_every: int) -> int:
        """Steps between evaluations: ``eval_every``, or one epoch (0), or never before the end (-1)."""
        if eval_every == 0:
            return self.steps_per_epoch
        return eval_every if eval_every > 0 else self.total_steps + 1

    def stop_reason(self, step: int, trained_s: float, t: TrainConfig) -> str | None:
        """One line saying why training stops after ``step`` steps and ``trained_s`` seconds of
        training, or None while it goes on."""
        if step >= self.total_steps:
            done = (f"{_count(t.max_steps, 'step')} done (train.max_steps)" if t.max_steps > 0
                    else f"{_count(t.epochs, 'epoch')} done (train.epochs)")
            budget = f" after {trained_s / 60:.1f} of {t.minutes:g} min" if self.budget_s else ""
            return f"stopped at step {step}: {done}{budget}"
        if self.budget_s and trained_s >= self.budget_s:
            return f"stopped at step {step} of {self.total_steps}: the {t.minutes:g} min budget (train.minutes) ran out"
        return None


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
