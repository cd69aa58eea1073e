"""Detection confusion matrix with a background row and column.

``matrix[p, t]`` counts detections predicted as class ``p`` whose ground truth is class ``t``;
index ``C`` (the last row and column, C = number of classes) is *background*:

* ``matrix[p, C]`` (background column): detections of class ``p`` that match no ground-truth box
  (false positives);
* ``matrix[C, t]`` (background row): ground-truth boxes of class ``t`` that no detection matches
  (missed objects);
* ``matrix[C, C]`` is always 0.

Only detections scored at least ``score_threshold`` take part. Matching is per image, greedy in
order of decreasing score, and class-aware: a detection first takes the still unmatched ground-truth
box *of its own class* with the highest IoU (if that IoU >= ``iou_threshold``); the detections left
over then take, again by decreasing score, the unmatched box of *any* class with the highest IoU
(>= ``iou_threshold``), which puts class confusions off the diagonal. Each ground-truth box matches
at most one detection. Crowd annotations (``iscrowd``) are left out.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from torch import Tensor

from ..errors import SparsedetError
from ..ops.boxes import box_iou


def match_image(gt_boxes: Tensor, gt_labels: Tensor, boxes: Tensor, scores: Tensor, labels: Tensor,
                iou_threshold: float = 0.5) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """One image's matching (see the module docstring). Boxes are xyxy in one frame (pixels or
    normalised); labels are class indices. Returns ((detection, ground truth) index pairs, unmatched
    detection indices, unmatched ground-truth indices)."""
    iou = box_iou(boxes.reshape(-1, 4).double(), gt_boxes.reshape(-1, 4).double())  # [D, G]
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    gt_free = torch.ones(len(gt_boxes), dtype=torch.bool)
    pairs: list[tuple[int, int]] = []
    unmatched = list(order)
    for same_class in (True, False):
        left = []
        for d in unmatched:
            allowed = gt_free & (gt_labels == labels[d]) if same_class else gt_free
            candidates = torch.where(allowed, iou[d], torch.tensor(-1.0, dtype=iou.dtype))
            g = int(candidates.argmax()) if len(candidates) else -1
            if g >= 0 and candidates[g] >= iou_threshold:
                gt_free[g] = False
                pairs.append((d, g))
            else:
                left.append(d)
        unmatched = left
    return pairs, unmatched, torch.nonzero(gt_free).flatten().tolist()


def add_image(matrix: np.ndarray, gt_boxes: Tensor, gt_labels: Tensor, boxes: Tensor, scores: Tensor,
              labels: Tensor, score_threshold: float = 0.5, iou_threshold: float = 0.5) -> None:
    """Count one image into ``matrix`` [C + 1, C + 1] (rows predicted, columns true, last = background)."""
    keep = scores >= score_threshold
    boxes, scores, labels = boxes.reshape(-1, 4)[keep], scores[keep], labels[keep]
    pairs, false_positives, missed = match_image(gt_boxes, gt_labels, boxes, scores, labels, iou_threshold)
    background = matrix.shape[0] - 1
    for d, g in pairs:
        matrix[int(labels[d]), int(gt_labels[g])] += 1
    for d in false_positives:
        matrix[int(labels[d]), background] += 1
    for g in missed:
        matrix[background, int(gt_labels[g])] += 1


def confusion_from_coco(gt: dict, detections: list[dict], score_threshold: float = 0.5,
                        iou_threshold: float = 0.5) -> tuple[np.ndarray, list[str]]:
    """The confusion matrix [C + 1, C + 1] of COCO-results ``detections`` (bbox xywh pixels, category
    ids) against a COCO ground-truth dict, and the class names of its first C rows/columns (the
    categories in id order)."""
    if not 0.0 <= score_threshold <= 1.0:
        raise SparsedetError(f"the confusion matrix's score threshold must lie in [0, 1], got {score_threshold}")
    if not 0.0 < iou_threshold <= 1.0:
        raise SparsedetError(f"the confusion matrix's IoU threshold must lie in (0, 1], got {iou_threshold}")
    images, classes = per_image(gt, detections)
    matrix = np.zeros((len(classes) + 1, len(classes) + 1), dtype=np.int64)
    for gt_boxes, gt_labels, boxes, scores, labels in images:
        add_image(matrix, gt_boxes, gt_labels, boxes, scores, labels, score_threshold, iou_threshold)
    return matrix, classes


def per_image(gt: dict, detections: list[dict]) -> tuple[list[tuple[Tensor, ...]], list[str]]:
    """COCO-results ``detections`` beside a COCO ground-truth dict, image by image: (gt_boxes, gt_labels,
    boxes, scores, labels) per image (boxes xyxy pixels float64, labels indices of the categories in id
    order; crowd annotations left out), and those categories' names."""
    categories = sorted(gt["categories"], key=lambda c: c["id"])
    index = {c["id"]: k for k, c in enumerate(categories)}
    truth: dict = defaultdict(list)
    for ann in gt["annotations"]:
        if not ann.get("iscrowd", 0):
            truth[ann["image_id"]].append((ann["bbox"], index[ann["category_id"]]))
    found: dict = defaultdict(list)
    for det in detections:
        if det["category_id"] not in index:
            raise SparsedetError(f"detection category_id {det['category_id']!r} is not in the ground truth "
                                 f"(known ids: {sorted(index)})")
        found[det["image_id"]].append((det["bbox"], index[det["category_id"]], float(det["score"])))
    images = []
    for image_id in {img["id"] for img in gt["images"]} | set(found):
        boxes, labels = _columns([(box, label) for box, label, _ in found[image_id]])
        scores = torch.tensor([score for *_, score in found[image_id]], dtype=torch.float64)
        images.append((*_columns(truth[image_id]), boxes, scores, labels))
    return images, [str(c.get("name", c["id"])) for c in categories]


def _columns(items: list[tuple[list[float], int]]) -> tuple[Tensor, Tensor]:
    """xywh boxes with labels -> (xyxy [n, 4] float64, labels [n] long)."""
    xywh = torch.tensor([box for box, _ in items], dtype=torch.float64).reshape(-1, 4)
    return (torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1),
            torch.tensor([label for _, label in items], dtype=torch.long))
