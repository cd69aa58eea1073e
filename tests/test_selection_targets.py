"""Token-selection targets and losses against hand-computed cases (specs/encoders.md §2.5, §3.4, §4.5)."""
import math

import torch
import torch.nn.functional as F

from sparsedet.losses.selection import (attention_map_loss, decoder_attention_map, foreground_loss,
                                        foreground_targets, salience_loss, salience_targets, top_count_targets)


def test_attention_map_splats_bilinearly_without_half_cell_shift():
    # Two levels: 3x3 then 1x2. Query 0 samples the 3x3 centre (weight 1) and level 1 at (0.25, 0.5)
    # (weight 3); query 1 samples near the top-right corner of the 3x3 map (weight 2).
    loc = torch.tensor([[[[0.5, 0.5]], [[0.25, 0.5]]], [[[0.9, 0.1]], [[0.7, 0.7]]]])[None]  # [1, Q, L, P, 2]
    w = torch.tensor([[[1.0], [3.0]], [[2.0], [0.0]]])[None]
    dam = decoder_attention_map(loc, w, [(3, 3), (1, 2)])
    # (0.5, 0.5) -> cell coords (1.5, 1.5): a quarter each to (1,1), (2,1), (1,2), (2,2).
    # (0.9, 0.1) -> (2.7, 0.3): 0.7 * 0.3 = 0.21 to (col 2, row 0) and 0.3 * 0.3 = 0.09 to (2, 1),
    # the column-3 neighbours fall outside and are dropped; times weight 2.
    # Level 1 (0.25, 0.5) -> (0.5, 0.5): a quarter each to cells 0 and 1 of row 0, row 1 is outside.
    expected = torch.tensor([[0, 0, 0.42, 0, 0.25, 0.25 + 0.18, 0, 0.25, 0.25, 0.75, 0.75]])
    assert torch.allclose(dam, expected, atol=1e-6)


def test_top_count_targets_skip_padding_and_respect_counts():
    scores = torch.tensor([[5.0, 1.0, 3.0, 2.0], [9.0, 1.0, 3.0, 2.0]])
    padding = torch.tensor([[False, False, False, False], [True, False, False, False]])
    t = top_count_targets(scores, padding, torch.tensor([2, 1]))
    assert torch.equal(t, torch.tensor([[1.0, 0, 1, 0], [0, 0, 1, 0]]))


def test_foreground_targets_follow_the_level_ranges():
    # Padded 32x32 image; level 0: 4x4 cells, stride 8, centres 4, 12, 20, 28; level 1: 2x2, stride 16, centres 8, 24.
    shapes, strides, ranges = [(4, 4), (2, 2)], [8, 16], [[-1, 8], [8, 1e5]]
    small = [0.0, 0.0, 10.0, 10.0]   # holds level-0 centre (4, 4) with largest edge distance 6 -> level 0;
    #                                  holds level-1 centre (8, 8) with distance 8, not in (8, inf) -> not level 1
    large = [14.0, 14.0, 32.0, 32.0]  # level-0 centres inside are 12+ from an edge -> not level 0;
    #                                  level-1 centre (24, 24) has largest distance 10 -> level 1
    t = foreground_targets([torch.tensor([small, large]), torch.zeros(0, 4)], shapes, strides, ranges)
    expected = torch.zeros(2, 20)
    expected[0, 0] = 1
    expected[0, 16 + 3] = 1
    assert torch.equal(t, expected)


def test_salience_targets_at_known_points():
    box = torch.tensor([[0.0, 0.0, 24.0, 24.0]])  # centred on the level-0 cell (1, 1) of a 32x32 image
    t = salience_targets([box], [(4, 4)], (32, 32), [[-1, 64]]).view(4, 4)
    assert math.isclose(t[1, 1].item(), 1.0, abs_tol=1e-6)                       # box centre
    assert math.isclose(t[0, 1].item(), 1 - 0.5 * (2 / 3), abs_tol=1e-6)         # (12, 4): dy = (4 - 20) / 24
    assert math.isclose(t[0, 0].item(), 1 - 0.5 * math.sqrt(2) * 2 / 3, abs_tol=1e-6)  # (4, 4) corner-ward
    assert t[3, 3] == 0 and t[1, 3] == 0                                        # outside the box
    # Near an edge midpoint the value tends to 0.5: centre (12, 0.25) of a half-pixel-tall first row.
    edge = salience_targets([torch.tensor([[0.0, 0.0, 24.0, 24.0]])], [(64, 4)], (32, 32), [[-1, 64]])
    assert math.isclose(edge.view(64, 4)[0, 1].item(), 1 - 0.5 * (23.5 / 24), abs_tol=1e-5)
    # The box's largest centre-to-edge distance (12 at its centre) is outside (-1, 10]: no target.
    assert salience_targets([box], [(4, 4)], (32, 32), [[-1, 10]]).sum() == 0


def _logits():
    torch.manual_seed(0)
    return torch.randn(2, 6, requires_grad=True)


def test_attention_map_loss_is_multilabel_soft_margin():
    logits, target = _logits(), torch.tensor([[1.0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 1]])
    loss = attention_map_loss(logits, target)
    assert torch.allclose(loss, F.multilabel_soft_margin_loss(logits, target))
    loss.backward()
    assert logits.grad.abs().sum() > 0 and torch.isfinite(logits.grad).all()


def test_foreground_loss_normalises_per_image():
    logits, target = _logits(), torch.tensor([[1.0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0]])
    p = logits.sigmoid()
    focal = -(0.25 * target * (1 - p) ** 2 * torch.log(p) + 0.75 * (1 - target) * p ** 2 * torch.log(1 - p))
    direct = (focal[0].sum() / 2 + focal[1].sum() / 1) / 2
    loss = foreground_loss(logits, target)
    assert torch.allclose(loss, direct, atol=1e-6)
    loss.backward()
    assert logits.grad.abs().sum() > 0 and torch.isfinite(logits.grad).all()


def test_salience_loss_soft_targets_normalised_by_batch_positives():
    logits, target = _logits(), torch.tensor([[0.9, 0, 0, 0.5, 0, 0], [0, 0, 0.3, 0, 0, 0]])
    p = logits.sigmoid()
    bce = -(target * torch.log(p) + (1 - target) * torch.log(1 - p))
    weight = 0.25 * target * (1 - p) ** 2 + 0.75 * (1 - target) * p ** 2
    loss = salience_loss(logits, target)
    assert torch.allclose(loss, (weight * bce).sum() / 3, atol=1e-6)
    loss.backward()
    assert logits.grad.abs().sum() > 0 and torch.isfinite(logits.grad).all()
