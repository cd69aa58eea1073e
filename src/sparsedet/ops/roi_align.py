"""RoIAlign in plain PyTorch (torchvision's semantics, ``aligned=True``), no compiled ops.

Each output bin averages a grid of bilinear samples; with the adaptive sampling ratio a box
of h x w pixels takes ceil(h / out_h) x ceil(w / out_w) samples per bin. Samples are separable
(every bin row shares its y positions, every bin column its x positions), so the whole
operation is two small interpolation matrices per box, ``A_y [out_h, H]`` and ``A_x [out_w, W]``,
and RoIAlign(F) = A_y F A_x^T. That keeps shapes static (no per-box loops or host syncs) and
memory bounded by boxes x out_h x C x W.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def _axis_weights(start: Tensor, length: Tensor, bins: int, size: int, sampling_ratio: int,
                  bound: Tensor | None = None) -> Tensor:
    """Interpolation matrix along one axis: [N, bins, size] (rows sum to the mean weight of
    the bin's samples). start/length: [N] in pixels (after the half-pixel shift). bound: [N]
    each box's map extent along the axis where it is less than ``size`` (a padded batch)."""
    if sampling_ratio > 0:
        count = torch.full_like(start, float(sampling_ratio))
        most = sampling_ratio
    else:
        count = torch.ceil(length / bins)
        # Boxes lie inside the map, so no box needs more than this many samples per bin.
        most = max(1, math.ceil((size + 1) / bins))
    step = length / bins
    sub = torch.arange(most, device=start.device, dtype=start.dtype)
    pos = (start[:, None, None] + torch.arange(bins, device=start.device, dtype=start.dtype)[None, :, None] * step[:, None, None]
           + (sub[None, None, :] + 0.5) * (step / count.clamp(min=1))[:, None, None])  # [N, bins, most]
    extent = bound.to(start.dtype)[:, None, None] if bound is not None else size
    last = extent - 1 if bound is not None else torch.full_like(pos, size - 1)
    used = (sub[None, None, :] < count[:, None, None]) & (pos >= -1.0) & (pos <= extent)
    pos = pos.clamp(min=0)
    low = pos.floor()
    at_edge = low >= last
    low = torch.where(at_edge, last, low)
    pos = torch.where(at_edge, low, pos)
    frac = pos - low
    high = torch.minimum(low + 1, last)
    weight = used.to(start.dtype) / count.clamp(min=1)[:, None, None]
    cells = torch.arange(size, device=start.device, dtype=start.dtype)
    matrix = ((weight * (1 - frac))[..., None] * (cells == low[..., None])
              + (weight * frac)[..., None] * (cells == high[..., None]))
    return matrix.sum(2)


def roi_align(features: Tensor, boxes: Tensor, output_size: tuple[int, int] = (7, 7),
              sampling_ratio: int = -1, extents: Tensor | None = None) -> Tensor:
    """
    Args:
        features: [B, C, H, W].
        boxes: [B, N, 4] (x1, y1, x2, y2) in pixels of the feature map (pixel i covers [i, i + 1)).
        output_size: (out_h, out_w) bins.
        sampling_ratio: samples per bin along each axis; <= 0 adapts it to the box size.
        extents: [B, 2] each image's (height, width) of content cells in a padded batch: its
            samples treat that as the map's edge, as the image alone would (None: [H, W]).
    Returns:
        [B, N, C, out_h, out_w]. Differentiable in ``features`` (and, through the weights, in
        ``boxes``; torchvision gives boxes no gradient, so callers detach them to match).
    """
    B, N, _ = boxes.shape
    H, W = features.shape[-2:]
    out_h, out_w = output_size
    x1, y1, x2, y2 = (boxes.reshape(-1, 4) - 0.5).unbind(-1)
    bound_y, bound_x = (None, None) if extents is None else extents.repeat_interleave(N, 0).unbind(-1)
    ay = _axis_weights(y1, y2 - y1, out_h, H, sampling_ratio, bound_y).view(B, N, out_h, H)
    ax = _axis_weights(x1, x2 - x1, out_w, W, sampling_ratio, bound_x).view(B, N, out_w, W)
    rows = torch.einsum("bnih,bchw->bnciw", ay.to(features.dtype), features)
    return torch.einsum("bnciw,bnjw->bncij", rows, ax.to(features.dtype))
