"""Cost counting: multiply-adds per model stage, deformable attention and token sparsity included.

Convention (detectron2/fvcore, the one DETR papers report as "GFLOPs"): one fused multiply-add
counts as one FLOP. Matmuls, convolutions and attention follow PyTorch's own formulas (which count
2 per multiply-add, halved here). Multi-scale deformable attention is counted analytically,
whatever backend runs it: 5 per sampled value channel (4 bilinear taps + the attention
weighting, Deformable DETR App. A.1), i.e. 5 * Q * heads * levels * points * head_dim; its
linears (offsets, weights, value and output projections) are counted as the matmuls they are.
A bare ``grid_sample`` elsewhere counts 4 per output element and layer/group norms 5 per element
(fvcore's rules); other element-wise ops and softmax are not counted, as in fvcore.

Because the model really runs, sparsity is honoured as executed: an encoder layer that updates
k tokens is charged for k tokens.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from math import prod

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_flop_count

from . import deform_attn

OTHER = "other"


def _grid_sample(value, grid, *args, out_val=None, **kwargs) -> int:
    return 2 * 4 * out_val.numel()  # 2 per MAC like the registry; fvcore's 4 per output element


def _sdpa_cpu(query, key, value, *args, **kwargs) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape)


def _norm(x, *args, **kwargs) -> int:
    # fvcore: 5 per element for an affine layer/group norm (both of ours are affine).
    return 2 * 5 * x.numel()


# PyTorch's formulas (2 per multiply-add) plus the ops it does not know.
_RULES = {**flop_registry, torch.ops.aten.grid_sampler_2d: _grid_sample,
          torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
          torch.ops.aten.native_layer_norm: _norm, torch.ops.aten.native_group_norm: _norm}


def deform_attn_macs(value_shape: torch.Size, locations_shape: torch.Size) -> int:
    """5 * B * Q * heads * levels * points * head_dim (value [B, S, M, D], locations [B, Q, M, L, P, 2])."""
    return 5 * prod(locations_shape[:-1]) * value_shape[-1]


def hook_stages(stages: dict[str, list[nn.Module]], enter: Callable[[str], None], leave: Callable[[], None]) -> list:
    """Call ``enter(name)`` before and ``leave()`` after every forward of a stage's modules.
    Returns the hook handles (``.remove()`` them when done)."""
    handles = []
    for name, modules in stages.items():
        for module in modules:
            handles.append(module.register_forward_pre_hook(lambda *a, _n=name: enter(_n)))
            handles.append(module.register_forward_hook(lambda *a: leave()))
    return handles


class CostCounter(TorchDispatchMode):
    """Multiply-adds of everything run inside ``with counter:``, by stage.

    ``stages`` maps a stage name to modules; a cost goes to the innermost stage whose module is
    running (e.g. a box head called inside the decoder counts as ``heads``), or to ``other``.
    """

    def __init__(self, stages: dict[str, list[nn.Module]] | None = None):
        super().__init__()
        self.macs: dict[str, float] = defaultdict(float)
        self._stack, self._paused = [OTHER], 0
        self._hooks = hook_stages(stages or {}, self._stack.append, self._leave)

    def _leave(self) -> None:
        self._stack.pop()

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @property
    def total(self) -> float:
        return sum(self.macs.values())

    def add(self, macs: float) -> None:
        if not self._paused:
            self.macs[self._stack[-1]] += macs

    @contextmanager
    def paused(self) -> Iterator[None]:
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        rule = _RULES.get(func._overloadpacket)
        if rule is not None and not self._paused:
            self.add(rule(*args, **(kwargs or {}), out_val=out) / 2)
        return out

    def __enter__(self):
        super().__enter__()
        self._original = deform_attn.ms_deform_attn

        def counted(value, shapes, locations, weights, backend=None):
            self.add(deform_attn_macs(value.shape, locations.shape))
            with self.paused():
                return self._original(value, shapes, locations, weights, backend)

        deform_attn.ms_deform_attn = counted
        return self

    def __exit__(self, *exc):
        deform_attn.ms_deform_attn = self._original
        return super().__exit__(*exc)


def count_macs(fn: Callable[[], object], stages: dict[str, list[nn.Module]] | None = None) -> dict[str, float]:
    """Run ``fn()`` without gradients; multiply-adds per stage plus ``"total"``."""
    counter = CostCounter(stages)
    try:
        with torch.no_grad(), counter:
            fn()
    finally:
        counter.remove()
    return {**counter.macs, "total": counter.total}
