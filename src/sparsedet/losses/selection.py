"""Token-selection supervision of Sparse DETR, Focus-DETR and Salience DETR: what each method's token
scorer is trained to predict, and the loss that compares them.

Tokens are flattened level by level, fine to coarse; ``shapes`` lists each level's (H, W) as
Python ints; S = sum of H * W. Boxes are xyxy pixels in the padded image frame (the unpadded image
sits at the top-left).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import LossConfig
from ..nn.tokens import TokenSelection
from ..ops.boxes import cxcywh_to_xyxy
from ..ops.functional import host_tensor, top_k
from .focal import sigmoid_focal_loss


@torch.no_grad()
def decoder_attention_map(locations: Tensor, weights: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
    """Sparse DETR's DAM: every decoder sampling point's attention weight splatted bilinearly onto
    the token grid of its level, summed over layers, queries, heads and points.

    locations: [B, ..., L, P, 2] (x, y) in [0, 1] of the padded map; weights: [B, ..., L, P].
    The point falls at (x * W, y * H) in cell units with no half-cell shift (the official
    convention); neighbours outside the grid are dropped. Returns [B, S].
    """
    B, L, P = locations.shape[0], locations.shape[-3], locations.shape[-2]
    loc = locations.reshape(B, -1, L, P, 2)
    w = weights.reshape(B, -1, L, P)
    out = torch.zeros(B, sum(h * wd for h, wd in shapes), dtype=w.dtype, device=w.device)
    start = 0
    for lvl, (h, wd) in enumerate(shapes):
        col, row = loc[:, :, lvl, :, 0] * wd, loc[:, :, lvl, :, 1] * h
        c0, r0 = col.floor(), row.floor()
        fc, fr = col - c0, row - r0
        for dc, dr, share in ((0, 0, (1 - fc) * (1 - fr)), (1, 0, fc * (1 - fr)), (0, 1, (1 - fc) * fr),
                              (1, 1, fc * fr)):
            c, r = (c0 + dc).long(), (r0 + dr).long()
            inside = (c >= 0) & (c < wd) & (r >= 0) & (r < h)
            index = start + (r.clamp(0, h - 1) * wd + c.clamp(0, wd - 1))
            out.scatter_add_(1, index.reshape(B, -1), (share * w[:, :, lvl] * inside).reshape(B, -1))
        start += h * wd
    return out


@torch.no_grad()
def top_count_targets(scores: Tensor, padding: Tensor, counts: Tensor) -> Tensor:
    """1.0 on each image's ``counts[i]`` highest-scoring non-padding tokens, 0 elsewhere: [B, S]."""
    ranked = scores.masked_fill(padding, scores.min() - 1)
    k = min(int(counts.max()), scores.shape[1])
    top = top_k(ranked, k)[1]  # ties to the lower index, whatever the CPU
    chosen = torch.arange(k, device=scores.device)[None] < counts[:, None]
    return torch.zeros_like(scores).scatter(1, top, chosen.to(scores.dtype))


def _token_centres(shapes: list[tuple[int, int]], strides: list[tuple[float, float]], offset: float,
                   device: torch.device) -> Tensor:
    """[S, 2] (x, y) pixel centres (index + offset) * stride per level, rounded once in float32 as
    the official code does (Salience DETR: half-integers times a float stride)."""
    centres = []
    for (h, w), (sy, sx) in zip(shapes, strides):
        ys, xs = torch.meshgrid((torch.arange(h, device=device, dtype=torch.float32) + offset) * sy,
                                (torch.arange(w, device=device, dtype=torch.float32) + offset) * sx, indexing="ij")
        centres.append(torch.stack([xs, ys], -1).view(-1, 2))
    return torch.cat(centres)


def _edge_distances(centres: Tensor, boxes: Tensor) -> Tensor:
    """[S, n, 4] distances (left, top, right, bottom) from each token centre to each box's edges."""
    x, y = centres[:, None, 0], centres[:, None, 1]
    return torch.stack([x - boxes[None, :, 0], y - boxes[None, :, 1], boxes[None, :, 2] - x, boxes[None, :, 3] - y], -1)


def _level_ranges(shapes: list[tuple[int, int]], ranges: list[list[float]], device: torch.device) -> Tensor:
    """[S, 2] the (low, high] box-size range owned by each token's level."""
    return torch.cat([host_tensor(r, device, torch.float32).expand(h * w, 2)
                      for (h, w), r in zip(shapes, ranges)])


def _per_image(boxes: list[Tensor], centres: Tensor, bounds: Tensor, target) -> Tensor:
    """Stack ``target(distances [S, n, 4], owned [S, n])`` over images; images without boxes get
    zeros. ``owned``: the token is strictly inside the box and the box's largest centre-to-edge
    distance lies in the token level's range (low, high]."""
    out = []
    for b in boxes:
        if b.numel() == 0:
            out.append(torch.zeros(centres.shape[0], device=centres.device))
            continue
        d = _edge_distances(centres, b.float())
        size = d.max(-1).values
        owned = (d.min(-1).values > 0) & (size > bounds[:, :1]) & (size <= bounds[:, 1:])
        out.append(target(d, owned))
    return torch.stack(out)


@torch.no_grad()
def foreground_targets(boxes: list[Tensor], shapes: list[tuple[int, int]], strides: list[int],
                       ranges: list[list[float]]) -> Tensor:
    """Focus-DETR: 1 where a token lies strictly inside a box whose largest centre-to-edge
    distance falls in its level's range (low, high], else 0. Token centres are
    (j * s + s // 2, i * s + s // 2) for stride s. Returns [B, S]."""
    device = boxes[0].device if boxes else torch.device("cpu")
    centres = torch.cat([_token_centres([shape], [(s, s)], 0.0, device) + s // 2 for shape, s in zip(shapes, strides)])
    return _per_image(boxes, centres, _level_ranges(shapes, ranges, device), lambda d, owned: owned.any(1).float())


@torch.no_grad()
def salience_targets(boxes: list[Tensor], shapes: list[tuple[int, int]], padded_size: tuple[int, int],
                     ranges: list[list[float]]) -> Tensor:
    """Salience DETR: for a token inside box g, 1 - 0.5 * sqrt(((l - r) / (l + r))^2 + ((t - b) / (t + b))^2)
    (1 at the centre, 0.5 at edge midpoints); the max over boxes, kept only where the token is
    inside some box whose largest centre-to-edge distance is in its level's range (low, high].
    Token centres are ((j + 0.5) * W / W_l, (i + 0.5) * H / H_l). Returns [B, S]."""
    H, W = padded_size
    device = boxes[0].device if boxes else torch.device("cpu")
    centres = _token_centres(shapes, [(H / h, W / w) for h, w in shapes], 0.5, device)

    def salience(d: Tensor, owned: Tensor) -> Tensor:
        l, t, r, b = d.unbind(-1)
        off = ((l - r) / (l + r)).square() + ((t - b) / (t + b)).square()
        conf = torch.where(d.min(-1).values > 0, 1 - 0.5 * off.sqrt(), torch.zeros_like(l))
        return conf.max(1).values * owned.any(1)

    return _per_image(boxes, centres, _level_ranges(shapes, ranges, device), salience)


def attention_map_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Sparse DETR: binary cross-entropy averaged over tokens, then over images."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(1).mean()


def foreground_loss(logits: Tensor, target: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Focus-DETR: focal loss summed over each image's tokens (padding included, target 0),
    divided by that image's positives (at least 1), averaged over images."""
    per_image = torch.stack([sigmoid_focal_loss(lg, tg, alpha, gamma) for lg, tg in zip(logits, target)])
    return (per_image / target.sum(1).clamp(min=1)).mean()


def salience_loss(logits: Tensor, target: Tensor, alpha: float = 0.25, gamma: float = 2.0,
                  num_pos: float | None = None) -> Tensor:
    """Salience DETR: focal loss with soft targets, weight alpha * t * (1 - p)^gamma +
    (1 - alpha) * (1 - t) * p^gamma (not detached, as official), summed and divided by the
    batch's count of tokens with a positive target (``num_pos`` where given: under torchrun the
    mean count over processes), at least 1."""
    p = logits.sigmoid()
    weight = alpha * target * (1 - p) ** gamma + (1 - alpha) * (1 - target) * p ** gamma
    loss = weight * F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if num_pos is None:
        return loss.sum() / (target > 0).sum().clamp(min=1)
    return loss.sum() / max(num_pos, 1.0)


def single_process(value: float, device: torch.device) -> float:
    """The mean over a group of one process: the value itself."""
    return value


@dataclass
class SelectionSupervision:
    """A token scorer's supervision, as the encoder class that owns the scorer declares it
    (``supervision``): called with the encoder's ``TokenSelection``, the decoder's sampling
    (locations, weights; recorded in training when the encoder ``needs`` the decoder's sampling) and the
    targets ({"labels", "boxes": normalised cxcywh of the unpadded image}), it returns the
    ``loss_select`` term. mean_over_processes averages a normaliser over a torchrun group."""

    loss: LossConfig
    label_ranges: list[list[float]]
    mean_over_processes: Callable[[float, torch.device], float] = single_process

    @staticmethod
    def pixel_boxes(selection: TokenSelection, targets: list[dict]) -> list[Tensor]:
        """Each image's boxes as xyxy pixels of the padded input (the unpadded image at its top-left)."""
        out = []
        for t, size in zip(targets, selection.image_sizes):
            h, w = size.to(t["boxes"].dtype).unbind()
            out.append(cxcywh_to_xyxy(t["boxes"]) * torch.stack([w, h, w, h]))
        return out


class AttentionMapSupervision(SelectionSupervision):
    """Sparse DETR: the scorer predicts each image's top-count tokens of the decoder's attention map."""

    def __call__(self, selection: TokenSelection, sampling: tuple[Tensor, Tensor] | None,
                 targets: list[dict]) -> Tensor:
        if sampling is None:
            raise ValueError("Sparse DETR's selection loss needs the decoder's sampling (train mode)")
        logits, padding = selection.token_logits.float(), selection.padding
        locations, weights = sampling
        dam = decoder_attention_map(locations.float(), weights.float(), selection.shapes)
        target = top_count_targets(dam, padding, selection.layers[0].counts)
        return attention_map_loss(logits.masked_fill(padding, logits.min()), target)


class ForegroundSupervision(SelectionSupervision):
    """Focus-DETR: per-level foreground labels of the boxes' sizes."""

    def __call__(self, selection: TokenSelection, sampling: tuple[Tensor, Tensor] | None,
                 targets: list[dict]) -> Tensor:
        H, _ = selection.padded_size
        strides = [2 ** round(math.log2(H / h)) for h, _ in selection.shapes]
        target = foreground_targets(self.pixel_boxes(selection, targets), selection.shapes, strides, self.label_ranges)
        return foreground_loss(selection.token_logits.float(), target, self.loss.focal_alpha, self.loss.focal_gamma)


class SalienceSupervision(SelectionSupervision):
    """Salience DETR: scale-independent salience of each token inside its level's boxes."""

    def __call__(self, selection: TokenSelection, sampling: tuple[Tensor, Tensor] | None,
                 targets: list[dict]) -> Tensor:
        logits = selection.token_logits.float()
        target = salience_targets(self.pixel_boxes(selection, targets), selection.shapes, selection.padded_size,
                                  self.label_ranges)
        # Normalised like the box terms: by the mean positive count over processes (the other two
        # kinds average per image, which DDP's gradient mean keeps).
        num_pos = self.mean_over_processes(float((target > 0).sum()), logits.device)
        return salience_loss(logits, target, self.loss.focal_alpha, self.loss.focal_gamma, num_pos)
