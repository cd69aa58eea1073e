"""Multi-scale deformable attention core (no parameters).

``ms_deform_attn(value, shapes, locations, weights)`` samples every head's value
map bilinearly at the given locations and sums the samples with the attention
weights. Location convention: (x, y) in [0, 1] where 0 is the left/top edge of
the map and 1 the right/bottom edge (``grid_sample`` with ``align_corners=False``);
samples outside the map read zeros.

Backends:
- ``reference``: one ``F.grid_sample`` per level; the ground truth in tests.
- ``gather``: explicit bilinear gather of the four neighbours, with the bilinear
  and attention weights folded into one weighted sum. Same numbers, exportable,
  and the form ``torch.compile`` speeds up on CPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("reference", "gather")
# grid_sample is the fastest eager path on CPU (specs/performance.md §1.3); gather is for compile/export.
_default_backend = "reference"


def set_default_backend(name: str) -> None:
    """Choose the backend used when ``ms_deform_attn`` is called without one."""
    global _default_backend
    if name not in BACKENDS:
        raise ValueError(f"unknown deformable-attention backend {name!r}; choose one of {BACKENDS}")
    _default_backend = name


def default_backend() -> str:
    return _default_backend


def ms_deform_attn(
    value: Tensor,
    shapes: list[tuple[int, int]],
    locations: Tensor,
    weights: Tensor,
    backend: str | None = None,
) -> Tensor:
    """Multi-scale deformable attention.

    Args:
        value: [B, S, M, D] per-head values, levels flattened fine to coarse, S = sum(H_l * W_l).
        shapes: per level (H_l, W_l) as Python ints.
        locations: [B, Q, M, L, P, 2] sampling locations (x, y) in [0, 1].
        weights: [B, Q, M, L, P] attention weights (already normalised).
        backend: ``reference`` or ``gather``; defaults to ``default_backend()``.

    Returns:
        [B, Q, M * D].
    """
    backend = backend or _default_backend
    if backend == "reference":
        return _reference(value, shapes, locations, weights)
    if backend == "gather":
        return _gather(value, shapes, locations, weights)
    raise ValueError(f"unknown deformable-attention backend {backend!r}; choose one of {BACKENDS}")


def _reference(value: Tensor, shapes: list[tuple[int, int]], locations: Tensor, weights: Tensor) -> Tensor:
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = locations.shape
    grids = (2 * locations - 1).transpose(1, 2).reshape(B * M, Q, L, P, 2)
    wts = weights.transpose(1, 2).reshape(B * M, 1, Q, L, P)
    out = None
    start = 0
    # Accumulate level by level: never materialise the [B*M, D, Q, L, P] stack of all samples.
    for level, (h, w) in enumerate(shapes):
        v = value[:, start:start + h * w].permute(0, 2, 3, 1).reshape(B * M, D, h, w)
        start += h * w
        sampled = F.grid_sample(v, grids[:, :, level], mode="bilinear", padding_mode="zeros", align_corners=False)
        part = (sampled * wts[..., level, :]).sum(-1)  # [B*M, D, Q]
        out = part if out is None else out + part
    return out.view(B, M * D, Q).transpose(1, 2).contiguous()


def _gather(value: Tensor, shapes: list[tuple[int, int]], locations: Tensor, weights: Tensor) -> Tensor:
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = locations.shape
    dev = value.device
    sizes = torch.tensor(shapes, device=dev, dtype=locations.dtype)  # [L, 2] as (H, W)
    hw = sizes.flip(-1)  # (W, H) to match (x, y)
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    level_start = torch.tensor(starts, device=dev)
    widths = torch.tensor([w for _, w in shapes], device=dev)
    # Pixel coordinates with align_corners=False: centre of pixel i sits at i + 0.5.
    pix = locations * hw[:, None, :] - 0.5  # [B, Q, M, L, P, 2]
    base = pix.floor()
    frac = pix - base
    base = base.long()
    x0, y0 = base[..., 0], base[..., 1]
    fx, fy = frac[..., 0], frac[..., 1]
    wl = widths[:, None]
    hl = torch.tensor([h for h, _ in shapes], device=dev)[:, None]
    idx, wts = [], []
    for dy in (0, 1):
        for dx in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            bil = (fx if dx else 1 - fx) * (fy if dy else 1 - fy)
            inside = (xi >= 0) & (xi < wl) & (yi >= 0) & (yi < hl)
            flat = level_start[:, None] + yi.clamp(min=0) * wl + xi.clamp(min=0)
            flat = torch.where(inside, flat, torch.zeros_like(flat))
            idx.append(flat)
            wts.append(bil * inside.to(bil.dtype))
    # [B, Q, M, L, P, 4] -> [B, M, Q, K] with K = L * P * 4
    idx_t = torch.stack(idx, -1).permute(0, 2, 1, 3, 4, 5).reshape(B, M, Q * L * P * 4)
    w_t = (torch.stack(wts, -1) * weights[..., None]).permute(0, 2, 1, 3, 4, 5).reshape(B * M, Q, L * P * 4)
    v = value.permute(0, 2, 1, 3).reshape(B * M, S, D)
    picked = torch.gather(v, 1, idx_t.reshape(B * M, -1, 1).expand(-1, -1, D))
    out = torch.einsum("nqk,nqkd->nqd", w_t, picked.view(B * M, Q, L * P * 4, D))
    return out.view(B, M, Q, D).permute(0, 2, 1, 3).reshape(B, Q, M * D)
