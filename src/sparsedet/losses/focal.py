"""Focal-style classification losses on sigmoid logits (summed; callers normalise)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Sum of the focal loss over all elements (logits and targets of the same shape)."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.sum()


def varifocal_loss(logits: Tensor, onehot: Tensor, quality: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """IoU-aware classification (Salience DETR, after VarifocalNet/RT-DETR), summed: the matched
    class's target is the prediction's IoU with its ground truth (``quality`` [B, Q], detached);
    negatives are down-weighted by (1 - alpha) * p^gamma."""
    target = onehot * quality[..., None]
    prob = logits.detach().sigmoid()
    weight = (1 - alpha) * prob.pow(gamma) * (1 - onehot) + target
    return F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum")


def aligned_loss(logits: Tensor, onehot: Tensor, quality: Tensor, alpha: float = 0.25, beta: float = 0.75,
                 gamma: float = 2.0) -> Tensor:
    """SD-DETR's task-alignment classification loss as we rebuild it (docs/methods.md, SD-DETR),
    summed: the matched class's target is score^alpha * IoU^beta (both detached), so a confident
    prediction is pushed up only as far as its box deserves; every element is weighted by
    |target - p|^gamma (quality-focal form), negatives have target 0."""
    prob = logits.detach().sigmoid()
    score = (prob * onehot).sum(-1)
    target = onehot * (score.clamp(min=1e-8).pow(alpha) * quality.clamp(min=0).pow(beta))[..., None]
    weight = (target - prob).abs().pow(gamma)
    return F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum")
