"""The training loop: one process or many under ``torchrun`` (DDP), mixed precision, gradient
accumulation, EMA, the official optimiser groups and schedules, atomic resumable checkpoints and
exact resume, non-finite-loss guard."""
from __future__ import annotations

import contextlib
import json
import signal
import time
import warnings
from functools import partial
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import Config, validate
from ..data.batch import collate
from ..data.coco import CocoDetection
from ..data.sampler import GroupedBatchSampler, SeededSamples, aspect_groups
from ..errors import SparsedetError
from ..losses.criterion import SetCriterion
from . import distributed
from .checkpoint import (atomic_write, latest_checkpoint, load_run, load_train_state, prune_checkpoints, publish,
                         save_checkpoint)
from .evaluator import evaluate, format_metrics
from .interrupt import StopSignals, TrainingInterrupted, ignore_stop_signals
from .optim import WeightEMA, lr_factor, make_optimizer
from .precision import NAMES, autocast, outputs_in_fp32, resolve_precision
from .rng import rng_state, seed_everything, set_rng_state

METRICS_LOG = "metrics.jsonl"


def set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)


class Trainer:
    """Trains ``model`` (a ``sparsedet.Detector``) and writes the run folder ``out_dir``:
    ``model.safetensors`` + ``config.json`` (+ ``ema.safetensors``), ``metrics.json`` (last
    evaluation), ``metrics.jsonl`` (one object per logged step and per evaluation) and
    ``checkpoints/`` (see ``engine.checkpoint``). Under ``torchrun`` every process builds the same
    Trainer; process 0 writes. ``train.batch_size`` is per process."""

    def __init__(self, model, config: Config, train_set: CocoDetection, val_set: CocoDetection | None,
                 out_dir: str | Path, progress: bool = True):
        self.config, self.train_set, self.val_set = config, train_set, val_set
        self.out_dir = Path(out_dir)
        t = validate(config).train
        self.ctx, self.device = distributed.setup(t.device)
        if self.ctx.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.progress = progress and self.ctx.is_main  # progress bars; without them, plain log lines
        self.model = model.to(self.device)
        self.autocast_dtype = resolve_precision(t.precision, self.device, training=True)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)
        self.criterion = SetCriterion.for_model(
            config.model, lambda value, device: distributed.mean_over_ranks({"n": value}, self.ctx, device)["n"])
        self.optimizer = make_optimizer(model, t, self.device)
        self.ema = WeightEMA(model, t.ema_decay) if t.ema else None
        # Unused parameters happen (no denoising queries for an image without boxes), so DDP looks for them.
        self.net = (DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None,
                                            find_unused_parameters=True) if self.ctx.distributed else model)
        groups = aspect_groups(train_set.image_sizes) if config.data.aspect_grouping else [0] * len(train_set)
        self.sampler = GroupedBatchSampler(groups, t.batch_size, t.seed, self.ctx.rank, self.ctx.world_size)
        # The loader's own generator: creating an iterator must not draw from the global RNG
        # (dropout and denoising draw from it; exact resume depends on that).
        self.loader = DataLoader(SeededSamples(train_set), batch_sampler=self.sampler,
                                 collate_fn=partial(collate, size_divisor=config.data.size_divisor),
                                 num_workers=config.data.num_workers, generator=torch.Generator().manual_seed(t.seed),
                                 pin_memory=self.device.type == "cuda", worker_init_fn=ignore_stop_signals)
        seed_everything(t.seed + self.ctx.rank)  # the same model everywhere (DDP broadcasts), own dropout
        self.step = self.epoch = self.batch_in_epoch = 0
        self.trained_seconds = 0.0          # evaluation and checkpoint time do not count
        self.skipped_images = 0
        self.size_mismatches: dict[int, str] = {}  # image id -> how its file disagrees with the json's size
        self._mismatches_warned = 0
        self._images_readable = False
        self.best: dict | None = None       # {"AP", "step"} of the best evaluation
        self.history: list[dict] = []
        self._writer = None
        self._resumed = False
        self._stop: StopSignals | None = None
        self._saved_step: int | None = None  # the step of the newest step checkpoint this process wrote

    # ---------------------------------------------------------------- the loop
    def total_steps(self) -> int:
        t = self.config.train
        if t.max_steps > 0:
            return t.max_steps
        return t.epochs * max(1, len(self.sampler) // t.accumulate)

    def fit(self) -> dict:
        """Train until ``max_steps`` (or ``epochs``) or the ``minutes`` budget; returns the last metrics.
        SIGINT (Ctrl-C) or SIGTERM stops training at the next step boundary: the current step
        finishes, a resumable checkpoint of it is saved and :class:`TrainingInterrupted` is raised.
        A second signal quits at once (``KeyboardInterrupt``), saving nothing more."""
        with StopSignals(announce=self.ctx.is_main) as self._stop:
            return self._train()

    def _train(self) -> dict:
        t = self.config.train
        total, budget = self.total_steps(), t.minutes * 60.0
        eval_every = self._eval_interval(total)
        if not self._resumed:
            fresh = not self.ctx.is_main or latest_checkpoint(self.out_dir) is None
            if not distributed.all_agree(fresh, self.ctx, self.device):
                raise SparsedetError(f"{self.out_dir} already holds a run's checkpoints; continue it with "
                                     "`sparsedet train --resume RUN` or train into another folder")
            if self.ctx.is_main:
                (self.out_dir / METRICS_LOG).unlink(missing_ok=True)  # a new run starts a new log
        self._say(self.summary())
        initial = min(int(self.trained_seconds), int(budget)) if budget else self.step
        bar = tqdm(total=int(budget) if budget else total, initial=initial, desc="train",
                   unit="s" if budget else "step", disable=not self.progress, dynamic_ncols=True)
        self.model.train()
        metrics, bad_in_row, micro, sums, interrupted = {}, 0, 0, {}, False
        clock = time.perf_counter()
        done = self.step >= total or (budget and self.trained_seconds >= budget)
        while not done:
            self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
            for batch, targets, dropped in self.loader:
                if micro == 0 and self._stop_requested():  # a step boundary; this batch is left for the resume
                    interrupted = done = True
                    break
                self.batch_in_epoch += 1
                self.skipped_images += dropped
                if not distributed.all_agree(batch is not None, self.ctx, self.device):
                    self._require_readable_images()  # an image root where nothing reads never fills a batch
                    continue  # every image of some process's batch was unreadable: all skip it
                self._count_size_mismatches(targets)
                if micro == 0:
                    self._set_lr(total, budget)
                terms = self._forward_backward(batch, targets, last=micro == t.accumulate - 1)
                if terms is None:
                    micro, sums = 0, {}
                    bad_in_row += 1
                    warnings.warn(f"step {self.step + 1}: non-finite loss, step skipped")
                    if bad_in_row >= t.max_nonfinite:
                        raise SparsedetError(
                            f"{bad_in_row} non-finite losses in a row at step {self.step + 1}; lower train.lr, try "
                            f"train.precision=fp32 or check the data (sparsedet check-data). The last good "
                            f"checkpoint is in {self.out_dir / 'checkpoints'}")
                    continue
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v / t.accumulate
                micro += 1
                if micro < t.accumulate:
                    continue
                self._optimizer_step()
                bad_in_row, micro = 0, 0
                now = time.perf_counter()
                self.trained_seconds += now - clock
                elapsed = distributed.max_over_ranks(self.trained_seconds, self.ctx, self.device) \
                    if budget else self.trained_seconds
                bar.update(min(int(elapsed), int(budget)) - bar.n if budget else 1)
                if self.step % t.log_every == 0 or self.step == 1:
                    self._log_step(sums, bar)
                sums = {}
                done = self.step >= total or bool(budget and elapsed >= budget)
                if not done and self.step % eval_every == 0 and self.val_set is not None:
                    metrics = self.evaluate()
                    if not t.checkpoint_every:
                        self.save()
                if t.checkpoint_every and self.step % t.checkpoint_every == 0 and not done:
                    self.save()
                clock = time.perf_counter()
                if done:
                    break
            else:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                self._warn_size_mismatches()
        bar.close()
        if self.skipped_images and self.ctx.is_main:
            warnings.warn(f"skipped {self.skipped_images} unreadable images during training")
        self._warn_size_mismatches()
        if interrupted or self._stop_requested():
            if self._saved_step != self.step:
                self.save()
            if self._writer is not None:
                self._writer.close()
            raise TrainingInterrupted(self._stop.signum or signal.SIGTERM, self.step, self.out_dir)
        if self.val_set is not None:
            metrics = self.evaluate()
        self.save()
        if self._writer is not None:
            self._writer.close()
        return metrics

    def _stop_requested(self) -> bool:
        """Whether SIGINT/SIGTERM reached any process (every process takes part)."""
        asked = self._stop is not None and self._stop.signum is not None
        return not distributed.all_agree(not asked, self.ctx, self.device)

    def summary(self) -> str:
        """What this run found and will do: images and boxes per split, classes, device, precision,
        length and where it comes from, evaluation and checkpoint intervals."""
        t, world = self.config.train, self.ctx.world_size
        lines = []
        for split, data in (("train", self.train_set), ("val", self.val_set)):
            lines.append(f"{split:9s}{len(data)} images, {data.num_boxes} boxes ({data.source})" if data is not None
                         else f"{split:9s}none: no evaluation")
        names = ", ".join(self.train_set.classes[:10]) + (", ..." if len(self.train_set.classes) > 10 else "")
        lines.append(f"{'classes':9s}{len(self.train_set.classes)}: {names}")
        precision = NAMES[self.autocast_dtype] + (" with loss scaling" if self.scaler.is_enabled() else "")
        lines.append(f"{'device':9s}{self.device} x {world} process{'es' if world > 1 else ''}, {precision} "
                     f"(train.precision={t.precision}), batch {t.batch_size} per process x {t.accumulate} "
                     "accumulated")
        total = self.total_steps()
        if t.max_steps > 0:
            plan = f"{total} steps (train.max_steps={t.max_steps})"
        else:
            per_epoch = max(1, len(self.sampler) // t.accumulate)
            plan = (f"{total} steps = {t.epochs} epochs (train.epochs, train.max_steps=0) x {per_epoch} steps "
                    f"({len(self.train_set)} images / {t.batch_size * world * t.accumulate} per step)")
        if t.minutes:
            plan = f"at most {plan} or {t.minutes:g} min of training (train.minutes), whichever ends first"
        if self.step:
            plan += f"; resuming at step {self.step}"
        lines.append(f"{'plan':9s}{plan}")
        every = self._eval_interval(total)
        evals = ("none" if self.val_set is None else "at the end" if every > total
                 else f"every {every} steps and at the end")
        saves = (f"every {t.checkpoint_every} steps and " if t.checkpoint_every
                 else "at each evaluation and " if self.val_set is not None and every <= total else "")
        lines.append(f"{'writes':9s}{self.out_dir}: evaluation {evals} (train.eval_every={t.eval_every}), "
                     f"checkpoints {saves}at the end, a log line every {t.log_every} step(s)")
        return "\n".join(lines)

    def _say(self, text: str) -> None:
        """A message for the user from process 0: above the progress bar, or a plain flushed line
        (for nohup and batch-scheduler logs)."""
        if not self.ctx.is_main:
            return
        if self.progress:
            tqdm.write(text)
        else:
            print(text, flush=True)

    def _require_readable_images(self) -> None:
        """After a batch without one readable image: stop (SparsedetError naming the image root) unless
        some training image can be read at all. Every process takes part; the check runs once."""
        if not self._images_readable:
            self.train_set.require_readable()
            self._images_readable = True

    def _count_size_mismatches(self, targets: list[dict]) -> None:
        for target in targets:
            if "size_mismatch" in target:
                self.size_mismatches.setdefault(target["image_id"], target["size_mismatch"])

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

    def _eval_interval(self, total: int) -> int:
        """Steps between evaluations: ``train.eval_every``, or one epoch (0), or never before the end (-1)."""
        every = self.config.train.eval_every
        if every == 0:
            return max(1, len(self.sampler) // self.config.train.accumulate)
        return every if every > 0 else total + 1

    def _set_lr(self, total: int, budget: float) -> None:
        progress = max(self.step / total, self.trained_seconds / budget if budget else 0.0)
        factor = lr_factor(self.step, progress, self.config.train)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor

    def _forward_backward(self, batch, targets, last: bool) -> dict[str, float] | None:
        """One micro-batch: forward, losses, backward (gradients synchronised on the last one).
        Returns the logged loss terms, or None (gradients dropped) when some process's loss is not finite."""
        t = self.config.train
        batch = batch.to(self.device, non_blocking=True)
        targets = [{"labels": x["labels"].to(self.device), "boxes": x["boxes"].to(self.device)} for x in targets]
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
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1

    # ---------------------------------------------------------------- evaluation and logs
    def evaluate(self) -> dict:
        """Evaluate on the validation set (and the EMA weights too); every process takes part."""
        bs = self.config.train.batch_size
        distributed.sync_buffers(self.model, self.ctx)
        if self.ema is not None:
            distributed.sync_buffers(self.ema.module, self.ctx)
        metrics, _ = evaluate(self.model, self.val_set, bs, self.progress, self.ctx)
        record = {"step": self.step, "time_s": round(self.trained_seconds, 3), "eval": _summary(metrics)}
        if self.ema is not None:
            ema_metrics, _ = evaluate(self.ema.module, self.val_set, bs, False, self.ctx)
            metrics["ema"] = record["eval_ema"] = _summary(ema_metrics)
        if self.ctx.is_main:
            self._log(record)
            payload = json.dumps({"step": self.step, **metrics}, indent=2)
            atomic_write(self.out_dir / "metrics.json", lambda p: Path(p).write_text(payload))
            self._say(format_metrics(metrics))
        if self.best is None or metrics["AP"] > self.best["AP"]:
            self.best = {"AP": metrics["AP"], "step": self.step}
            self.save(best=True)
        return metrics

    def _log_step(self, sums: dict[str, float], bar) -> None:
        values = distributed.mean_over_ranks(sums, self.ctx, self.device)
        lr = self.optimizer.param_groups[-1]["lr"]
        if not self.ctx.is_main:
            return
        bar.set_postfix(step=self.step, loss=f"{values['loss']:.3f}", lr=f"{lr:.1e}")
        if not self.progress:
            minutes = self.config.train.minutes
            terms = "  ".join(f"{k.removeprefix('loss_')} {v:.4f}" for k, v in values.items())
            self._say(f"step {self.step}" + ("" if minutes else f"/{self.total_steps()}") + f"  epoch {self.epoch}  "
                      f"{terms}  lr {lr:.1e}  {self.trained_seconds:.0f}" + (f"/{minutes * 60:.0f}" if minutes else "")
                      + " s")
        self._log({"step": self.step, "epoch": self.epoch, "time_s": round(self.trained_seconds, 3), "lr": lr,
                   **values})

    def _log(self, record: dict) -> None:
        self.history.append(record)
        with open(self.out_dir / METRICS_LOG, "a") as f:
            f.write(json.dumps(record) + "\n")
        writer = self._tensorboard()
        if writer is not None:
            scalars = {k: v for k, v in record.items() if k.startswith("loss") or k == "lr"}
            for prefix in ("eval", "eval_ema"):
                scalars.update({f"{prefix}/{k}": v for k, v in record.get(prefix, {}).items()})
            for k, v in scalars.items():
                writer.add_scalar(k, v, record["step"])

    def _tensorboard(self):
        if self._writer is None and self.config.train.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the [tensorboard] extra is not installed
                self.config.train.tensorboard = False
                return None
            self._writer = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=self.step + 1)
        return self._writer

    # ---------------------------------------------------------------- checkpoints and resume
    def save(self, best: bool = False) -> None:
        """Checkpoint (``checkpoints/step_N`` or ``best_step_N``) and the run folder's weights.
        Every process takes part (RNG states are gathered); process 0 writes."""
        state = self._train_state()
        if self.ctx.is_main:
            self.model.run_config = self.config
            weights = self.model.state_dict()
            ema = self.ema.module.state_dict() if self.ema is not None else None
            name = f"{'best_' if best else ''}step_{self.step:08d}"
            checkpoint = save_checkpoint(self.out_dir, name, weights, self.config, state, ema)
            if not best:
                publish(checkpoint, self.out_dir)
            prune_checkpoints(self.out_dir, self.config.train.keep_checkpoints)
        if not best:
            self._saved_step = self.step
        distributed.barrier(self.ctx)

    def _train_state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "trained_seconds": self.trained_seconds, "skipped_images": self.skipped_images,
                "best": self.best, "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "ema_updates": self.ema.updates if self.ema is not None else 0,
                "world_size": self.ctx.world_size, "rng": distributed.gather_objects(rng_state(), self.ctx)}

    def resume(self, checkpoint: str | Path | None = None) -> Path:
        """Continue from ``checkpoint`` (default: the newest in ``out_dir``) exactly where it stopped:
        weights, EMA, optimiser, loss scaler, RNG states, step and data position."""
        path = Path(checkpoint) if checkpoint else latest_checkpoint(self.out_dir)
        if path is None:
            raise SparsedetError(f"{self.out_dir} has no checkpoint to resume from (checkpoints/step_*)")
        state = load_train_state(path)
        self.model.load_state_dict(_on(load_run(path)[1], self.device))
        if self.ema is not None:
            try:
                self.ema.module.load_state_dict(_on(load_run(path, ema=True)[1], self.device))
                self.ema.updates = state["ema_updates"]
            except SparsedetError:
                warnings.warn(f"{path} holds no EMA weights; the EMA starts from the current weights")
                self.ema = WeightEMA(self.model, self.config.train.ema_decay)
        base_lrs = {g["name"]: g["base_lr"] for g in self.optimizer.param_groups}
        self.optimizer.load_state_dict(state["optimizer"])
        for g in self.optimizer.param_groups:  # learning rates follow the config, which may have changed
            g["base_lr"] = base_lrs[g["name"]]
        if self.scaler.is_enabled() and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        for key in ("step", "epoch", "batch_in_epoch", "trained_seconds", "skipped_images", "best"):
            setattr(self, key, state[key])
        if state["world_size"] == self.ctx.world_size:
            set_rng_state(state["rng"][self.ctx.rank])
        else:
            warnings.warn(f"{path} was written by {state['world_size']} processes, resuming with "
                          f"{self.ctx.world_size}: random streams restart from train.seed")
            seed_everything(self.config.train.seed + self.ctx.rank + self.step)
        self._resumed = True
        if self.ctx.is_main:
            self.history = _truncate_log(self.out_dir / METRICS_LOG, self.step)
        return path


def _summary(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in ("per_class", "ema")}


def _on(state: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in state.items()}


def _truncate_log(path: Path, step: int) -> list[dict]:
    """Drop what was logged after the checkpoint a run resumes from; returns the records kept."""
    if not path.is_file():
        return []
    kept = [record for record in map(json.loads, path.read_text().splitlines()) if record["step"] <= step]
    atomic_write(path, lambda p: Path(p).write_text("".join(json.dumps(r) + "\n" for r in kept)))
    return kept
