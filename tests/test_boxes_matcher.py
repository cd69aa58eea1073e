"""Box ops and Hungarian matching against hand-computed and brute-force answers."""
import itertools

import numpy as np
import pytest
import torch

from sparsedet.losses.matcher import HungarianMatcher
from sparsedet.ops.boxes import (batched_nms, box_iou, cell_nms, cxcywh_to_xyxy, generalized_box_iou, nms,
                                 xyxy_to_cxcywh)


def test_iou_and_giou_hand_computed():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [4.0, 0.0, 5.0, 1.0]])
    assert box_iou(a, b)[0, 0].item() == pytest.approx(1 / 7)
    # GIoU = IoU - (hull - union) / hull: hull 9, union 7 -> 1/7 - 2/9
    assert generalized_box_iou(a, b)[0, 0].item() == pytest.approx(1 / 7 - 2 / 9)
    # Disjoint: hull 0..5 x 0..2 = 10, union 5 -> -0.5
    assert generalized_box_iou(a, b)[0, 1].item() == pytest.approx(-0.5)
    x = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    torch.testing.assert_close(xyxy_to_cxcywh(cxcywh_to_xyxy(x)), x)


def test_nms_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(40, 2, generator=g) * 10
    boxes = torch.cat([xy, xy + torch.rand(40, 2, generator=g) * 4 + 0.5], 1)
    scores = torch.rand(40, generator=g)
    keep = nms(boxes, scores, 0.3).tolist()
    expected = []
    for i in scores.argsort(descending=True).tolist():
        if all(box_iou(boxes[i:i + 1], boxes[j:j + 1]).item() <= 0.3 for j in expected):
            expected.append(i)
    assert keep == expected
    groups = torch.arange(40) % 2
    kept = batched_nms(boxes, scores, groups, 0.3)
    for grp in (0, 1):
        idx = (groups == grp).nonzero().flatten()
        sub = idx[nms(boxes[idx], scores[idx], 0.3)]
        assert set(sub.tolist()) == set(kept[groups[kept] == grp].tolist())


@pytest.mark.parametrize("iou", [0.0, 0.1, 0.3, 0.5])
def test_cell_nms_decides_as_box_nms(iou):
    # 120 distinct cells on two levels of 12 x 10 and 6 x 5, ranked by random scores.
    g = torch.Generator().manual_seed(int(iou * 10))
    tokens = torch.randperm(150, generator=g)[:120]
    level = (tokens >= 120).long()
    local = tokens - 120 * level
    width = torch.tensor([12, 6])[level]
    x, y = local % width, local // width
    scores = torch.rand(len(tokens), generator=g)
    order = scores.argsort(descending=True)
    level, x, y = level[order], x[order], y[order]
    boxes = torch.stack([x - 1, y - 1, x + 1, y + 1], -1).float()
    expected = batched_nms(boxes, scores[order], level, iou)
    kept = cell_nms(level, x, y, iou)
    assert kept.nonzero().squeeze(1).tolist() == expected.tolist()
    # Direct neighbours overlap by 1/3 and diagonal ones by 1/7: above 1/3 nothing is suppressed.
    assert (int(kept.sum()) == len(tokens)) == (iou >= 1 / 3)


@pytest.mark.parametrize("seed,n_pred,n_gt", [(0, 5, 3), (1, 6, 6), (2, 7, 2), (3, 4, 1)])
def test_hungarian_matches_brute_force(seed, n_pred, n_gt):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, n_pred, 3, generator=g)
    boxes = torch.rand(1, n_pred, 4, generator=g) * 0.5 + 0.1
    target = {"labels": torch.randint(0, 3, (n_gt,), generator=g),
              "boxes": torch.rand(n_gt, 4, generator=g) * 0.5 + 0.1}
    matcher = HungarianMatcher()
    (rows, cols), = matcher.match_many([(logits, boxes, [target])])[0]
    cost = matcher.cost(logits[0], boxes[0], target["labels"], target["boxes"]).numpy()
    best = min(sum(cost[p, j] for j, p in enumerate(perm)) for perm in itertools.permutations(range(n_pred), n_gt))
    assert cost[rows.numpy(), cols.numpy()].sum() == pytest.approx(best, rel=1e-6)
    assert len(rows) == n_gt and len(set(rows.tolist())) == n_gt


def test_matcher_handles_images_without_targets_in_one_call():
    logits, boxes = torch.randn(2, 4, 2), torch.rand(2, 4, 4)
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])},
               {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    out = HungarianMatcher().match_many([(logits, boxes, targets), (logits, boxes, targets)])
    assert len(out) == 2 and len(out[0][0][0]) == 1 and len(out[0][1][0]) == 0


def test_focal_cost_hand_computed():
    m = HungarianMatcher(cost_class=1.0, cost_bbox=0.0, cost_giou=0.0)
    p = 0.7
    logit = torch.tensor([[np.log(p / (1 - p)), 0.0]])
    cost = m.cost(logit, torch.rand(1, 4), torch.tensor([0]), torch.rand(1, 4))
    expected = 0.25 * (1 - p) ** 2 * -np.log(p) - 0.75 * p ** 2 * -np.log(1 - p)
    assert cost.item() == pytest.approx(expected, rel=1e-4)
