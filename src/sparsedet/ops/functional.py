"""Small tensor helpers shared across models and losses."""
from __future__ import annotations

import torch
from torch import Tensor


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x) with x clamped to [0, 1] and both x and 1 - x floored at ``eps``."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x: [B, N, D], index: [B, K] -> [B, K, D]."""
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))
