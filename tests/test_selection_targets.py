"""Token-selection targets and losses against hand-computed cases (Sparse DETR, Focus-DETR, Salience DETR)."""
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


def test_overlapping_ranges_make_a_token_positive_on_two_levels():
    # The Focus-DETR paper describes overlapping per-level ranges; any list of ranges works.
    box = torch.tensor([[0.0, 0.0, 16.0, 16.0]])  # level-0 centre (4, 4): largest distance 12; level-1 centre (8, 8): 8
    disjoint = foreground_targets([box], [(4, 4), (2, 2)], [8, 16], [[-1, 8], [8, 1e5]])
    overlapping = foreground_targets([box], [(4, 4), (2, 2)], [8, 16], [[-1, 12], [6, 1e5]])
    assert disjoint[0, 0] == 0 and disjoint[0, 16] == 0
    assert overlapping[0, 0] == 1 and overlapping[0, 16] == 1


def test_attention_map_drops_points_off_the_grid_and_sums_leading_dims():
    # 3x3 map. (-0.1, 0.5) -> cell coords (-0.3, 1.5): column -1 is dropped, column 0 keeps 0.7 of
    # the weight, split 0.35 / 0.35 between rows 1 and 2 (flat 3 and 6). (1.0, 0.5) -> column 3:
    # both columns 3 and 4 lie outside, so the whole weight is dropped.
    loc = torch.tensor([[[[-0.1, 0.5], [1.0, 0.5]]]])  # [B=1, L=1, P=2, 2]: no leading dims
    dam = decoder_attention_map(loc, torch.tensor([[[1.0, 5.0]]]), [(3, 3)])
    assert torch.allclose(dam, torch.tensor([[0, 0, 0, 0.35, 0, 0, 0.35, 0, 0]]), atol=1e-6)
    # Leading dims (layers, queries, heads) are summed; images stay separate; interior points keep
    # their whole weight on a 5x5 + 4x3 pyramid.
    torch.manual_seed(0)
    loc = torch.rand(2, 2, 3, 4, 2, 4, 2) * 0.4 + 0.2  # cells: x, y in [1, 3] of 5x5; x in [0.6, 1.8], y in [0.8, 2.4] of 4x3
    w = torch.rand(2, 2, 3, 4, 2, 4)
    shapes = [(5, 5), (4, 3)]
    dam = decoder_attention_map(loc, w, shapes)
    per_slice = sum(decoder_attention_map(loc[:, a, b, c], w[:, a, b, c], shapes)
                    for a in range(2) for b in range(3) for c in range(4))
    assert dam.shape == (2, 37) and torch.allclose(dam, per_slice, atol=1e-5)
    assert torch.allclose(dam[:, :25].sum(1), w[..., 0, :].sum((1, 2, 3, 4)), atol=1e-4)
    assert torch.allclose(dam[:, 25:].sum(1), w[..., 1, :].sum((1, 2, 3, 4)), atol=1e-4)
    one = decoder_attention_map(loc[:1], w[:1], shapes)
    assert torch.allclose(dam[:1], one)


def test_top_count_targets_with_zero_count_and_padding():
    scores = torch.tensor([[0.5, 0.2, 0.9], [0.1, 0.3, 0.2]])
    padding = torch.tensor([[False, False, True], [False, False, False]])
    t = top_count_targets(scores, padding, torch.tensor([0, 2]))
    assert t.dtype == torch.float32
    assert torch.equal(t, torch.tensor([[0.0, 0, 0], [0, 1, 1]]))


def test_foreground_targets_open_low_closed_high_gap_and_edges():
    # Padded 32x32; level 0: 4x4, stride 8, centres 4, 12, 20, 28; level 1: 2x2, stride 16, centres
    # 8, 24 (flat 16..19). Ranges leave a gap (6, 10] that no level owns.
    shapes, strides, ranges = [(4, 4), (2, 2)], [8, 16], [[-1, 6], [10, 16]]
    a = [0.0, 0.0, 8.0, 8.0]     # level-0 centre (4, 4): all distances 4 -> level 0 (flat 0);
    #                              level-1 centre (8, 8) sits on its corner -> not inside
    b = [10.0, 10.0, 32.0, 32.0]  # level-1 centre (24, 24): l = t = 14, r = b = 8 -> 14 in (10, 16] (flat 19);
    #                               its level-0 centres have largest distance >= 12 -> none
    c = [0.0, 16.0, 16.0, 32.0]  # level-0 centres inside have largest distance 12 (level 1's range, not
    #                              level 0's); level-1 centre (8, 24) has 8, in the gap -> no target
    d = [4.0, 4.0, 12.0, 12.0]   # level-0 centres (4, 4) and (12, 12) lie on its edges -> not inside
    f = [8.0, 8.0, 32.0, 32.0]   # level-1 centre (24, 24): l = t = 16 -> 16 is in (10, 16] (closed high)
    g = [14.0, 14.0, 32.0, 32.0]  # level-1 centre (24, 24): l = t = 10 -> 10 not in (10, 16] (open low)
    e = [4.0, 0.0, 10.0, 8.0]    # level-0 centre (4, 4): l = 0 (on the edge), largest 6 in range -> still out
    t = foreground_targets([torch.tensor([a, b]), torch.tensor([c, d, f]), torch.tensor([c, d, g, e]),
                            torch.zeros(0, 4)], shapes, strides, ranges)
    expected = torch.zeros(4, 20)
    expected[0, 0] = expected[0, 19] = 1
    expected[1, 19] = 1
    assert torch.equal(t, expected)


def test_salience_targets_corner_strictness_strides_and_range_gate():
    # Corner-ward: the token centre (4, 4) is 0.01 px inside the top-left corner of the box, 20 px
    # from its right and bottom edges: 1 - 0.5 * sqrt(2) * 19.99 / 20.01 ~ 0.2936 -> 1 - sqrt(2) / 2.
    t = salience_targets([torch.tensor([[3.99, 3.99, 24.0, 24.0]])], [(4, 4)], (32, 32), [[-1, 64]])
    corner = 1 - 0.5 * math.sqrt(2) * 19.99 / 20.01
    assert math.isclose(t[0, 0].item(), corner, abs_tol=1e-5)
    assert math.isclose(t[0, 0].item(), 1 - math.sqrt(2) / 2, abs_tol=1.5e-3)
    # A centre exactly on the box boundary is not inside (strict): (4, 4) is the corner of [4, 4, 20, 20].
    t = salience_targets([torch.tensor([[4.0, 4.0, 20.0, 20.0]])], [(4, 4)], (32, 32), [[-1, 64]]).view(4, 4)
    assert t[0, 0] == 0 and math.isclose(t[1, 1].item(), 1.0, abs_tol=1e-6)
    # Centre (4, 12) is the left-edge midpoint of [4, 4, 20, 20] (0.5 if edges counted) and inside
    # [3, 11, 32, 32] (l = t = 1, r = 28, b = 20): only the latter's value counts.
    t = salience_targets([torch.tensor([[4.0, 4.0, 20.0, 20.0], [3.0, 11.0, 32.0, 32.0]])], [(4, 4)], (32, 32),
                         [[-1, 64]]).view(4, 4)
    assert math.isclose(t[1, 0].item(), 1 - 0.5 * math.hypot(27 / 29, 19 / 21), abs_tol=1e-5)
    # Non-integer strides: padded 30x20 on a 4x3 map -> (sy, sx) = (7.5, 20/3); token (i=1, j=2) sits at
    # (16.67, 11.25) in [10, 5, 20, 15]: dx = 1/3, dy = 1/4 -> 1 - 0.5 * 5/12.
    t = salience_targets([torch.tensor([[10.0, 5.0, 20.0, 15.0]])], [(4, 3)], (30, 20), [[-1, 64]]).view(4, 3)
    assert math.isclose(t[1, 2].item(), 1 - 5 / 24, abs_tol=1e-5)
    # The value is the max over every containing box; the range only gates whether the token is kept.
    # Centre (12, 12): in the whole-frame box A (largest distance 20, salience 1 - 0.5*sqrt(2)*0.25)
    # and in B = [0, 0, 24, 24] (largest distance 12, salience 1). Centre (28, 28) is only in A:
    # l = 28, r = 4 -> 1 - 0.5 * sqrt(2) * 0.75.
    boxes = [torch.tensor([[0.0, 0.0, 32.0, 32.0], [0.0, 0.0, 24.0, 24.0]])]
    only_a = salience_targets(boxes, [(4, 4)], (32, 32), [[16, 64]]).view(4, 4)
    assert math.isclose(only_a[1, 1].item(), 1.0, abs_tol=1e-6)  # gated in by A, value from B
    assert math.isclose(only_a[3, 3].item(), 1 - 0.5 * math.sqrt(2) * 0.75, abs_tol=1e-5)
    only_b = salience_targets(boxes, [(4, 4)], (32, 32), [[-1, 16]]).view(4, 4)
    assert math.isclose(only_b[1, 1].item(), 1.0, abs_tol=1e-6) and only_b[3, 3] == 0
    # Range (24, 64]: centre (4, 4) is gated in by A (r = b = 28) but takes B's larger value
    # (dx = dy = -16/24); centre (12, 12) (A: 20, B: 12) is gated out.
    corner_a = salience_targets(boxes, [(4, 4)], (32, 32), [[24, 64]]).view(4, 4)
    assert math.isclose(corner_a[0, 0].item(), 1 - 0.5 * math.sqrt(2) * 2 / 3, abs_tol=1e-5)
    assert corner_a[1, 1] == 0


def test_losses_match_direct_formulas_and_clamp_zero_positives():
    logits = _logits()
    target = torch.tensor([[1.0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 1]])
    p = logits.sigmoid()
    bce = -(target * torch.log(p) + (1 - target) * torch.log(1 - p))
    assert torch.allclose(attention_map_loss(logits, target), bce.mean(1).mean(), atol=1e-6)
    # No positives anywhere: both focal losses divide by 1, not 0.
    zero = torch.zeros(2, 6)
    neg = -(0.75 * p ** 2 * torch.log(1 - p))
    assert torch.allclose(foreground_loss(logits, zero), neg.sum(1).mean(), atol=1e-6)
    loss = salience_loss(logits, zero)
    assert torch.allclose(loss, neg.sum(), atol=1e-6)
    loss.backward()
    assert logits.grad.abs().sum() > 0 and torch.isfinite(logits.grad).all()


def test_foreground_centres_use_floor_half_stride():
    # Stride 3: centres at j * 3 + 1 (not + 1.5); [0, 0, 1.2, 1.2] holds (1, 1) but not (1.5, 1.5).
    t = foreground_targets([torch.tensor([[0.0, 0.0, 1.2, 1.2]])], [(2, 2)], [3], [[-1, 64]])
    assert torch.equal(t, torch.tensor([[1.0, 0, 0, 0]]))


def test_salience_loss_weight_keeps_its_gradient():
    logits, target = _logits(), torch.tensor([[0.9, 0, 0, 0.5, 0, 0], [0, 0, 0.3, 0, 0, 1.0]])
    salience_loss(logits, target).backward()
    direct = logits.detach().clone().requires_grad_(True)
    p = direct.sigmoid()
    weight = 0.25 * target * (1 - p) ** 2 + 0.75 * (1 - target) * p ** 2
    ((weight * F.binary_cross_entropy_with_logits(direct, target, reduction="none")).sum() / 4).backward()
    assert torch.allclose(logits.grad, direct.grad, atol=1e-6)
    detached = logits.detach().clone().requires_grad_(True)
    w_det = weight.detach()
    ((w_det * F.binary_cross_entropy_with_logits(detached, target, reduction="none")).sum() / 4).backward()
    assert not torch.allclose(detached.grad, direct.grad, atol=1e-4)
