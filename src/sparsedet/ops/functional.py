"""Small tensor helpers shared across models and losses."""
from __future__ import annotations

import torch
from torch import Tensor


def host_tensor(values, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """``torch.tensor(values, dtype=dtype, device=device)`` without waiting for the device: built on
    the host and copied asynchronously. ``torch.tensor(..., device=cuda)`` copies synchronously: the
    host waits for every kernel queued before it (docs/architecture.md, host synchronisations)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x) with x clamped to [0, 1] and both x and 1 - x floored at ``eps``."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def apply_box_delta(delta: Tensor, reference: Tensor, eps: float = 1e-5) -> Tensor:
    """Refine a reference by a predicted delta in logit space: boxes [.., 4] move all four
    coordinates; points [.., 2] move the centre and take the size from the delta alone.
    delta: [..., 4]. Returns boxes [..., 4] in [0, 1]."""
    if reference.shape[-1] == 4:
        return (delta + inverse_sigmoid(reference, eps)).sigmoid()
    return torch.cat([delta[..., :2] + inverse_sigmoid(reference, eps), delta[..., 2:]], -1).sigmoid()


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x: [B, N, D], index: [B, K] -> [B, K, D]."""
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))


def top_k(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest entries of each row of ``x`` [B, n], best first, ties broken by the lower
    index: ``torch.topk`` leaves tie order to the kernel (and so to the CPU), while onnxruntime's
    TopK uses this rule. Returns (values, indices), each [B, k]."""
    values, indices = x.sort(dim=1, descending=True, stable=True)
    return values[:, :k].contiguous(), indices[:, :k].contiguous()


def token_levels(indices: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
    """Level of each flat token index (levels flattened fine to coarse)."""
    ends = host_tensor([h * w for h, w in shapes], indices.device).cumsum(0)
    return torch.bucketize(indices, ends, right=True)
