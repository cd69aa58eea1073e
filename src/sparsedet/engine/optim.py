"""The official recipes' optimiser groups, learning-rate schedules and the weight EMA."""
from __future__ import annotations

import copy
import math

import torch

from ..config import TrainConfig
from ..errors import SparsedetError

SCHEDULES = ("step", "cosine")


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """Backbone at ``lr_backbone``; sampling offsets and reference points at ``lr * lr_linear_proj_mult``
    (Deformable DETR, DINO and their descendants); everything else at ``lr``."""
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


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over ``param_groups``; the fused kernel where there is one: a single pass over all
    parameters (2.4 ms against 9-12 ms per step for dino_tiny on a CPU). Its ``load_state_dict``
    keeps each group's ``base_lr``: learning rates follow the config, which a resume may change."""
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type in ("cpu", "cuda"))
    optimizer.register_load_state_dict_pre_hook(_keep_base_lrs)
    return optimizer


def _keep_base_lrs(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """``state`` (a saved optimiser state) with the base learning rates ``optimizer`` has now."""
    base_lrs = {g["name"]: g["base_lr"] for g in optimizer.param_groups}
    return {**state, "param_groups": [{**g, "base_lr": base_lrs[g["name"]]} for g in state["param_groups"]]}


def lr_factor(step: int, progress: float, cfg: TrainConfig) -> float:
    """Multiplier of every group's base lr at optimiser step ``step`` (0-based) when ``progress``
    (0..1) of training is done: linear warm-up over ``warmup_steps``, then the step schedule (x0.1
    from ``lr_drop`` on) or a cosine from 1 down to ``min_lr_ratio``."""
    if cfg.schedule not in SCHEDULES:
        raise SparsedetError(f"train.schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.schedule == "step":
        return warm * (0.1 if progress >= cfg.lr_drop else 1.0)
    p = min(max(progress, 0.0), 1.0)
    return warm * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * p)))


class WeightEMA:
    """An exponential moving average of a model's parameters and buffers, with the usual warm-up:
    the decay used after ``n`` updates is ``min(decay, (1 + n) / (10 + n))``. Its part of a
    checkpoint's training state is that count; its weights are a file of their own (``ema.safetensors``)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0

    def state_dict(self) -> dict:
        return {"updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.updates = state["updates"]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        current = model.state_dict()
        for name, value in self.module.state_dict().items():
            if value.dtype.is_floating_point:
                value.lerp_(current[name].detach(), 1.0 - d)
            else:
                value.copy_(current[name])
