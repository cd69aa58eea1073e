"""Training loop: AdamW with the official parameter groups, warm-up + step schedule,
gradient clipping, a wall-clock budget, periodic evaluation and checkpoints."""
from __future__ import annotations

import json
import random
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import Config
from ..data.batch import collate
from ..data.coco import CocoDetection
from ..data.transforms import build_transforms
from ..errors import SparsedetError
from ..losses.criterion import SetCriterion
from .checkpoint import atomic_write
from .evaluator import Evaluator, format_metrics

MAX_BAD_STEPS = 20


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_amp(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.amp``: bf16 only where the hardware runs it natively
    (emulated bf16 on an older CPU is slower than fp32)."""
    if name == "none":
        return None
    if name not in ("auto", "bf16"):
        raise SparsedetError(f"train.amp must be none, bf16 or auto, got {name!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    native = _cpu_has_native_bf16()
    if name == "bf16" and not native:
        warnings.warn("this CPU has no native bf16; training in bf16 anyway (slow)")
        return torch.bfloat16
    return torch.bfloat16 if native else None


def _cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def param_groups(model: torch.nn.Module, cfg) -> list[dict]:
    """Backbone at ``lr_backbone``; sampling offsets and reference points at ``lr * lr_linear_proj_mult``."""
    groups = {"backbone": [], "linear_proj": [], "rest": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("backbone."):
            groups["backbone"].append(p)
        elif "sampling_offsets" in name or "reference_points" in name:
            groups["linear_proj"].append(p)
        else:
            groups["rest"].append(p)
    lrs = {"backbone": cfg.lr_backbone, "linear_proj": cfg.lr * cfg.lr_linear_proj_mult, "rest": cfg.lr}
    return [{"params": ps, "lr": lrs[k], "base_lr": lrs[k], "name": k} for k, ps in groups.items() if ps]


def lr_factor(step: int, progress: float, cfg) -> float:
    """Linear warm-up over ``warmup_steps``, then x0.1 once ``progress`` passes ``lr_drop``."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    return warm * (0.1 if progress >= cfg.lr_drop else 1.0)


def make_datasets(config: Config, train_ann, val_ann, images_root=None):
    d, m = config.data, config.model
    train_tf = build_transforms(True, d.train_scales, d.max_size, d.crop, d.crop_scales, d.crop_range)
    eval_tf = build_transforms(False, [m.eval_size], m.eval_max_size)
    train_set = CocoDetection(train_ann, images_root, train_tf)
    val_set = CocoDetection(val_ann, images_root, eval_tf) if val_ann else None
    if val_set is not None and val_set.category_ids != train_set.category_ids:
        raise SparsedetError(f"{val_ann} and {train_ann} have different categories; use one category table")
    return train_set, val_set


@torch.no_grad()
def evaluate(model, dataset: CocoDetection, batch_size: int = 8, progress: bool = True) -> tuple[dict, list[dict]]:
    """COCO metrics of ``model`` on ``dataset`` (boxes rescaled to each file's original size)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    category_ids = model.config.category_ids or dataset.category_ids
    evaluator = Evaluator(dataset.coco, category_ids)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    for batch, targets, _ in tqdm(loader, desc="eval", disable=not progress, leave=False):
        if batch is None:
            continue
        sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        dets = model.detect(batch.to(device), sizes)
        evaluator.update([t["image_id"] for t in targets], [{k: v.cpu() for k, v in d.items()} for d in dets])
    model.train(was_training)
    return evaluator.compute(), evaluator.results()


class Trainer:
    """Trains ``model`` (a ``sparsedet.Detector``) on a COCO-format dataset, writing to ``out_dir``:
    ``model.safetensors`` + ``config.json`` (checkpoints), ``metrics.json`` (last evaluation),
    ``history.jsonl`` (one line per log step and per evaluation)."""

    def __init__(self, model, config: Config, train_set: CocoDetection, val_set: CocoDetection | None,
                 out_dir: str | Path, progress: bool = True):
        self.model, self.config, self.train_set, self.val_set = model, config, train_set, val_set
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        t = config.train
        self.device = resolve_device(t.device)
        self.model.to(self.device)
        self.amp_dtype = resolve_amp(t.amp, self.device)
        self.criterion = SetCriterion.for_model(config.model)
        self.optimizer = torch.optim.AdamW(param_groups(model, t), lr=t.lr, weight_decay=t.weight_decay)
        generator = torch.Generator().manual_seed(t.seed)
        self.loader = DataLoader(train_set, batch_size=t.batch_size, shuffle=True, generator=generator,
                                 collate_fn=partial(collate, size_divisor=config.data.size_divisor),
                                 num_workers=config.data.num_workers, drop_last=len(train_set) > t.batch_size)
        (self.out_dir / "history.jsonl").unlink(missing_ok=True)  # a new run starts a new history
        self.step = 0
        self.skipped_images = 0
        self.eval_seconds = 0.0  # evaluation time does not count against the training budget
        self.history = []

    def total_steps(self) -> int:
        t = self.config.train
        return t.max_steps if t.max_steps > 0 else t.epochs * max(1, len(self.loader))

    def fit(self) -> dict:
        t = self.config.train
        total = self.total_steps()
        budget = t.minutes * 60.0
        start = time.perf_counter()

        def trained() -> float:  # seconds of training so far; evaluation time is not counted
            return time.perf_counter() - start - self.eval_seconds

        # With a wall-clock budget the bar counts training seconds; otherwise steps.
        bar = tqdm(total=int(budget) if budget else total, desc="train", unit="s" if budget else "step",
                   disable=not self.progress, dynamic_ncols=True)
        bad_in_row, metrics = 0, {}
        eval_every = self._eval_interval(total)
        self.model.train()
        done = False
        while not done:
            for batch, targets, dropped in self.loader:
                self.skipped_images += dropped
                if batch is None:
                    continue
                progress = max(self.step / total, trained() / budget if budget else 0.0)
                factor = lr_factor(self.step, progress, t)
                for g in self.optimizer.param_groups:
                    g["lr"] = g["base_lr"] * factor
                loss, terms = self._train_step(batch, targets)
                if loss is None:
                    bad_in_row += 1
                    warnings.warn(f"step {self.step}: non-finite loss, step skipped")
                    if bad_in_row >= MAX_BAD_STEPS:
                        raise SparsedetError(
                            f"{MAX_BAD_STEPS} non-finite losses in a row at step {self.step}; lower train.lr or check "
                            f"the data (sparsedet check-data). The last good checkpoint is in {self.out_dir}")
                    continue
                bad_in_row = 0
                self.step += 1
                bar.update(int(trained()) - bar.n if budget else 1)
                if self.step % t.log_every == 0 or self.step == 1:
                    lr = self.optimizer.param_groups[-1]["lr"]
                    bar.set_postfix(step=self.step, loss=f"{loss:.3f}", lr=f"{lr:.1e}")
                    self._log({"step": self.step, "time_s": round(trained(), 1), "loss": loss, **{k: round(v, 5) for k, v in terms.items()}})
                last = self.step >= total or (budget and trained() >= budget)
                if not last and self.step % eval_every == 0 and self.val_set is not None:
                    metrics = self.evaluate(trained())
                    if not t.checkpoint_every:
                        self.save()
                if t.checkpoint_every and self.step % t.checkpoint_every == 0:
                    self.save()
                if last:
                    done = True
                    break
        bar.close()
        if self.skipped_images:
            warnings.warn(f"skipped {self.skipped_images} unreadable images during training")
        self.save()
        if self.val_set is not None:
            metrics = self.evaluate(trained())
        return metrics

    def _eval_interval(self, total: int) -> int:
        """Steps between evaluations: ``train.eval_every``, or one epoch (0), or never before the end (-1)."""
        every = self.config.train.eval_every
        if every == 0:
            return max(1, len(self.loader))
        return every if every > 0 else total + 1

    def _train_step(self, batch, targets) -> tuple[float | None, dict]:
        t = self.config.train
        batch = batch.to(self.device)
        targets = [{"labels": x["labels"].to(self.device), "boxes": x["boxes"].to(self.device)} for x in targets]
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            out = self.model(batch, targets)
        terms = self.criterion(_float(out), targets)
        loss = self.criterion.total(terms)
        if not torch.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            return None, {}
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if t.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.clip_grad)
        self.optimizer.step()
        main = {k: v.item() for k, v in terms.items() if k in ("loss_cls", "loss_bbox", "loss_giou", "loss_select")}
        return loss.item(), main

    def evaluate(self, elapsed: float) -> dict:
        """Evaluate on the validation set; ``elapsed`` is the training time so far (logged)."""
        t0 = time.perf_counter()
        metrics, results = evaluate(self.model, self.val_set, self.config.train.batch_size, self.progress)
        summary = {k: v for k, v in metrics.items() if k != "per_class"}
        self._log({"step": self.step, "time_s": round(elapsed, 1), "eval": summary})
        payload = json.dumps({"step": self.step, **metrics}, indent=2)
        atomic_write(self.out_dir / "metrics.json", lambda p: Path(p).write_text(payload))
        if self.progress:
            tqdm.write(format_metrics(metrics))
        self.eval_seconds += time.perf_counter() - t0
        return metrics

    def save(self) -> None:
        self.model.run_config = self.config
        self.model.save_pretrained(self.out_dir)

    def _log(self, record: dict) -> None:
        self.history.append(record)
        with open(self.out_dir / "history.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)


def _float(out):
    """Losses run in fp32 whatever precision the forward pass used."""
    out.logits, out.boxes = out.logits.float(), out.boxes.float()
    out.aux = [{k: v.float() for k, v in a.items()} for a in out.aux]
    out.enc_aux = [{k: v.float() for k, v in a.items()} for a in out.enc_aux]
    if out.enc is not None:
        out.enc = {k: v.float() if torch.is_tensor(v) else v for k, v in out.enc.items()}
    if out.dn is not None:
        out.dn = {k: v.float() if torch.is_tensor(v) else v for k, v in out.dn.items()}
    return out
