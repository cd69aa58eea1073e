"""Query-side building blocks: projected attention, conditional logits, Semantics Aligner, SMCA
prior, SD-DETR's streams and switches, the alignment loss, configuration errors."""
import math

import pytest
import torch

from sparsedet.config import apply_overrides
from sparsedet.data.batch import Batch
from sparsedet.errors import SparsedetError
from sparsedet.losses.focal import aligned_loss
from sparsedet.models.decoders.conditional import heads_concat
from sparsedet.models.decoders.sam import gaussian_prior, point_positions, salient_points
from sparsedet.models.detector import DetectionTransformer
from sparsedet.nn.attention import ProjectedAttention
from sparsedet.presets import get_preset


def test_projected_attention_matches_the_formula():
    """q/k 6 wide per head, v 2 wide per head, scale 1/sqrt(6), padding ignored, bias added."""
    gen = torch.Generator().manual_seed(0)
    B, Q, S, M = 2, 3, 5, 2
    attn = ProjectedAttention(4, M).eval()
    q, k = torch.randn(B, Q, M * 6, generator=gen), torch.randn(B, S, M * 6, generator=gen)
    v, bias = torch.randn(B, S, 4, generator=gen), torch.randn(B, M, Q, S, generator=gen)
    padding = torch.zeros(B, S, dtype=torch.bool)
    padding[1, 3:] = True
    got = attn(q, k, v, padding, bias)
    heads = []
    for h in range(M):
        logits = q[..., h * 6:(h + 1) * 6] @ k[..., h * 6:(h + 1) * 6].transpose(1, 2) / math.sqrt(6) + bias[:, h]
        weights = logits.masked_fill(padding[:, None], float("-inf")).softmax(-1)
        heads.append(weights @ v[..., h * 2:(h + 1) * 2])
    torch.testing.assert_close(got, attn.out_proj(torch.cat(heads, -1)))


def test_conditional_logit_is_content_plus_spatial_per_head():
    gen = torch.Generator().manual_seed(1)
    cq, sq, ck, sk = (torch.randn(1, 1, 8, generator=gen) for _ in range(4))
    q, k = heads_concat(cq, sq, 2), heads_concat(ck, sk, 2)
    for h in range(2):
        part = slice(h * 4, (h + 1) * 4)
        dot = (q[0, 0, h * 8:(h + 1) * 8] * k[0, 0, h * 8:(h + 1) * 8]).sum()
        torch.testing.assert_close(dot, (cq[0, 0, part] * ck[0, 0, part]).sum() + (sq[0, 0, part] * sk[0, 0, part]).sum())


def test_salient_points_read_the_roi_where_they_point():
    """A zero predictor puts every point at the box centre: the centre bin of the 7x7 RoI."""
    rois = torch.randn(1, 2, 3, 7, 7)
    point1, point2 = torch.nn.Conv2d(3, 2, 1), torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(98, 8))
    torch.nn.init.zeros_(point2[1].weight)
    with torch.no_grad():
        point2[1].bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 2.0]))
    offsets, feats, extra = salient_points(rois, point1, point2, 3)
    assert offsets.abs().max() == 0 and extra.shape == (1, 2, 2)
    torch.testing.assert_close(feats, rois[:, :, :, 3, 3][:, :, None].expand(-1, -1, 3, -1))
    boxes = torch.tensor([[[0.5, 0.4, 0.2, 0.6]]])
    corner = point_positions(boxes, torch.tensor([[[[1.0, -1.0]]]]))
    torch.testing.assert_close(corner, torch.tensor([[[[0.6, 0.1]]]]))


def test_gaussian_prior_by_hand():
    """Point (0.5, 0.25) on a 2x4 map with valid width 0.5: centre (1, 0.5) in pixels."""
    points = torch.tensor([[[[0.5, 0.25]]]])
    scales = torch.tensor([[[[2.0, 1.0]]]])
    bias = gaussian_prior(points, scales, (2, 4), torch.tensor([[0.5, 1.0]]))
    cells = [(x + 0.5, y + 0.5) for y in range(2) for x in range(4)]
    expected = torch.tensor([-(4 * (x - 1.0) ** 2 + (y - 0.5) ** 2) / 8 for x, y in cells])
    torch.testing.assert_close(bias[0, 0, 0], expected)


def _model(preset: str, **overrides) -> DetectionTransformer:
    cfg = get_preset(preset)
    apply_overrides(cfg, {"num_queries": 10, "num_classes": 3, **overrides})
    torch.manual_seed(0)
    return DetectionTransformer(cfg.model).eval()


def _batch():
    images = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, :, 96:] = True
    return Batch(images.masked_fill(mask[:, None], 0), mask)


def test_decoupled_class_head_reads_the_classification_stream():
    """Layer 0's classification comes from the classification stream: changing the
    localisation cross-attention moves layer 0's boxes, not its logits."""
    model = _model("decoupled_detr_tiny")
    batch = _batch()
    with torch.no_grad():
        model.heads.box_embed[0].layers[-1].weight.normal_(0, 0.1)  # off its zero init: deltas move boxes
        before = model(batch)
        for p in model.decoder.layers[0].cross["loc"].parameters():
            p.add_(0.1 * torch.randn_like(p))
        after = model(batch)
    torch.testing.assert_close(after.aux[0].logits, before.aux[0].logits)
    assert (after.aux[0].boxes - before.aux[0].boxes).abs().max() > 1e-4


def test_decoupled_switches_build_the_ablations():
    full = _model("decoupled_detr_tiny")
    assert set(full.decoder.points) == {"cls", "loc"} and set(full.decoder.layers[0].cross) == {"cls", "loc"}
    plain = _model("decoupled_detr_tiny", **{"decoder.task_queries": False, "decoder.split_cross_attention": False})
    assert plain.decoder.points is None and set(plain.decoder.layers[0].cross) == {"cls"}
    out = plain(_batch())
    assert out.logits.shape == (2, 10, 3) and torch.isfinite(out.boxes).all()


@pytest.mark.parametrize("preset", ["conditional_detr_tiny", "sam_detr_tiny", "sam_detr_smca_tiny"])
def test_single_level_models_ignore_padding(preset):
    """An image's predictions do not depend on what lies in its padding or on its batch mate."""
    model = _model(preset)
    batch = _batch()
    with torch.no_grad():
        alone = model(Batch(batch.images[1:], batch.mask[1:]))
        noisy = batch.images.clone()
        noisy[1, :, :, 96:] = torch.rand(3, 96, 32)
        together = model(Batch(noisy, batch.mask))
    torch.testing.assert_close(together.logits[1:], alone.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(together.boxes[1:], alone.boxes, atol=1e-5, rtol=0)


def test_aligned_loss_matches_its_formula():
    logits = torch.tensor([[[0.3, -1.0], [2.0, 0.5]]])
    onehot = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    quality = torch.tensor([[0.64, 0.0]])
    p = logits.sigmoid()
    t = torch.zeros_like(p)
    t[0, 0, 0] = p[0, 0, 0] ** 0.25 * 0.64 ** 0.75
    bce = -(t * p.log() + (1 - t) * (1 - p).log())
    torch.testing.assert_close(aligned_loss(logits, onehot, quality), ((t - p).abs() ** 2 * bce).sum())


def test_single_level_kinds_need_one_level_and_the_global_encoder():
    cfg = get_preset("sam_detr_tiny")
    apply_overrides(cfg, {"num_levels": 4})
    with pytest.raises(SparsedetError, match="num_levels=1"):
        DetectionTransformer(cfg.model)
    cfg = get_preset("dino_tiny")
    apply_overrides(cfg, {"encoder.kind": "global"})
    with pytest.raises(SparsedetError, match="single-level"):
        DetectionTransformer(cfg.model)
