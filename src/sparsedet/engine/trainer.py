"""The training loop: optimiser steps (:meth:`Trainer.run_step`: forward, losses, backward with
gradient accumulation, DDP, mixed precision, non-finite-loss guard, clipping) and the hooks around
them (``engine.hooks``: EMA, plan and time budget, logging, evaluation, checkpoints, stop signals).
``engine.build.build_trainer`` makes the parts and the default hooks."""
from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch.utils.data import DataLoader

from ..config import Config
from ..data.protocol import DetectionDataset
from ..data.sampler import DataPosition, GroupedBatchSampler
from ..errors import SparsedetError
from ..filewrite import WriteFailed
from ..losses.criterion import SetCriterion
from . import distributed
from .checkpoint import latest_checkpoint, load_run, load_train_state, newest_intact_checkpoint
from .interrupt import TrainingInterrupted, resume_command
from .optim import WeightEMA, lr_factor
from .plan import Plan
from .precision import NAMES, LossScaler, autocast, outputs_in_fp32
from .rng import RandomStreams
from .runlog import RunLog

# The trainer's own part of a checkpoint's training state (its "trainer" entry).
COUNTERS = ("step", "trained_seconds", "skipped_images")


class Stateful(Protocol):
    """A part of a checkpoint's training state: what it needs to continue exactly, as tensors and
    plain containers (``torch.load(weights_only=True)`` reads them back)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Hook:
    """What runs around the steps (``engine.hooks`` holds the default ones): a no-op at every event;
    subclasses override the events they need. A hook that keeps state across a resume names its
    entry of the training state (``state_key``) and overrides ``state_dict`` / ``load_state_dict``."""

    state_key: str | None = None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def before_train(self, trainer: Trainer) -> None:
        pass

    def after_step(self, trainer: Trainer) -> None:
        pass

    def after_train(self, trainer: Trainer) -> None:
        pass

    def close(self, trainer: Trainer) -> None:
        pass


@dataclass(eq=False, repr=False)  # a repr would print the whole model
class Trainer:
    """Trains ``model`` (a ``sparsedet.Detector``) with the given parts and writes the run folder
    ``out_dir``: ``model.safetensors`` + ``config.json`` (+ ``ema.safetensors``), ``metrics.json``
    (last evaluation), ``metrics.jsonl`` (one object per logged step and per evaluation),
    ``steps.csv`` (every step's lr and loss terms) and ``checkpoints/`` (see ``engine.checkpoint``).
    Under ``torchrun`` every process builds the same Trainer; process 0 writes. ``train.batch_size``
    is per process.

    ``net`` is ``model`` or its DDP wrapper; ``loader`` draws its batches through ``sampler``
    (which :meth:`fit` positions at each epoch) and its own generator, never the global one
    (dropout and denoising draw from that; exact resume depends on it)."""

    config: Config
    model: torch.nn.Module
    net: torch.nn.Module
    criterion: SetCriterion
    optimizer: torch.optim.Optimizer
    scaler: LossScaler
    autocast_dtype: torch.dtype | None
    ema: WeightEMA | None
    sampler: GroupedBatchSampler
    loader: DataLoader
    train_set: DetectionDataset
    val_set: DetectionDataset | None
    log: RunLog
    out_dir: Path
    ctx: distributed.Context
    device: torch.device
    hooks: list[Hook] = field(default_factory=list)
    origin: str = ""  # where the model and the schedule come from (the summary's "origin" line)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.plan = Plan.of(self.config.train, len(self.sampler))
        self.step = 0
        self.trained_seconds = 0.0          # evaluation and checkpoint time do not count
        self.skipped_images = 0
        self.position = DataPosition()      # the epoch and batch the data have reached
        self.rng = RandomStreams(self.ctx, self.config.train.seed, lambda: self.step)
        self.metrics: dict = {}             # the last evaluation
        self.evaluated_step: int | None = None
        self.losses: dict[str, float] = {}  # the last step's loss terms (this process)
        self.stop_reason: str | None = None
        self.stop_signal: int | None = None
        self.size_mismatches: dict[int, str] = {}  # image id -> how its file disagrees with the json's size
        self._mismatches_warned = 0
        self._images_readable = False
        self._resumed = False

    # ---------------------------------------------------------------- the loop
    def fit(self) -> dict:
        """Train until a hook stops training (the plan done, the budget spent, a signal); returns
        the last evaluation's metrics. Stopped by SIGINT or SIGTERM, it raises
        :class:`TrainingInterrupted` after the hooks saved a resumable checkpoint."""
        failed = True
        try:
            self._claim_run_folder()
            for hook in self.hooks:
                hook.before_train(self)
            self.model.train()
            batches = self._batches()
            clock = time.perf_counter()
            while self.stop_reason is None:
                self.losses = self.run_step(batches)
                self.trained_seconds += time.perf_counter() - clock
                for hook in self.hooks:
                    hook.after_step(self)
                clock = time.perf_counter()
            batches.close()
            self._warn_data_problems()
            if self.stop_signal is None:
                self.log.say(self.stop_reason)
            for hook in self.hooks:
                hook.after_train(self)
            failed = False
        except WriteFailed as err:  # the last checkpoint is whole (written into a temporary folder)
            raise err.advise(self._fallback()) from err.__cause__
        finally:
            for hook in self.hooks:
                hook.close(self)
            # After an error the disk may still be full: the first error is the one to show.
            with contextlib.suppress(WriteFailed) if failed else contextlib.nullcontext():
                self.log.close()
        if self.stop_signal is not None:
            raise TrainingInterrupted(self.stop_signal, self.step, self.out_dir)
        return self.metrics

    def request_stop(self, reason: str, signum: int | None = None) -> None:
        """End training after this step's hooks. The first reason stays, but a signal outranks the
        plan: it saves instead of evaluating at the end, then raises."""
        if self.stop_reason is None or (signum is not None and self.stop_signal is None):
            self.stop_reason, self.stop_signal = reason, signum

    def run_step(self, batches: Iterator[tuple]) -> dict[str, float]:
        """One optimiser step over ``train.accumulate`` micro-batches from ``batches``: forward,
        losses, backward (gradients synchronised across processes on the last micro-batch only),
        clipping, the optimiser and loss-scaler steps. When some process's loss is not finite, the
        step's gradients are dropped and it starts over on the next batches; ``train.max_nonfinite``
        such in a row stop the run. Returns the step's loss terms, averaged over its micro-batches."""
        t = self.config.train
        bad_in_row = 0
        while True:
            self._set_lr()
            sums: dict[str, float] = {}
            for micro in range(t.accumulate):
                batch, targets = next(batches)
                terms = self._forward_backward(batch, targets, last=micro == t.accumulate - 1)
                if terms is None:
                    break
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v / t.accumulate
            else:
                self._optimizer_step()
                return sums
            bad_in_row += 1
            warnings.warn(f"step {self.step + 1}: non-finite loss, step skipped")
            if bad_in_row >= t.max_nonfinite:
                raise SparsedetError(
                    f"{bad_in_row} non-finite losses in a row at step {self.step + 1}; lower train.lr, try "
                    f"train.precision=fp32 or check the data (sparsedet check-data). The last good "
                    f"checkpoint is in {self.out_dir / 'checkpoints'}")

    def _claim_run_folder(self) -> None:
        """A new run refuses a folder that holds another run's checkpoints, and starts a new log."""
        if not self._resumed:
            fresh = not self.ctx.is_main or latest_checkpoint(self.out_dir) is None
            if not distributed.all_agree(fresh, self.ctx, self.device):
                raise SparsedetError(f"{self.out_dir} already holds a run's checkpoints; continue it with "
                                     "`sparsedet train --resume RUN` or train into another folder")
        self.log.start(self.step, self._resumed)

    def _batches(self) -> Iterator[tuple]:
        """(batch, targets) for ever, epoch after epoch from the current data position, counting
        unreadable images; a batch in which some process could read no image is skipped by all."""
        while True:
            self.sampler.set_epoch(self.position.epoch, self.position.batch)
            for batch, targets, dropped in self.loader:
                self.position.batch += 1
                self.skipped_images += dropped
                if not distributed.all_agree(batch is not None, self.ctx, self.device):
                    self._require_readable_images()  # an image root where nothing reads never fills a batch
                    continue
                for target in targets:
                    if "size_mismatch" in target:
                        self.size_mismatches.setdefault(target["image_id"], target["size_mismatch"])
                yield batch, targets
            self.position.epoch, self.position.batch = self.position.epoch + 1, 0
            self._warn_size_mismatches()

    def _set_lr(self) -> None:
        budget = self.plan.budget_s
        progress = max(self.step / self.plan.total_steps, self.trained_seconds / budget if budget else 0.0)
        factor = lr_factor(self.step, progress, self.config.train)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor

    def _forward_backward(self, batch, targets, last: bool) -> dict[str, float] | None:
        """One micro-batch: forward, losses, backward (gradients synchronised on the last one).
        Returns the logged loss terms, or None (gradients dropped) when some process's loss is not finite."""
        t = self.config.train
        batch = batch.to(self.device, non_blocking=True)
        targets = [{k: x[k].to(self.device, non_blocking=True) for k in ("labels", "boxes")} for x in targets]
        sync = contextlib.nullcontext() if last or not self.ctx.distributed else self.net.no_sync()
        with sync:
            with autocast(self.autocast_dtype, self.device):
                out = self.net(batch, targets)
            terms = self.criterion(outputs_in_fp32(out), targets)
            loss = self.criterion.total(terms)
            if not distributed.all_agree(bool(torch.isfinite(loss)), self.ctx, self.device):
                self.optimizer.zero_grad(set_to_none=True)
                return None
            self.scaler.scale(loss / t.accumulate).backward()
        logged = {k: v.item() for k, v in terms.items() if k in ("loss_cls", "loss_bbox", "loss_giou", "loss_select")}
        return {"loss": loss.item(), **logged}

    def _optimizer_step(self) -> None:
        t = self.config.train
        if t.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

    # ---------------------------------------------------------------- data problems
    def _require_readable_images(self) -> None:
        """After a batch without one readable image: stop (SparsedetError naming the image root) unless
        some training image can be read at all. Every process takes part; the check runs once."""
        if not self._images_readable:
            self.train_set.require_readable()
            self._images_readable = True

    def _warn_data_problems(self) -> None:
        if self.skipped_images and self.ctx.is_main:
            warnings.warn(f"skipped {self.skipped_images} unreadable images during training")
        self._warn_size_mismatches()

    def _warn_size_mismatches(self) -> None:
        """One counted warning (at an epoch's end and the end of training) when new images whose file
        disagrees with the json's width/height were met: their boxes were clamped to the file."""
        count = len(self.size_mismatches)
        if count > self._mismatches_warned and self.ctx.is_main:
            example = next(iter(self.size_mismatches.values()))
            warnings.warn(f"{count} training image(s) differ in size from their json width/height, e.g. {example}; "
                          "their boxes were clamped to the file (boxes outside it dropped). Fix the json's sizes "
                          "(`sparsedet check-data` lists them).")
        self._mismatches_warned = count

    # ---------------------------------------------------------------- summary, state and resume
    def summary(self) -> str:
        """What this run found and will do: images and boxes per split, classes, device, precision,
        where the model and schedule come from, length and why, evaluation and checkpoint intervals."""
        t, world, plan = self.config.train, self.ctx.world_size, self.plan
        lines = []
        for split, data in (("train", self.train_set), ("val", self.val_set)):
            lines.append(f"{split:9s}{len(data)} images, {data.num_boxes} boxes ({data.source})" if data is not None
                         else f"{split:9s}none: no evaluation")
        names = ", ".join(self.train_set.classes[:10]) + (", ..." if len(self.train_set.classes) > 10 else "")
        lines.append(f"{'classes':9s}{len(self.train_set.classes)}: {names}")
        precision = NAMES[self.autocast_dtype] + (" with loss scaling" if self.scaler.is_enabled() else "")
        group = f" ({distributed.backend()})" if self.ctx.distributed else ""
        lines.append(f"{'device':9s}{self.device} x {world} process{'es' if world > 1 else ''}{group}, {precision} "
                     f"(train.precision={t.precision}), batch {t.batch_size} per process x {t.accumulate} "
                     "accumulated")
        if self.origin:
            lines.append(f"{'origin':9s}{self.origin}")
        if t.max_steps > 0:
            text = f"{plan.total_steps} steps (train.max_steps={t.max_steps})"
        else:
            text = (f"{plan.total_steps} steps = {t.epochs} epochs (train.epochs, train.max_steps=0) x "
                    f"{plan.steps_per_epoch} steps ({len(self.train_set)} images / "
                    f"{t.batch_size * world * t.accumulate} per step)")
        if t.minutes:
            text = f"at most {text} or {t.minutes:g} min of training (train.minutes), whichever ends first"
        if self.step:
            text += f"; resuming at step {self.step}"
        lines.append(f"{'plan':9s}{text}")
        every = plan.eval_interval(t.eval_every)
        evals = ("none" if self.val_set is None else "at the end" if every > plan.total_steps
                 else f"every {every} steps and at the end")
        saves = (f"every {t.checkpoint_every} steps and " if t.checkpoint_every
                 else "at each evaluation and " if self.val_set is not None and every <= plan.total_steps else "")
        lines.append(f"{'writes':9s}{self.out_dir}: evaluation {evals} (train.eval_every={t.eval_every}), "
                     f"checkpoints {saves}at the end, a log line every {t.log_every} step(s)")
        return "\n".join(lines)

    @property
    def epoch(self) -> int:
        return self.position.epoch

    @property
    def batch_in_epoch(self) -> int:
        return self.position.batch

    def state_dict(self) -> dict:
        """The trainer's own counters: its entry ("trainer") of the training state."""
        return {key: getattr(self, key) for key in COUNTERS}

    def load_state_dict(self, state: dict) -> None:
        for key in COUNTERS:
            setattr(self, key, state[key])

    def state_parts(self) -> dict[str, Stateful]:
        """The parts of a checkpoint's training state by name, in the order they load: the trainer's
        counters first (the others may read the step), the data position, optimiser, loss scaler,
        random streams and EMA, then every hook that keeps state (``Hook.state_key``)."""
        parts: dict[str, Stateful] = {"trainer": self, "data": self.position, "optimizer": self.optimizer,
                                      "scaler": self.scaler, "rng": self.rng}
        if self.ema is not None:
            parts["ema"] = self.ema
        for hook in self.hooks:
            if hook.state_key is not None:
                if hook.state_key in parts:
                    raise SparsedetError(f"{type(hook).__name__}.state_key {hook.state_key!r} is already the name "
                                         "of another part of the training state; give the hook another one")
                parts[hook.state_key] = hook
        return parts

    def train_state(self) -> dict:
        """What a checkpoint needs to continue exactly: every part's ``state_dict`` under its name
        (:meth:`state_parts`). Every process takes part (the random streams are gathered)."""
        return {name: part.state_dict() for name, part in self.state_parts().items()}

    def restore(self, state: dict) -> None:
        """Give every part its entry of ``state`` (a :meth:`train_state`); a part the checkpoint has
        no entry for (a hook added since, an EMA turned on) starts as it is."""
        for name, part in self.state_parts().items():
            if name in state:
                part.load_state_dict(state[name])

    def resume(self, checkpoint: str | Path | None = None) -> Path:
        """Continue from ``checkpoint`` (default: the newest in ``out_dir``) exactly where it stopped:
        weights, EMA, and every part of the training state (:meth:`restore`)."""
        path = Path(checkpoint) if checkpoint else latest_checkpoint(self.out_dir)
        if path is None:
            raise SparsedetError(f"{self.out_dir} has no checkpoint to resume from (checkpoints/step_*)")
        try:
            state = load_train_state(path)
            weights = load_run(path)[1]
        except SparsedetError as err:
            raise SparsedetError(f"{err}. {self._fallback(path)}") from None
        self.model.load_state_dict(_on(weights, self.device))
        self.restore(state)
        if self.ema is not None:
            try:
                self.ema.module.load_state_dict(_on(load_run(path, ema=True)[1], self.device))
            except SparsedetError:
                warnings.warn(f"{path} holds no EMA weights; the EMA starts from the current weights")
                self.ema = WeightEMA(self.model, self.config.train.ema_decay)
        self._resumed = True
        return path

    def _fallback(self, unreadable: Path | None = None) -> str:
        """What to run after a fault: resume from the newest checkpoint whose files all read (other
        than ``unreadable``), or start again when there is none."""
        found = newest_intact_checkpoint(self.out_dir, other_than=unreadable)
        if found is None and unreadable is None and latest_checkpoint(self.out_dir) is None:
            return "No checkpoint was saved yet: start the run again."
        if found is None:
            return (f"{self.out_dir / 'checkpoints'} holds no other intact checkpoint: start the run again (into "
                    "a new --out, or after deleting the checkpoints).")
        target = self.out_dir if unreadable is None and found == latest_checkpoint(self.out_dir) else found
        step = load_train_state(found)["trainer"]["step"]
        return (f"The newest intact checkpoint is {found} (step {step}); continue from it with:\n  "
                f"{resume_command(target, self.ctx.distributed)}")


def _on(state: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in state.items()}
