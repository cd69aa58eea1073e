"""Cost counting: multiply-adds per module, deformable-attention sampling included.

Convention (detectron2/fvcore, the one DETR papers report as "FLOPs"): one fused multiply-add
counts as one FLOP, and bilinear sampling counts 4 per sampled output element. PyTorch's
``FlopCounterMode`` counts 2 per multiply-add for matmuls and convolutions, so its totals are
halved; it does not know ``grid_sample``, so that rule is added here. Only the ``reference``
deformable-attention backend (grid_sample) is visible to the counter.
"""
from __future__ import annotations

from collections.abc import Callable
from math import prod

import torch
from torch.utils.flop_counter import FlopCounterMode

from . import deform_attn


def _grid_sample_flops(*args, out_shape=None, **kwargs) -> int:
    # Counted as 2 x (4 per output element) so that halving gives fvcore's 4.
    return 2 * 4 * prod(out_shape)


def count_macs(fn: Callable[[], object]) -> dict[str, float]:
    """Run ``fn()`` and return multiply-adds per module path ("Global" = everything).

    Module paths are those of the outermost module called inside ``fn`` (e.g.
    ``DetectionTransformer.encoder``); a module's count includes everything called while it runs.
    """
    mapping = {torch.ops.aten.grid_sampler_2d: _grid_sample_flops}
    previous = deform_attn.default_backend()
    deform_attn.set_default_backend("reference")
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            fn()
    finally:
        deform_attn.set_default_backend(previous)
    return {name: sum(ops.values()) / 2 for name, ops in counter.get_flop_counts().items()}
