"""What happens around the optimiser steps of a :class:`~sparsedet.engine.trainer.Trainer`: each
hook gets the trainer at ``before_train``, ``after_step`` (after every optimiser step),
``after_train`` (when the plan is done, the budget spent or a signal stopped training; not after
an error) and ``close`` (always, last). Hooks run in list order; a hook that ends training calls
``trainer.request_stop``. Every process runs every hook, so collectives stay in step."""
from __future__ import annotations

import json
import signal
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from . import distributed
from ..filewrite import atomic_write, free_bytes, human_bytes
from .checkpoint import (CHECKPOINTS, folder_bytes, latest_checkpoint, link_checkpoint, prune_checkpoints, publish,
                         save_checkpoint, tensor_bytes)
from .evaluator import evaluate, format_metrics
from .interrupt import StopSignals
from .thresholds import MIN_SCORE, choose_threshold
from .trainer import Hook, Trainer  # Hook is defined beside the loop that calls it; re-exported here

if TYPE_CHECKING:
    from ..data.protocol import DetectionDataset

REFRESH_S = 1.0  # the progress bar's loss and steps/s describe at least this much training time


class EMAUpdate(Hook):
    """Moves the weight EMA (``trainer.ema``) towards the weights after each optimiser step."""

    def after_step(self, trainer: Trainer) -> None:
        trainer.ema.update(trainer.model)


class StepPlan(Hook):
    """Stops training when ``trainer.plan`` is done: its steps taken or its time budget spent (the
    longest training time of any process), with a line that says which."""

    def before_train(self, trainer: Trainer) -> None:
        self._check(trainer, trainer.trained_seconds)  # a resumed run may have finished already

    def after_step(self, trainer: Trainer) -> None:
        if trainer.plan.budget_s:
            # Every process takes the longest clock, so that the budget-driven lr schedule and the
            # stop agree across processes.
            trainer.trained_seconds = distributed.max_over_ranks(trainer.trained_seconds, trainer.ctx, trainer.device)
        self._check(trainer, trainer.trained_seconds)

    def _check(self, trainer: Trainer, elapsed: float) -> None:
        reason = trainer.plan.stop_reason(trainer.step, elapsed, trainer.config.train)
        if reason is not None:
            trainer.request_stop(reason)


class SpeedWatch(Hook):
    """Says once when training has slowed to under a third of its first minute's steps/s (over a
    later ``window_s`` of training time): the machine is busy, so a time budget buys fewer steps.
    ``slowdown`` keeps (first minute's steps/s, the slow window's) for the run's end message."""

    def __init__(self, first_s: float = 60.0, window_s: float = 30.0, ratio: float = 1 / 3):
        self.first_s, self.window_s, self.ratio = first_s, window_s, ratio
        self.slowdown: tuple[float, float] | None = None

    def before_train(self, trainer: Trainer) -> None:
        self._start = self._window = (trainer.step, trainer.trained_seconds)
        self._first_rate: float | None = None

    def after_step(self, trainer: Trainer) -> None:
        if self.slowdown is not None:
            return
        now = (trainer.step, trainer.trained_seconds)
        if self._first_rate is None:
            if now[1] - self._start[1] >= self.first_s:
                self._first_rate, self._window = _rate(self._start, now), now
            return
        if now[1] - self._window[1] < self.window_s:
            return
        rate, self._window = _rate(self._window, now), now
        if rate < self.ratio * self._first_rate:
            self.slowdown = (self._first_rate, rate)
            trainer.log.say(f"warning: training slowed to {rate:.2f} steps/s at step {trainer.step}, under a third "
                            f"of its first minute's {self._first_rate:.2f}: the machine is busy (other processes "
                            "share its cores), so a time budget (train.minutes) buys fewer steps")


def _rate(start: tuple[int, float], end: tuple[int, float]) -> float:
    """Steps per second between two (step, trained seconds) points."""
    return (end[0] - start[0]) / max(end[1] - start[1], 1e-9)


class LogSteps(Hook):
    """Prints the run's summary, then logs steps: every step's lr and loss terms (process 0's, already
    on the host) go to the run log's steps.csv, written at log time; every ``train.log_every`` steps
    (and step 1) the loss terms averaged over processes go to the run log, and, without a progress
    bar, to a plain line.
    The progress bar counts steps (up to the plan's total when there is no time budget); its postfix (loss and steps/s of process 0,
    lr, and the budget used and left) describes the last ``REFRESH_S`` s of training or more."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def before_train(self, trainer: Trainer) -> None:
        trainer.log.say(trainer.summary())
        # Under a time budget the last step is unknown: the bar counts steps, its postfix the budget.
        total = None if trainer.plan.budget_s else trainer.plan.total_steps
        count_only = "{desc}: {n_fmt} steps [{elapsed}{postfix}]"  # the postfix has the rate
        self.bar = tqdm(total=total, initial=trainer.step, desc="train", unit="step",
                        bar_format=count_only if total is None else None,
                        disable=not trainer.log.progress, dynamic_ncols=True, miniters=1, mininterval=0.5)
        self._window = (trainer.step, trainer.trained_seconds, [])
        self._shown = False  # the postfix, from the first step on

    def after_step(self, trainer: Trainer) -> None:
        trainer.log.record_step({"step": trainer.step, "lr": trainer.optimizer.param_groups[-1]["lr"],
                                 **trainer.losses})
        if trainer.log.progress:
            self._refresh(trainer)
        self.bar.update(1)
        every = trainer.config.train.log_every
        if trainer.step % every == 0 or trainer.step == 1:
            self._log(trainer)

    def after_train(self, trainer: Trainer) -> None:
        trainer.log.flush()  # the hooks after this one read the whole of steps.csv
        self.close(trainer)

    def close(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _refresh(self, trainer: Trainer) -> None:
        step0, seconds0, losses = self._window
        losses.append(trainer.losses["loss"])
        seconds = trainer.trained_seconds - seconds0
        if seconds < REFRESH_S and self._shown:
            return
        lr = trainer.optimizer.param_groups[-1]["lr"]
        rate = (trainer.step - step0) / max(seconds, 1e-6)
        postfix = {"loss": f"{sum(losses) / len(losses):.3f}", "steps/s": f"{rate:.2f}",
                   "lr": f"{lr:.1e}"}
        minutes = trainer.config.train.minutes
        if minutes:
            used = trainer.trained_seconds / 60
            postfix["budget"] = f"{used:.1f} min used, {max(minutes - used, 0.0):.1f} left"
        self.bar.set_postfix(postfix, refresh=False)
        self._window, self._shown = (trainer.step, trainer.trained_seconds, []), True

    def _log(self, trainer: Trainer) -> None:
        values = distributed.mean_over_ranks(trainer.losses, trainer.ctx, trainer.device)
        lr = trainer.optimizer.param_groups[-1]["lr"]
        if not trainer.ctx.is_main:
            return
        if not trainer.log.progress:
            minutes, total = trainer.config.train.minutes, trainer.plan.total_steps
            terms = "  ".join(f"{k.removeprefix('loss_')} {v:.4f}" for k, v in values.items())
            trainer.log.say(f"step {trainer.step}" + ("" if minutes else f"/{total}") + f"  epoch {trainer.epoch}  "
                            f"{terms}  lr {lr:.1e}  {trainer.trained_seconds:.0f}"
                            + (f"/{minutes * 60:.0f}" if minutes else "") + " s")
        trainer.log.write({"step": trainer.step, "epoch": trainer.epoch, "time_s": round(trainer.trained_seconds, 3),
                           "lr": lr, **values})


class Evaluate(Hook):
    """Evaluates on ``val_set`` (and the EMA weights too) every ``train.eval_every`` steps and at the
    end: the run log, ``metrics.json`` and a table for the user; ``trainer.metrics`` and
    ``trainer.evaluated_step``. The final evaluation's detections also choose the run's
    score threshold (``engine.thresholds``), which the checkpoint saved after it records in
    ``model.score_threshold``. Every process takes part."""

    def __init__(self, val_set: DetectionDataset):
        self.val_set = val_set

    def before_train(self, trainer: Trainer) -> None:
        self.every = trainer.plan.eval_interval(trainer.config.train.eval_every)

    def after_step(self, trainer: Trainer) -> None:
        if trainer.stop_reason is None and trainer.step % self.every == 0:
            self.run(trainer)

    def after_train(self, trainer: Trainer) -> None:
        if trainer.stop_signal is None:
            self.record_threshold(trainer, self.run(trainer))

    def run(self, trainer: Trainer) -> list[dict]:
        """Evaluate now; returns the model's val detections (COCO results format)."""
        bs, ctx, ema = trainer.config.train.batch_size, trainer.ctx, trainer.ema
        distributed.sync_buffers(trainer.model, ctx)
        if ema is not None:
            distributed.sync_buffers(ema.module, ctx)
        metrics, results = evaluate(trainer.model, self.val_set, bs, trainer.log.progress, ctx)
        record = {"step": trainer.step, "epoch": trainer.epoch, "time_s": round(trainer.trained_seconds, 3),
                  "eval": _summary(metrics)}
        if ema is not None:
            ema_metrics, _ = evaluate(ema.module, self.val_set, bs, False, ctx)
            metrics["ema"] = record["eval_ema"] = _summary(ema_metrics)
        if ctx.is_main:
            trainer.log.write(record)
            payload = json.dumps({"step": trainer.step, **metrics}, indent=2)
            atomic_write(trainer.out_dir / "metrics.json", lambda p: Path(p).write_text(payload),
                         f"metrics of step {trainer.step} (metrics.json)")
            trainer.log.say(format_metrics(metrics))
        trainer.metrics, trainer.evaluated_step = metrics, trainer.step
        return results

    def record_threshold(self, trainer: Trainer, results: list[dict]) -> None:
        """Every process chooses the same threshold from the same gathered detections."""
        choice = choose_threshold(self.val_set.coco, results)
        trainer.config.model.score_threshold = None if choice is None else choice.threshold
        trainer.log.say(f"recorded the {choice.describe()}; predict, viz, videos and eval's confusion matrix use "
                        "it unless given a threshold" if choice is not None else
                        f"recorded no score threshold: no val detection scored {MIN_SCORE} or more matched a "
                        "ground-truth box; predict and the others use their defaults")


class Checkpoints(Hook):
    """Resumable checkpoints (``checkpoints/step_N``, whose weights become the run folder's) every
    ``every`` steps, or after each evaluation when ``every`` is 0, and at the end, also when a signal
    stopped training; ``best_step_N`` when an evaluation's AP is the best so far (hard links to
    ``step_N`` when that step has one). The newest ``keep`` step checkpoints and the newest best stay.
    ``best`` ({"AP", "step"} of the best evaluation, None before one) is this hook's part of the
    training state. Every process takes part (RNG states are gathered); process 0 writes."""

    state_key = "checkpoints"

    def __init__(self, every: int, keep: int):
        self.every, self.keep = every, keep
        self.best: dict | None = None

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = state["best"]

    def before_train(self, trainer: Trainer) -> None:
        self._saved_step: int | None = None  # the newest step checkpoint written by this run
        self._warned_space = False

    def after_step(self, trainer: Trainer) -> None:
        if trainer.stop_reason is not None:
            return  # after_train saves the last step
        new_best = self._new_best(trainer)
        evaluated = trainer.evaluated_step == trainer.step
        if trainer.step % self.every == 0 if self.every else evaluated:
            self.save(trainer)
        if new_best:
            self.save(trainer, best=True)

    def after_train(self, trainer: Trainer) -> None:
        new_best = self._new_best(trainer)
        if trainer.stop_signal is None or self._saved_step != trainer.step:
            self.save(trainer)
        if new_best:
            self.save(trainer, best=True)

    def _new_best(self, trainer: Trainer) -> bool:
        """Whether an evaluation of this step has the best AP so far (then it becomes ``best``)."""
        if trainer.evaluated_step != trainer.step:
            return False
        ap = trainer.metrics["AP"]
        if self.best is not None and (self.best["step"] == trainer.step or not ap > self.best["AP"]):
            return False
        self.best = {"AP": ap, "step": trainer.step}
        return True

    def save(self, trainer: Trainer, best: bool = False) -> None:
        link = best and self._saved_step == trainer.step  # the step's own checkpoint: share its files
        state = None if link else trainer.train_state()  # every process takes part (RNG states gathered)
        if trainer.ctx.is_main:
            name = f"{'best_' if best else ''}step_{trainer.step:08d}"
            final = trainer.stop_reason is not None and not best
            what = f"{'final weights and ' if final else 'best ' if best else ''}checkpoint step {trainer.step}"
            if link:
                link_checkpoint(trainer.out_dir / CHECKPOINTS / f"step_{trainer.step:08d}", name)
            else:
                ema = trainer.ema.module.state_dict() if trainer.ema is not None else None
                weights = trainer.model.state_dict()
                needed = self._check_space(trainer, (weights, ema, state))
                checkpoint = save_checkpoint(trainer.out_dir, name, weights, trainer.config, state, ema, what, needed)
                if not best:
                    publish(checkpoint, trainer.out_dir, "final weights" if final else "run folder's weights")
            prune_checkpoints(trainer.out_dir, self.keep, upto=trainer.step)
        if not best:
            self._saved_step = trainer.step
        distributed.barrier(trainer.ctx)

    def _check_space(self, trainer: Trainer, parts: tuple) -> int:
        """The bytes the next checkpoint needs (the newest one's size, else its tensors'); warns once
        when the run's file system has less free, so that the user can act before it fails."""
        newest = latest_checkpoint(trainer.out_dir)
        needed = folder_bytes(newest) if newest is not None else tensor_bytes(parts)
        free = free_bytes(trainer.out_dir)
        if free is not None and free < needed and not self._warned_space:
            self._warned_space = True
            warnings.warn(f"{human_bytes(free)} free on the file system of {trainer.out_dir}, less than the "
                          f"{human_bytes(needed)} a checkpoint takes: the next one will likely fail (the previous "
                          "one stays whole); free some space now")
        return needed

class StopOnSignal(Hook):
    """SIGINT (Ctrl-C) or SIGTERM reaching any process stops training after the current step (and
    the hooks before this one): ``after_train`` hooks save a resumable checkpoint, then the trainer
    raises :class:`~sparsedet.engine.interrupt.TrainingInterrupted`. A second signal quits at once
    (``KeyboardInterrupt``), saving nothing more."""

    def __init__(self) -> None:
        self._signals: StopSignals | None = None

    def before_train(self, trainer: Trainer) -> None:
        self._signals = StopSignals(announce=trainer.ctx.is_main).__enter__()

    def after_step(self, trainer: Trainer) -> None:
        signum = self._signals.signum
        if not distributed.all_agree(signum is None, trainer.ctx, trainer.device):
            trainer.request_stop(f"stopped at step {trainer.step} by a signal", signum=signum or signal.SIGTERM)

    def close(self, trainer: Trainer) -> None:
        if self._signals is not None:
            self._signals.__exit__(None, None, None)
            self._signals = None


def _summary(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in ("per_class", "ema")}
