"""Class and box heads per decoder layer, and the predictions they make."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..nn.init import keep_own_init
from ..nn.mlp import MLP
from ..ops.functional import apply_box_delta
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
