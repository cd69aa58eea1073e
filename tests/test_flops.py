"""Multiply-add counting: hand-computed modules, stage attribution, and the papers' cost tables."""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsedet.nn.attention import MSDeformAttn
from sparsedet.ops import deform_attn
from sparsedet.ops.flops import count_macs


def test_linear_conv_norm_and_grid_sample_counts():
    linear = nn.Linear(16, 8)
    assert count_macs(lambda: linear(torch.randn(3, 16)))["total"] == 3 * 16 * 8
    conv = nn.Conv2d(4, 6, 3, padding=1)
    assert count_macs(lambda: conv(torch.randn(1, 4, 5, 7)))["total"] == 6 * 5 * 7 * 4 * 9
    norm = nn.LayerNorm(10)
    assert count_macs(lambda: norm(torch.randn(3, 10)))["total"] == 5 * 30  # fvcore: 5 per element
    value = torch.randn(1, 4, 5, 6)
    grid = torch.rand(1, 7, 2, 2) * 2 - 1
    # fvcore's bilinear rule: 4 per output element (1 x 4 channels x 7 x 2 outputs).
    assert count_macs(lambda: F.grid_sample(value, grid, align_corners=False))["total"] == 4 * 4 * 7 * 2


def test_attention_counts_both_products():
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4)
    # q.k^T: 5 x 7 x 8 and weights.v: 5 x 7 x 4 per batch and head.
    assert count_macs(lambda: F.scaled_dot_product_attention(q, k, v))["total"] == 2 * 3 * 5 * 7 * (8 + 4)


@pytest.mark.parametrize("backend", ["reference", "gather"])
def test_deformable_attention_is_counted_analytically_for_every_backend(backend):
    B, Q, C, M, L, P = 1, 10, 32, 4, 2, 3
    shapes = [(6, 5), (3, 3)]
    S = sum(h * w for h, w in shapes)
    attn = MSDeformAttn(C, L, M, P)
    query, value = torch.randn(B, Q, C), torch.randn(B, S, C)
    reference = torch.rand(B, Q, L, 2)
    previous = deform_attn.set_default_backend(backend)  # the choice, not default_backend()'s resolution
    try:
        macs = count_macs(lambda: attn(query, reference, value, shapes))["total"]
    finally:
        deform_attn.set_default_backend(previous)
    linears = Q * C * M * L * P * 2 + Q * C * M * L * P + S * C * C + Q * C * C
    sampling = 5 * Q * M * L * P * (C // M)  # 4 bilinear taps + the weighting per sampled channel
    assert macs == linears + sampling


def test_cost_goes_to_the_innermost_stage():
    inner, outer = nn.Linear(4, 4), nn.Linear(4, 2)

    class Outer(nn.Module):
        def forward(self, x):
            return outer(inner(x))

    model = Outer()
    macs = count_macs(lambda: model(torch.randn(3, 4)), {"outer": [model], "inner": [inner]})
    assert macs == {"inner": 3 * 16, "outer": 3 * 8, "total": 3 * 24}


# The papers' GFLOPs at 800x1067, the mean resized COCO val image (docs/results.md).
PAPER_GFLOPS = {"deformable_detr_r50": 173.0, "deformable_detr_r50_two_stage": 177.3, "sparse_detr_r50": 105.4}


@functools.lru_cache(maxsize=None)
def _gflops(preset, **overrides):
    from sparsedet.tools.bench import bench_model, load_model
    torch.manual_seed(0)
    return bench_model(load_model(preset, overrides), (800, 1067), runs=0)["gflops"]


@pytest.mark.parametrize("preset", sorted(PAPER_GFLOPS))
def test_gflops_match_the_papers(preset):
    gflops = _gflops(preset)
    assert abs(gflops["total"] / PAPER_GFLOPS[preset] - 1) < 0.05, gflops
    assert gflops["backbone"] == pytest.approx(70.0, abs=0.5)  # R50 to C5 at 800x1067 (performance.md App. B)


def test_sparse_detr_cost_slope_matches_the_paper():
    # Sparse DETR's table: +7.5-7.6 GFLOPs per +0.1 of rho (105.4 at 0.1 ... 135.6 at 0.5).
    low, high = _gflops("sparse_detr_r50")["total"], _gflops("sparse_detr_r50", **{"encoder.keep_ratio": 0.5})["total"]
    assert abs((high - low) / 4 - 7.5) <= 0.4


def test_sparse_encoder_costs_less_than_dense():
    from sparsedet.tools.bench import bench_model, load_model
    costs = {p: bench_model(load_model(p, {"num_classes": 3}), (128, 128), runs=0) for p in ("dino_tiny", "focus_detr_tiny")}
    assert costs["focus_detr_tiny"]["gflops"]["encoder"] < 0.8 * costs["dino_tiny"]["gflops"]["encoder"]
    dense_tokens = costs["dino_tiny"]["encoder_tokens"]
    assert costs["dino_tiny"]["encoder_tokens_per_layer"] == [dense_tokens] * 3
    assert max(costs["focus_detr_tiny"]["encoder_tokens_per_layer"]) < dense_tokens
