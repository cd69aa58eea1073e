"""Set-prediction losses: sigmoid focal classification, L1 and GIoU box terms.

Terms are named like the community's: ``loss_cls``, ``loss_bbox``, ``loss_giou`` for the final
layer, suffixed ``_0 .. _{L-2}`` for earlier decoder layers, ``_enc`` for the two-stage encoder
predictions and ``_dn`` (``_dn_{i}``) for denoising queries. Each term is a sum over boxes
divided by the number of ground-truth boxes in the batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import LossConfig
from ..ops.boxes import cxcywh_to_xyxy, generalized_box_iou
from .matcher import HungarianMatcher


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Sum of the focal loss over all elements (logits and targets of the same shape)."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.sum()


class SetCriterion:
    def __init__(self, num_classes: int, config: LossConfig):
        self.num_classes, self.cfg = num_classes, config
        self.matcher = HungarianMatcher(config.match_cls, config.match_bbox, config.match_giou,
                                        config.focal_alpha, config.focal_gamma)
        self.weights = {"loss_cls": config.cls_weight, "loss_bbox": config.bbox_weight,
                        "loss_giou": config.giou_weight}

    def __call__(self, outputs, targets: list[dict]) -> dict[str, Tensor]:
        """outputs: ``DetectorOutput``; targets: per image {"labels", "boxes" (normalised cxcywh)}.
        Returns unweighted terms; ``total`` combines them."""
        num_boxes = max(float(sum(len(t["labels"]) for t in targets)), 1.0)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            n = torch.tensor([num_boxes], device=outputs.logits.device)
            torch.distributed.all_reduce(n)
            num_boxes = max(n.item() / torch.distributed.get_world_size(), 1.0)
        sets = [(outputs.logits, outputs.boxes, targets, "")]
        sets += [(a["logits"], a["boxes"], targets, f"_{i}") for i, a in enumerate(outputs.aux)]
        if outputs.enc is not None:
            # Deformable DETR's two-stage proposals are class-agnostic: every target is class 0.
            enc_targets = ([{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
                           if outputs.enc.get("binary") else targets)
            sets.append((outputs.enc["logits"], outputs.enc["boxes"], enc_targets, "_enc"))
        matches = self.matcher.match_many([s[:3] for s in sets])
        losses = {}
        for (logits, boxes, tg, suffix), match in zip(sets, matches):
            losses.update({k + suffix: v for k, v in self._terms(logits, boxes, tg, match, num_boxes).items()})
        if outputs.dn is not None:
            dn = outputs.dn
            match = _dn_match(targets, dn["queries"])
            norm = num_boxes * dn["queries"].num_groups
            L = dn["logits"].shape[0]
            for i in range(L):
                suffix = "_dn" if i == L - 1 else f"_dn_{i}"
                terms = self._terms(dn["logits"][i], dn["boxes"][i], targets, match, norm)
                losses.update({k + suffix: v for k, v in terms.items()})
        return losses

    def _terms(self, logits: Tensor, boxes: Tensor, targets: list[dict], match, num_boxes: float) -> dict[str, Tensor]:
        B, Q, C = logits.shape
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(match)]).to(logits.device)
        src_idx = torch.cat([src for src, _ in match]).to(logits.device)
        tgt_labels = torch.cat([t["labels"][tgt.to(t["labels"].device)] for t, (_, tgt) in zip(targets, match)])
        tgt_boxes = torch.cat([t["boxes"][tgt.to(t["boxes"].device)] for t, (_, tgt) in zip(targets, match)])
        tgt_labels, tgt_boxes = tgt_labels.to(logits.device), tgt_boxes.to(boxes.device)
        onehot = torch.zeros(B, Q, C, dtype=logits.dtype, device=logits.device)
        onehot[batch_idx, src_idx, tgt_labels] = 1.0
        loss_cls = sigmoid_focal_loss(logits, onehot, self.cfg.focal_alpha, self.cfg.focal_gamma) / num_boxes
        matched = boxes[batch_idx, src_idx]
        if matched.numel() == 0:
            zero = boxes.sum() * 0.0
            return {"loss_cls": loss_cls, "loss_bbox": zero, "loss_giou": zero}
        loss_bbox = F.l1_loss(matched, tgt_boxes, reduction="sum") / num_boxes
        giou = torch.diag(generalized_box_iou(cxcywh_to_xyxy(matched), cxcywh_to_xyxy(tgt_boxes)))
        loss_giou = (1 - giou).sum() / num_boxes
        return {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def total(self, losses: dict[str, Tensor]) -> Tensor:
        """Weighted sum of all terms (each term's weight is that of its base name)."""
        return sum(self.weights[_base(k)] * v for k, v in losses.items())


def _base(key: str) -> str:
    for base in ("loss_cls", "loss_bbox", "loss_giou"):
        if key.startswith(base):
            return base
    raise KeyError(key)


def _dn_match(targets: list[dict], dn) -> list[tuple[Tensor, Tensor]]:
    """Positive denoising slot g*2P + j is supervised by ground truth j (no matching)."""
    out = []
    for t in targets:
        n = len(t["labels"])
        groups = torch.arange(dn.num_groups)[:, None] * 2 * dn.group_size
        out.append(((groups + torch.arange(n)[None]).flatten(), torch.arange(n).repeat(dn.num_groups)))
    return out
