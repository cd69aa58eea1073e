"""Class and box heads per decoder layer, the predictions they make, and top-k post-processing."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import SparsedetError
from ..nn.init import keep_own_init
from ..nn.mlp import MLP
from ..ops.boxes import cxcywh_to_xyxy
from ..ops.functional import apply_box_delta
from ..ops.functional import top_k as best
from .decoders import DecoderOutput

PRIOR_PROB = 0.01


@dataclass
class Predictions:
    """One set of queries' detections: logits [B, N, C] (sigmoid, no background column) and boxes
    [B, N, 4] (normalised cxcywh of the unpadded image)."""

    logits: Tensor
    boxes: Tensor

    def float(self) -> "Predictions":
        return dataclasses.replace(self, logits=self.logits.float(), boxes=self.boxes.float())


@dataclass
class ProposalPredictions(Predictions):
    """The two-stage proposals' predictions. class_agnostic: trained with every target as class 0
    (Deformable DETR's two-stage), else with the targets' classes."""

    class_agnostic: bool = False


@dataclass
class DenoisingPredictions(Predictions):
    """Every decoder layer's predictions for the denoising queries: logits [L, B, D, C], boxes
    [L, B, D, 4]; queries: the ``DenoisingQueries`` that made them (they define the matching)."""

    queries: Any = None


class PredictionHeads(nn.Module):
    """``class_embed[k]`` (Linear) and ``box_embed[k]`` (3-layer MLP) for each decoder layer,
    or one pair shared by all layers (``shared=True``)."""

    def __init__(self, dim: int, num_classes: int, num_layers: int, shared: bool, initial_size_bias: float):
        super().__init__()
        n = 1 if shared else num_layers
        self.num_layers = num_layers
        self.class_embed = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(n))
        self.box_embed = nn.ModuleList(MLP(dim, dim, 4, 3, fp32=True) for _ in range(n))
        for cls, box in zip(self.class_embed, self.box_embed):
            nn.init.constant_(cls.bias, -math.log((1 - PRIOR_PROB) / PRIOR_PROB))
            nn.init.zeros_(box.layers[-1].weight)
            nn.init.zeros_(box.layers[-1].bias)
        # Small initial boxes (sigmoid(-2) ~ 0.12) for the first layer's head only.
        nn.init.constant_(self.box_embed[0].layers[-1].bias[2:], initial_size_bias)
        keep_own_init(self)

    def box_head(self, layer: int) -> nn.Module:
        return self.box_embed[layer if len(self.box_embed) > 1 else 0]

    def class_head(self, layer: int) -> nn.Module:
        return self.class_embed[layer if len(self.class_embed) > 1 else 0]

    def forward(self, decoded: DecoderOutput, eps: float) -> tuple[Tensor, Tensor]:
        """The decoder's queries and references per layer -> logits [L, B, Q, C], boxes [L, B, Q, 4]
        (normalised cxcywh). A layer's queries may be a pair (features for the class head, features
        for the box head): SD-DETR's two task streams."""
        logits, boxes = [], []
        for lid, (h, ref) in enumerate(zip(decoded.hidden, decoded.references)):
            h_cls, h_box = h if isinstance(h, tuple) else (h, h)
            logits.append(self.class_head(lid)(h_cls))
            boxes.append(apply_box_delta(self.box_head(lid)(h_box), ref, eps))
        return torch.stack(logits), torch.stack(boxes)


@torch.no_grad()
def postprocess(logits: Tensor, boxes: Tensor, sizes: Tensor, top_k: int = 100,
                threshold: float = 0.0) -> list[dict[str, Tensor]]:
    """Top-k over queries x classes; the one post-processing that prediction, the API, evaluation
    and visualisation share.

    Args:
        logits: [B, Q, C]; boxes: [B, Q, 4] normalised cxcywh of the (unpadded) image.
        sizes: [B, 2] target sizes as (height, width) in pixels.
        threshold: minimum score, in [0, 1].
    Returns:
        per image {"boxes": [k, 4] xyxy pixels clipped to the image (0 <= x <= width, 0 <= y <= height),
        "scores": [k], "labels": [k]}, sorted by score.
    """
    check_threshold(threshold)
    return above_threshold(*top_detections(logits, boxes, sizes, top_k), threshold)


def above_threshold(xyxy: Tensor, scores: Tensor, labels: Tensor, threshold: float) -> list[dict[str, Tensor]]:
    """Per image, the detections of ``top_detections``' fixed-shape output scored above ``threshold``."""
    return [{"boxes": xyxy[b][keep], "scores": scores[b][keep], "labels": labels[b][keep]}
            for b, keep in enumerate(scores > threshold)]


def top_detections(logits: Tensor, boxes: Tensor, sizes: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The fixed-shape part of ``postprocess`` (what an exported model computes): the best
    min(top_k, Q * C) (query, class) pairs per image as boxes [B, k, 4] xyxy pixels clipped to the
    image, scores [B, k] and labels [B, k] (column indices), sorted by score."""
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
