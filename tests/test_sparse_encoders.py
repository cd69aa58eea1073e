"""Token-sparse encoders: keep counts, selection bookkeeping, gather/scatter, scorer gradients."""
import pytest
import torch

from sparsedet.config import apply_overrides
from sparsedet.data.batch import Batch
from sparsedet.losses.criterion import SetCriterion
from sparsedet.models.detector import DetectionTransformer
from sparsedet.models.encoders.scoring import TokenScorer, scatter_tokens, top_down_scores
from sparsedet.ops.padding import rank_padding_last
from sparsedet.nn.neck import MultiLevel
from sparsedet.presets import get_preset

# One unpadded 800x1216 image through R50 strides 8..64.
WORKED_SHAPES = [(100, 152), (50, 76), (25, 38), (13, 19)]


def _levels(shapes, padding=None, batch=1):
    S = sum(h * w for h, w in shapes)
    padding = torch.zeros(batch, S, dtype=torch.bool) if padding is None else padding
    return MultiLevel(torch.zeros(batch, S, 8), padding, torch.zeros(batch, S, 8), shapes,
                      torch.ones(batch, len(shapes), 2))


def _encoder(preset, **overrides):
    cfg = get_preset(preset)
    apply_overrides(cfg, overrides)
    return DetectionTransformer(cfg.model).encoder


@pytest.mark.parametrize("preset, overrides, expected", [
    ("focus_detr_r50", {}, [10099, 8079, 6059, 6059, 4039, 2019]),
    ("salience_detr_r50", {}, [10317, 8253, 6190, 6190, 4126, 2063]),
    ("sparse_detr_r50", {}, [2020] * 6),
    ("sparse_detr_r50", {"encoder.keep_ratio": 0.3}, [6060] * 6),
])
def test_kept_counts_match_the_worked_example(preset, overrides, expected):
    enc = _encoder(preset, **overrides)
    levels = _levels(WORKED_SHAPES)
    torch.manual_seed(0)
    logits = [torch.randn(1, h * w) for h, w in WORKED_SHAPES]
    flat = torch.cat(logits, 1)
    layers = [enc.select(flat, levels)] * len(enc.layers) if preset.startswith("sparse") else enc.select(
        logits, flat, levels)
    assert [int(sel.counts.clamp(max=sel.indices.shape[1])[0]) for sel in layers] == expected
    assert [sel.indices.shape[1] for sel in layers] == expected
    if preset.startswith("salience"):
        # Layer 0 keeps 40 % / 80 % of the two finest levels and all of the two coarsest.
        from sparsedet.models.encoders.scoring import TokenSelection
        facts = TokenSelection(torch.cat(logits, 1), layers, WORKED_SHAPES, levels.padding)
        assert facts.level_counts(0).tolist() == [[6080, 3040, 950, 247]]
    for a, b in zip(layers, layers[1:]):  # nested sets: each layer's tokens are a prefix of the previous
        assert torch.equal(b.indices, a.indices[:, :b.indices.shape[1]])


@pytest.mark.parametrize("preset", ["sparse_detr_r50", "focus_detr_r50", "salience_detr_r50"])
def test_padding_is_never_selected(preset):
    shapes = [(8, 10), (4, 5), (2, 3), (1, 2)]
    pad_maps = [torch.zeros(2, h, w, dtype=torch.bool) for h, w in shapes]
    for m, (h, w) in zip(pad_maps, shapes):
        m[1, h // 2:] = True  # image 1 is padded at the bottom of every level
    padding = torch.cat([m.flatten(1) for m in pad_maps], 1)
    levels = _levels(shapes, padding, batch=2)
    # Padding gets the best raw scores: masking must still rank it last.
    logits = [torch.rand(2, h * w) + 10 * m.flatten(1) for m, (h, w) in zip(pad_maps, shapes)]
    enc = _encoder(preset)
    flat = rank_padding_last(torch.cat(logits, 1), padding)
    layers = [enc.select(flat, levels)] if preset.startswith("sparse") else enc.select(logits, flat, levels)
    for sel in layers:
        written = torch.arange(sel.indices.shape[1])[None] < sel.counts[:, None]
        assert not padding.gather(1, sel.indices)[written].any()
    valid = (~padding).sum(1)
    assert layers[0].counts[1] < layers[0].counts[0] <= valid[0]


def test_scatter_writes_only_each_images_count():
    memory = torch.arange(2 * 6 * 3, dtype=torch.float32).view(2, 6, 3)
    indices = torch.tensor([[4, 1, 0], [2, 5, 3]])
    values = -torch.ones(2, 3, 3)
    out = scatter_tokens(memory, indices, values, torch.tensor([2, 1]))
    expected = memory.clone()
    expected[0, [4, 1]] = -1
    expected[1, 2] = -1
    assert torch.equal(out, expected)


def test_scorer_mixes_a_per_image_summary_and_is_permutation_equivariant():
    torch.manual_seed(0)
    scorer = TokenScorer(16)
    x = torch.randn(2, 7, 16)
    s = scorer(x)
    perm = torch.randperm(7)
    assert torch.allclose(scorer(x[:, perm]), s[:, perm], atol=1e-6)
    y = x.clone()
    y[0, 0] = torch.randn(16)  # changes the summary half: every score of image 0 moves, image 1 does not
    t = scorer(y)
    assert (t[0, 1:] - s[0, 1:]).abs().min() > 0
    assert torch.equal(t[1], s[1])


@pytest.mark.parametrize("alpha_index", [[2, 1, 0], [0, 1, 2]])
def test_top_down_modulation_uses_the_methods_alpha_order(alpha_index):
    torch.manual_seed(0)
    scorer = TokenScorer(8)
    shapes = [(4, 4), (2, 2), (1, 1)]
    feats = torch.randn(1, 21, 8)
    alpha = torch.tensor([0.1, -0.2, 0.3])
    got = top_down_scores(scorer, feats, shapes, alpha, alpha_index)
    coarse = scorer(feats[:, 20:])
    up = coarse.view(1, 1, 1, 1).expand(1, 1, 2, 2).reshape(1, 4, 1)  # 1x1 -> 2x2 is a broadcast
    mid = feats[:, 16:20]
    assert torch.allclose(got[1], scorer(mid + mid * up * alpha[alpha_index[1]]), atol=1e-6)
    assert torch.allclose(got[2], coarse)


def _batch():
    images = torch.rand(2, 3, 128, 128)
    mask = torch.zeros(2, 128, 128, dtype=torch.bool)
    mask[1, 96:] = True
    mask[1, :, 80:] = True
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.5, 0.6]])},
               {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4]])}]
    return Batch(images, mask), targets


@pytest.mark.parametrize("preset", ["sparse_detr_tiny", "focus_detr_tiny", "salience_detr_tiny"])
def test_selection_loss_trains_the_scorer_and_unselected_tokens_keep_their_value(preset):
    torch.manual_seed(0)
    cfg = get_preset(preset)
    # Salience without its cross-level fusion, so that untouched tokens keep their input value
    # (the other kinds have no fusion: the override would be refused there).
    apply_overrides(cfg, {"num_classes": 3, **({"encoder.fusion": False} if preset.startswith("salience") else {})})
    model = DetectionTransformer(cfg.model).train()
    batch, targets = _batch()
    captured = {}
    model.encoder.register_forward_hook(lambda m, args, out: captured.update(levels=args[0], out=out))
    out = model(batch, targets)
    terms = SetCriterion.for_model(cfg.model)(out, targets)
    assert torch.isfinite(terms["loss_select"]) and terms["loss_select"] > 0
    with pytest.raises(ValueError, match="selects tokens, but the criterion has no selection loss"):
        SetCriterion(3, cfg.model.loss)(out, targets)  # never another kind's loss by default
    terms["loss_select"].backward()
    grads = [p.grad for p in model.encoder.scorer.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0

    levels, encoded = captured["levels"], captured["out"]
    touched = torch.zeros_like(levels.padding)
    for sel in encoded.selection.layers:
        written = torch.arange(sel.indices.shape[1])[None] < sel.counts[:, None]
        touched.scatter_(1, sel.indices, written | touched.gather(1, sel.indices))
    untouched = ~touched
    expected = levels.tokens
    if preset.startswith("salience"):
        # Tokens no layer updated get the learned background embedding of their cell (level 0 here).
        enc = model.encoder
        h, w = levels.shapes[0]
        cells = torch.cat([enc.background_cols.weight[:w][None].expand(h, -1, -1),
                           enc.background_rows.weight[:h][:, None].expand(-1, w, -1)], -1).view(h * w, -1)
        background = torch.zeros_like(expected)
        background[:, :h * w] = cells
        expected = expected + background * (~levels.padding)[..., None]
        untouched[:, h * w:] &= levels.padding[:, h * w:]
    assert untouched.any()
    assert torch.allclose(encoded.memory[untouched], expected[untouched], atol=1e-6)
    if encoded.aux:  # Sparse DETR: heads on the sparse tokens of every layer but the last
        assert len(encoded.aux) == len(model.encoder.layers) - 1
        assert {k for k in terms if "_enc_" in k} == {f"loss_{t}_enc_{i}" for t in ("cls", "bbox", "giou")
                                                     for i in range(len(encoded.aux))}


def test_top_share_width_stays_within_the_tokens():
    """keep_ratio 1 with Sparse/Focus's +1 asks for one token more than an unpadded image has, and a
    small level's quota can floor to 0: the width is clamped to [1, tokens], the counts say what is written."""
    from sparsedet.models.encoders.scoring import top_share
    logits = torch.tensor([[0.1, 0.9, 0.5, 0.3]])
    padding = torch.zeros(1, 4, dtype=torch.bool)
    every = top_share(logits, padding, 1.0, plus_one=True)
    assert every.indices.tolist() == [[1, 2, 3, 0]] and every.counts.tolist() == [5]
    none = top_share(logits, padding, 0.2, plus_one=False)
    assert none.indices.tolist() == [[1]] and none.counts.tolist() == [0]
