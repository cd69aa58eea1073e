"""Set-prediction losses: sigmoid focal classification, L1 and GIoU box terms.

Terms are named like the community's: ``loss_cls``, ``loss_bbox``, ``loss_giou`` for the final
layer, suffixed ``_0 .. _{L-2}`` for earlier decoder layers, ``_enc`` for the two-stage encoder
predictions, ``_enc_{i}`` for detection heads on encoder layers (Sparse DETR) and ``_dn``
(``_dn_{i}``) for denoising queries. Each term is a sum over boxes divided by the number of
ground-truth boxes in the batch. Sparse encoders add ``loss_select``, their scorer's supervision
(losses/selection.py).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import CLS_LOSSES, LossConfig, ModelConfig
from ..stage_kinds import encoder_class
from ..errors import SparsedetError
from ..ops.boxes import box_iou, cxcywh_to_xyxy, generalized_box_iou
from .focal import aligned_loss, sigmoid_focal_loss, varifocal_loss
from .matcher import HungarianMatcher
from .selection import SelectionSupervision, single_process


class SetCriterion:
    def __init__(self, num_classes: int, config: LossConfig, selection_loss: SelectionSupervision | None = None,
                 mean_over_processes: Callable[[float, torch.device], float] = single_process):
        """selection_loss: the supervision of a token-sparse encoder's scorer (its class declares it:
        ``supervision``); None for encoders that select nothing.
        mean_over_processes: averages a loss normaliser (box counts) over the processes of a torchrun
        group; the trainer passes its distributed context's."""
        if config.cls_loss not in CLS_LOSSES:  # a LossConfig built in Python skips config.validate
            raise SparsedetError(f"unknown classification loss {config.cls_loss!r}; set model.loss.cls_loss to "
                                 f"{', '.join(CLS_LOSSES[:-1])} or {CLS_LOSSES[-1]}")
        self.num_classes, self.cfg = num_classes, config
        self.selection_loss = selection_loss
        self.mean_over_processes = mean_over_processes
        self.matcher = HungarianMatcher(config.match_cls, config.match_bbox, config.match_giou,
                                        config.focal_alpha, config.focal_gamma)
        self.weights = {"loss_cls": config.cls_weight, "loss_bbox": config.bbox_weight,
                        "loss_giou": config.giou_weight, "loss_select": config.select_weight}

    @classmethod
    def for_model(cls, config: ModelConfig,
                  mean_over_processes: Callable[[float, torch.device], float] = single_process) -> "SetCriterion":
        """The criterion of a model config, with the selection loss its encoder kind declares."""
        supervision = encoder_class(config.encoder.kind).supervision
        selection_loss = (supervision(config.loss, config.encoder.label_ranges, mean_over_processes)
                          if supervision is not None else None)
        return cls(config.num_classes, config.loss, selection_loss, mean_over_processes)

    def __call__(self, outputs, targets: list[dict]) -> dict[str, Tensor]:
        """outputs: ``DetectorOutput``; targets: per image {"labels", "boxes" (normalised cxcywh)}.
        Returns unweighted terms; ``total`` combines them."""
        # Normalised by the mean box count per process over all processes (DDP then averages
        # gradients), so that N processes train like one process with N times the batch.
        num_boxes = self.mean_over_processes(float(sum(len(t["labels"]) for t in targets)), outputs.logits.device)
        num_boxes = max(num_boxes, 1.0)
        sets = [(outputs.logits, outputs.boxes, targets, "")]
        sets += [(a.logits, a.boxes, targets, f"_{i}") for i, a in enumerate(outputs.aux)]
        if outputs.enc is not None:
            # Deformable DETR's two-stage proposals are class-agnostic: every target is class 0.
            enc_targets = ([{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
                           if outputs.enc.class_agnostic else targets)
            sets.append((outputs.enc.logits, outputs.enc.boxes, enc_targets, "_enc"))
        sets += [(a.logits, a.boxes, targets, f"_enc_{i}") for i, a in enumerate(outputs.enc_aux)]
        matches = self.matcher.match_many([s[:3] for s in sets])
        losses = {}
        for (logits, boxes, tg, suffix), match in zip(sets, matches):
            losses.update({k + suffix: v for k, v in self._terms(logits, boxes, tg, match, num_boxes).items()})
        if outputs.dn is not None:
            dn = outputs.dn
            match = _dn_match(targets, dn.queries)
            norm = num_boxes * dn.queries.num_groups
            L = dn.logits.shape[0]
            for i in range(L):
                suffix = "_dn" if i == L - 1 else f"_dn_{i}"
                terms = self._terms(dn.logits[i], dn.boxes[i], targets, match, norm)
                losses.update({k + suffix: v for k, v in terms.items()})
        if outputs.selection is not None:
            if self.selection_loss is None:
                raise ValueError("the encoder selects tokens, but the criterion has no selection loss for it "
                                 "(build it with SetCriterion.for_model, or give the encoder class a supervision)")
            losses["loss_select"] = self.selection_loss(outputs.selection, outputs.sampling, targets)
        return losses

    def _terms(self, logits: Tensor, boxes: Tensor, targets: list[dict], match, num_boxes: float) -> dict[str, Tensor]:
        B, Q, C = logits.shape
        # The matches come from the host (the matcher's one transfer): copied without waiting for the device.
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(match)]).to(
            logits.device, non_blocking=True)
        src_idx = torch.cat([src for src, _ in match]).to(logits.device, non_blocking=True)
        tgt = [j.to(t["labels"].device, non_blocking=True) for t, (_, j) in zip(targets, match)]
        tgt_labels = torch.cat([t["labels"][j] for t, j in zip(targets, tgt)])
        tgt_boxes = torch.cat([t["boxes"][j.to(t["boxes"].device)] for t, j in zip(targets, tgt)])
        tgt_labels, tgt_boxes = tgt_labels.to(logits.device), tgt_boxes.to(boxes.device)
        onehot = torch.zeros(B, Q, C, dtype=logits.dtype, device=logits.device)
        onehot[batch_idx, src_idx, tgt_labels] = 1.0
        matched = boxes[batch_idx, src_idx]
        if self.cfg.cls_loss in ("varifocal", "aligned"):
            quality = torch.zeros(B, Q, dtype=logits.dtype, device=logits.device)
            if matched.numel():
                iou = box_iou(cxcywh_to_xyxy(matched), cxcywh_to_xyxy(tgt_boxes)).diagonal()
                quality[batch_idx, src_idx] = iou.detach().to(logits.dtype)
            if self.cfg.cls_loss == "varifocal":
                loss_cls = varifocal_loss(logits, onehot, quality, self.cfg.focal_alpha, self.cfg.focal_gamma)
            else:
                loss_cls = aligned_loss(logits, onehot, quality, self.cfg.align_alpha, self.cfg.align_beta,
                                        self.cfg.focal_gamma)
            loss_cls = loss_cls / num_boxes
        else:
            loss_cls = sigmoid_focal_loss(logits, onehot, self.cfg.focal_alpha, self.cfg.focal_gamma) / num_boxes
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
    for base in ("loss_cls", "loss_bbox", "loss_giou", "loss_select"):
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
