"""Box conversions, IoU/GIoU and NMS in plain PyTorch.

Conventions: ``cxcywh`` is (centre x, centre y, width, height); ``xyxy`` is
(x1, y1, x2, y2). Both may be normalised to [0, 1] or in pixels; functions
here do not care as long as inputs agree.
"""
from __future__ import annotations

import torch
from torch import Tensor


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Area of xyxy boxes, shape [..., 4] -> [...]."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _inter_union(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return inter, union


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU of xyxy boxes: [N, 4] x [M, 4] -> [N, M]."""
    inter, union = _inter_union(a, b)
    return inter / union.clamp(min=1e-12)


def generalized_box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise generalised IoU of xyxy boxes: [N, 4] x [M, 4] -> [N, M] in [-1, 1]."""
    inter, union = _inter_union(a, b)
    iou = inter / union.clamp(min=1e-12)
    lt = torch.minimum(a[:, None, :2], b[None, :, :2])
    rb = torch.maximum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / hull.clamp(min=1e-12)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression; returns kept indices sorted by score (descending).

    Pure PyTorch: the IoU matrix is computed once, then suppression runs over the
    sorted order. A box is dropped when its IoU with a kept higher-scoring box is
    strictly greater than ``iou_threshold`` (torchvision's convention).
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    order = scores.argsort(descending=True, stable=True)
    iou = box_iou(boxes[order], boxes[order])
    n = order.numel()
    keep = torch.ones(n, dtype=torch.bool, device=boxes.device)
    overlaps = (iou > iou_threshold).triu(diagonal=1)
    # Host loop over candidates: suppression is inherently sequential.
    overlaps_cpu = overlaps.cpu()
    keep_cpu = keep.cpu()
    for i in range(n):
        if keep_cpu[i]:
            keep_cpu &= ~overlaps_cpu[i]
    return order[keep_cpu.to(boxes.device)]


def batched_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """NMS applied independently within each group id (e.g. class or image)."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    # Offset boxes per group so that boxes of different groups never overlap.
    span = boxes.max() - boxes.min() + 1
    shifted = boxes + (groups.to(boxes) * span)[:, None]
    return nms(shifted, scores, iou_threshold)


def cell_nms(level: Tensor, x: Tensor, y: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS of candidates given best first, each the box of 3 x 3 cells around its integer
    cell (``x``, ``y``) on feature level ``level``: a bool mask of the kept ones.

    The same decisions as ``batched_nms`` over the boxes (x - 1, y - 1, x + 1, y + 1) grouped by
    level (Salience DETR's proposal filter), in O(n): two such boxes overlap only when their
    cells are neighbours, so each candidate looks up its 8 neighbours among the kept cells
    instead of filling an n x n IoU matrix (benchmarks/proposal_nms.py)."""
    suppressing = []  # neighbour offsets whose boxes overlap by IoU > iou_threshold (float32, as box_iou)
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            inter = (2 - abs(dx)) * (2 - abs(dy))
            if (dx or dy) and torch.tensor(inter / (8 - inter), dtype=torch.float32) > iou_threshold:
                suppressing.append((dx, dy))
    kept_cells: set[tuple[int, int, int]] = set()
    keep = []
    for lvl, cx, cy in zip(level.tolist(), x.tolist(), y.tolist()):
        free = not any((lvl, cx + dx, cy + dy) in kept_cells for dx, dy in suppressing)
        keep.append(free)
        if free:
            kept_cells.add((lvl, cx, cy))
    return torch.tensor(keep, dtype=torch.bool, device=level.device)


@torch.library.custom_op("sparsedet::cell_nms", mutates_args=())
def cell_nms_batch(level: Tensor, x: Tensor, y: Tensor, iou_threshold: float) -> Tensor:
    """``cell_nms`` per image of [B, n] candidates (best first) -> kept [B, n] bool. One graph
    node, so that export can replace it by ONNX NonMaxSuppression (tools/export.py). Runs on the
    host: from a GPU, one copy of the whole batch there and one asynchronous copy back."""
    if level.shape[0] == 0:
        return torch.zeros_like(level, dtype=torch.bool)
    cells = torch.stack([t.long() for t in (level, x, y)]).cpu()
    keep = torch.stack([cell_nms(cells[0, b], cells[1, b], cells[2, b], iou_threshold) for b in range(level.shape[0])])
    return keep.to(level.device, non_blocking=True)


@cell_nms_batch.register_fake
def _(level: Tensor, x: Tensor, y: Tensor, iou_threshold: float) -> Tensor:
    return torch.empty_like(level, dtype=torch.bool)
