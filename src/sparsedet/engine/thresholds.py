"""Score thresholds: the one a run records at the end of training (chosen on its val split), the one
a verb uses (the user's, else the run's, else the verb's default), and what to say when a threshold
leaves every image without a detection.

The rule (:func:`choose_threshold`): the val detections of the final evaluation scored at least
``MIN_SCORE`` are matched to the ground truth per image, greedily by decreasing score, each to the
unmatched box of its own class with the highest IoU (at least 0.5), as ``engine.confusion`` matches.
Pooled over images and classes, the detections scored at least ``s`` give precision and recall and
their F1 = 2·TP / (detections + ground-truth boxes); the cut with the highest F1 wins (on a tie, the
higher one). The threshold lies halfway between the lowest score kept and the highest left out, so
``score > t`` (predict) and ``score >= t`` (the confusion matrix) keep the same detections, and is
clamped to ``[MIN_SCORE, MAX_SCORE]``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..models.postprocess import check_threshold
from .confusion import match_image, per_image

# Bounds of a recorded threshold: below 0.05 a drawing fills with noise; above 0.9 a model sure of its
# val split would hide the slightly less sure detections of new images.
MIN_SCORE, MAX_SCORE = 0.05, 0.9
PREDICT_DEFAULT = 0.5  # predict, the API, videos, ONNX files and the confusion matrix, for runs without one


@dataclass(frozen=True)
class ThresholdChoice:
    """The recorded threshold and the val figures at it (fractions)."""

    threshold: float
    f1: float
    precision: float
    recall: float

    def describe(self) -> str:
        return (f"score threshold {self.threshold:.3f} (model.score_threshold): the best F1 ({self.f1:.3f}: "
                f"precision {self.precision:.3f}, recall {self.recall:.3f}) of the val detections matched to "
                f"ground truth at IoU 0.5, over all classes, within [{MIN_SCORE}, {MAX_SCORE}]")


def choose_threshold(gt: dict, detections: list[dict], iou: float = 0.5) -> ThresholdChoice | None:
    """The threshold by the module's rule for COCO-results ``detections`` (bbox xywh pixels, category
    ids, "score") against the COCO ground-truth dict ``gt``; None when no detection scored at least
    ``MIN_SCORE`` matches a box (nothing to choose from)."""
    images, _ = per_image(gt, detections)
    scores, hits, boxes_total = [], [], 0
    for gt_boxes, gt_labels, boxes, image_scores, labels in images:
        boxes_total += len(gt_labels)
        keep = image_scores >= MIN_SCORE
        boxes, image_scores, labels = boxes[keep], image_scores[keep], labels[keep]
        # Greedy by score: a detection's first-pass (own class) match depends only on the detections
        # scored above it, so one matching serves every cut.
        pairs, _, _ = match_image(gt_boxes, gt_labels, boxes, image_scores, labels, iou)
        hit = torch.zeros(len(image_scores), dtype=torch.bool)
        hit[torch.tensor([d for d, g in pairs if labels[d] == gt_labels[g]], dtype=torch.long)] = True
        scores.append(image_scores)
        hits.append(hit)
    scores = torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float64)
    if not len(scores) or boxes_total == 0:
        return None
    order = torch.argsort(scores, descending=True, stable=True)
    scores, true_positives = scores[order], torch.cumsum(torch.cat(hits)[order].double(), 0)
    # Cuts fall between distinct scores: after the last of each run of equal scores.
    cut = torch.ones(len(scores), dtype=torch.bool)
    cut[:-1] = scores[:-1] != scores[1:]
    kept = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    f1 = torch.where(cut, 2 * true_positives / (kept + boxes_total), torch.tensor(-1.0, dtype=torch.float64))
    best = int(torch.argmax(f1))  # the first maximum: the highest cut
    if true_positives[best] == 0:
        return None
    below = float(scores[best + 1]) if best + 1 < len(scores) else MIN_SCORE
    threshold = min(max((float(scores[best]) + below) / 2, MIN_SCORE), MAX_SCORE)
    tp = float(true_positives[best])
    return ThresholdChoice(threshold, float(f1[best]), tp / float(kept[best]), tp / boxes_total)


@dataclass(frozen=True)
class Threshold:
    """The minimum score a verb uses and where it comes from (for the user's eyes)."""

    value: float
    origin: str

    @classmethod
    def of(cls, given: float | None, model: ModelConfig | None, default: float) -> "Threshold":
        """``given`` (checked to be a score), else the run's recorded ``model.score_threshold``, else
        ``default``."""
        if given is not None:
            check_threshold(given)
            return cls(given, "given")
        recorded = model.score_threshold if model is not None else None
        if recorded is not None:
            return cls(recorded, "the run's, chosen on its val split")
        return cls(default, "the default" + (": none recorded" if model is not None else ""))

    def __str__(self) -> str:
        return f"{self.value:.3g} ({self.origin})"


def keep_above(det: dict, threshold: float) -> dict:
    """A detections dict ("boxes", "scores", "labels" tensors and optional "names" list) with only the
    detections scored above ``threshold``."""
    keep = det["scores"] > threshold
    out = {k: v[keep] for k, v in det.items() if isinstance(v, torch.Tensor)}
    if "names" in det:
        out["names"] = [name for name, kept in zip(det["names"], keep.tolist()) if kept]
    return out


def nothing_shown(threshold: Threshold, best: float | None, where: str, flag: str) -> str:
    """The hint for a threshold that left ``where`` ("4 images") without a detection: the best score
    seen and a value of ``flag`` (the option that sets the threshold) that would show some."""
    if best is None:
        return f"no detections on {where}: the model returned none at any score"
    lower = max(0.0, (math.ceil(round(best * 100, 6)) - 1) / 100)  # two decimals, strictly below the best
    return (f"no detection passed the score threshold {threshold} on {where}; the best score was {best:.3f}, "
            f"so {flag} {lower:g} would show some")
