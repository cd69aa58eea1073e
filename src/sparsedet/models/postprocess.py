"""Raw outputs -> detections: the one post-processing that predict, eval, viz and export run.

Top-k over queries x classes in fp32, boxes scaled to each image's pixels and clipped to it;
columns that name no category (COCO's 11 unused ids) never become detections.
"""
from __future__ import annotations

import numbers

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..data.categories import unused_columns
from ..errors import SparsedetError
from ..ops.boxes import cxcywh_to_xyxy
from ..ops.functional import host_tensor, top_k as best


class PostProcess(nn.Module):
    """Reads ``top_k`` and the class table from the model's config when called (no state)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config

    def forward(self, logits: Tensor, boxes: Tensor, sizes: Tensor, top_k: int | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
        """The fixed-shape part (what an exported model computes). logits [B, Q, C], boxes [B, Q, 4]
        normalised cxcywh, sizes [B, 2] (height, width) -> boxes [B, k, 4] xyxy pixels, scores [B, k],
        labels [B, k] (column indices), sorted by score; k = min(top_k, Q * C)."""
        logits = logits.float()  # bf16 pixel coordinates are off by up to 4 px at 1000 px
        unused = unused_columns(self.config.classes)
        if unused:
            logits = logits.index_fill(-1, host_tensor(unused, logits.device), float("-inf"))
        return top_detections(logits, boxes.float(), sizes, top_k or self.config.top_k)

    @torch.no_grad()
    def detections(self, logits: Tensor, boxes: Tensor, sizes: Tensor, top_k: int | None = None,
                   threshold: float = 0.0) -> list[dict[str, Tensor]]:
        """Per image {"boxes": [k, 4] xyxy pixels clipped to the image (0 <= x <= width,
        0 <= y <= height), "scores": [k], "labels": [k]} of the top-k scored above ``threshold``
        (in [0, 1]), sorted by score."""
        check_threshold(threshold)
        return above_threshold(*self(logits, boxes, sizes, top_k), threshold)


def above_threshold(xyxy: Tensor, scores: Tensor, labels: Tensor, threshold: float) -> list[dict[str, Tensor]]:
    """Per image, the detections of ``top_detections``' fixed-shape output scored above ``threshold``."""
    return [{"boxes": xyxy[b][keep], "scores": scores[b][keep], "labels": labels[b][keep]}
            for b, keep in enumerate(scores > threshold)]


def top_detections(logits: Tensor, boxes: Tensor, sizes: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The best min(top_k, Q * C) (query, class) pairs per image as boxes [B, k, 4] xyxy pixels
    clipped to the image, scores [B, k] and labels [B, k] (column indices), sorted by score."""
    C = logits.shape[-1]
    prob = logits.sigmoid().flatten(1)
    scores, idx = best(prob, min(top_k, prob.shape[1]))
    query, labels = idx // C, idx % C
    picked = torch.gather(boxes, 1, query[..., None].expand(-1, -1, 4))
    h, w = sizes.unbind(-1)
    scale = torch.stack([w, h, w, h], -1).to(picked.dtype)[:, None]
    return clip_to_image(cxcywh_to_xyxy(picked) * scale, scale), scores, labels


def clip_to_image(xyxy: Tensor, scale: Tensor) -> Tensor:
    """Clip xyxy pixel boxes [..., 4] to the image: ``scale`` is (width, height, width, height),
    broadcastable to ``xyxy``. Elementwise min/max only, so that it traces and exports as it is."""
    return torch.minimum(xyxy.clamp(min=0), scale)


def check_threshold(threshold: float) -> None:
    """Scores are sigmoid probabilities: a threshold outside [0, 1] keeps everything or nothing."""
    if not 0.0 <= threshold <= 1.0:  # also refuses NaN
        raise SparsedetError(f"threshold must be a score in [0, 1], got {threshold}; e.g. 0.5 (0 keeps the "
                             "top-k detections whatever their score)")


def check_top_k(top_k: int | None) -> None:
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise SparsedetError(f"top_k must be a whole number of at least 1 (or None: config.top_k), got {top_k!r}")


def with_names(detections: list[dict], classes: list[str]) -> list[dict]:
    """The detection dicts, each given "names": the class name of each of its "labels"."""
    for det in detections:
        det["names"] = [classes[label] for label in det["labels"].tolist()]
    return detections
