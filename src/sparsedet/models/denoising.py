"""Contrastive denoising queries (DINO): noised ground truth as extra decoder queries."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..ops.boxes import cxcywh_to_xyxy, xyxy_to_cxcywh
from ..ops.functional import inverse_sigmoid


@dataclass
class DenoisingQueries:
    """tgt: [B, D, C]; reference: [B, D, 4] in [0, 1]; attn_mask: [D + Q, D + Q] True = blocked;
    num_groups G and slots per half-group P (= max objects per image); D = 2 * P * G."""

    tgt: Tensor
    reference: Tensor
    attn_mask: Tensor
    num_groups: int
    group_size: int

    @property
    def num_queries(self) -> int:
        return self.tgt.shape[1]


class ContrastiveDenoising(nn.Module):
    """Builds positive (small noise) and negative (large noise) copies of every ground-truth box.

    Each group holds P positive slots then P negative slots; image b fills its first n_b slots
    of each half. Label noise flips a label to a random class with probability
    ``label_noise / 2``; box corners move by up to ``box_noise`` half-sizes (positives < 1,
    negatives in [1, 2)).
    """

    def __init__(self, num_classes: int, dim: int, num_queries: int = 100,
                 label_noise: float = 0.5, box_noise: float = 1.0, eps: float = 1e-3, spare_label: bool = True):
        """spare_label: one extra embedding row for unused slots (DINO); Focus-DETR and Salience
        DETR have exactly one row per class (unused slots are zeroed either way)."""
        super().__init__()
        self.label_enc = nn.Embedding(num_classes + int(spare_label), dim)
        self.num_classes, self.num_dn, self.eps = num_classes, num_queries, eps
        self.label_noise, self.box_noise = label_noise, box_noise

    def forward(self, targets: list[dict], num_matching: int) -> DenoisingQueries | None:
        counts = [len(t["labels"]) for t in targets]
        P = max(counts) if counts else 0
        if P == 0 or self.num_dn <= 0:
            return None
        G = max(1, self.num_dn // P)
        B, dev = len(targets), self.label_enc.weight.device
        D = 2 * P * G
        labels = torch.full((B, D), self.label_enc.num_embeddings - 1, dtype=torch.long, device=dev)
        boxes = torch.zeros(B, D, 4, device=dev)
        filled = torch.zeros(B, D, dtype=torch.bool, device=dev)
        negative = torch.zeros(B, D, dtype=torch.bool, device=dev)
        for b, t in enumerate(targets):
            n = counts[b]
            if n == 0:
                continue
            slots = (torch.arange(G, device=dev)[:, None] * 2 * P + torch.arange(n, device=dev)[None]).flatten()
            for half in (0, 1):
                s = slots + half * P
                labels[b, s] = t["labels"].to(dev).repeat(G)
                boxes[b, s] = t["boxes"].to(dev).repeat(G, 1)
                filled[b, s] = True
                negative[b, s] = bool(half)
        if self.label_noise > 0:
            flip = (torch.rand(B, D, device=dev) < self.label_noise * 0.5) & filled
            labels = torch.where(flip, torch.randint_like(labels, 0, self.num_classes), labels)
        if self.box_noise > 0:
            xyxy = cxcywh_to_xyxy(boxes)
            half_wh = boxes[..., 2:].repeat(1, 1, 2) / 2
            sign = torch.randint_like(boxes, 0, 2) * 2.0 - 1.0
            part = torch.rand_like(boxes) + negative[..., None].float()
            xyxy = (xyxy + sign * part * half_wh * self.box_noise).clamp(0.0, 1.0)
            boxes = torch.where(filled[..., None], xyxy_to_cxcywh(xyxy), boxes)
        tgt = self.label_enc(labels) * filled[..., None]
        # References go through logit space like the official code (padded slots sit at 0.5).
        reference = inverse_sigmoid(boxes, self.eps).masked_fill(~filled[..., None], 0.0).sigmoid()
        return DenoisingQueries(tgt, reference, self._attn_mask(D, num_matching, G, P, dev), G, P)

    @staticmethod
    def _attn_mask(D: int, Q: int, G: int, P: int, device) -> Tensor:
        mask = torch.zeros(D + Q, D + Q, dtype=torch.bool, device=device)
        mask[D:, :D] = True  # matching queries never see the answers
        for g in range(G):
            lo, hi = 2 * P * g, 2 * P * (g + 1)
            mask[lo:hi, :lo] = True
            mask[lo:hi, hi:D] = True
        return mask

