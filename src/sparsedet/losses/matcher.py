"""Hungarian matching with the focal classification cost (Deformable DETR / DINO).

All prediction sets of a step (final layer, auxiliary layers, encoder) are costed on the
device and moved to the host in one transfer; scipy then solves each image's assignment.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ..ops.boxes import cxcywh_to_xyxy, generalized_box_iou


class HungarianMatcher:
    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 alpha: float = 0.25, gamma: float = 2.0):
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.alpha, self.gamma = alpha, gamma

    @torch.no_grad()
    def cost(self, logits: Tensor, boxes: Tensor, tgt_labels: Tensor, tgt_boxes: Tensor) -> Tensor:
        """logits [N, C], boxes [N, 4] cxcywh vs targets [T], [T, 4] -> cost [N, T]."""
        prob = logits.float().sigmoid()
        neg = (1 - self.alpha) * prob ** self.gamma * -(1 - prob + 1e-8).log()
        pos = self.alpha * (1 - prob) ** self.gamma * -(prob + 1e-8).log()
        c_cls = pos[:, tgt_labels] - neg[:, tgt_labels]
        c_box = torch.cdist(boxes.float(), tgt_boxes.float(), p=1)
        c_giou = -generalized_box_iou(cxcywh_to_xyxy(boxes.float()), cxcywh_to_xyxy(tgt_boxes.float()))
        return self.cost_bbox * c_box + self.cost_class * c_cls + self.cost_giou * c_giou

    @torch.no_grad()
    def match_many(self, sets: list[tuple[Tensor, Tensor, list[dict]]]) -> list[list[tuple[Tensor, Tensor]]]:
        """sets: (logits [B, Q, C], boxes [B, Q, 4], targets) per prediction set; the targets of
        all sets have the same boxes (labels may differ, e.g. class-agnostic encoder targets).
        Returns per set, per image (prediction indices, target indices)."""
        sizes = [len(t["labels"]) for t in sets[0][2]]
        if sum(sizes) == 0:
            empty = (torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))
            return [[empty for _ in sizes] for _ in sets]
        costs = []
        for logits, boxes, targets in sets:
            B, Q, _ = logits.shape
            tgt_labels = torch.cat([t["labels"] for t in targets])
            tgt_boxes = torch.cat([t["boxes"] for t in targets])
            costs.append(self.cost(logits.flatten(0, 1), boxes.flatten(0, 1), tgt_labels, tgt_boxes).view(B, Q, -1))
        host = [c.cpu().numpy() for c in costs]  # the one device->host transfer of the step
        bounds = np.cumsum([0] + sizes)
        results = []
        for c in host:
            per_image = []
            for b in range(len(sizes)):
                block = c[b, :, bounds[b]:bounds[b + 1]]
                if block.shape[1] == 0:
                    per_image.append((torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)))
                    continue
                block = np.nan_to_num(block, nan=1e6, posinf=1e6, neginf=-1e6)
                rows, cols = linear_sum_assignment(block)
                per_image.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
            results.append(per_image)
        return results
