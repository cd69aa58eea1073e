"""Deformable attention: the gather backend equals the grid_sample reference."""
import math

import pytest
import torch

from sparsedet.nn.attention import MSDeformAttn
from sparsedet.ops.deform_attn import ms_deform_attn


def _inputs(seed, B, Q, shapes, M=2, D=3, P=3):
    g = torch.Generator().manual_seed(seed)
    S, L = sum(h * w for h, w in shapes), len(shapes)
    value = torch.randn(B, S, M, D, generator=g, dtype=torch.float64)
    # Locations spill outside [0, 1] so that border and out-of-map samples are exercised.
    loc = torch.rand(B, Q, M, L, P, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2
    weights = torch.rand(B, Q, M, L, P, generator=g, dtype=torch.float64).softmax(-1)
    return value, loc, weights


@pytest.mark.parametrize("seed,shapes", [(0, [(5, 7)]), (1, [(6, 4), (3, 2), (1, 1)]), (2, [(9, 11), (5, 6), (3, 3), (2, 2)])])
def test_gather_matches_reference_values_and_gradients(seed, shapes):
    value, loc, weights = _inputs(seed, 2, 13, shapes)
    inputs = [t.clone().requires_grad_() for t in (value, loc, weights)]
    ref = ms_deform_attn(inputs[0], shapes, inputs[1], inputs[2], backend="reference")
    grads_ref = torch.autograd.grad((ref * torch.arange(ref.numel(), dtype=ref.dtype).view_as(ref).sin()).sum(), inputs)
    inputs2 = [t.clone().requires_grad_() for t in (value, loc, weights)]
    out = ms_deform_attn(inputs2[0], shapes, inputs2[1], inputs2[2], backend="gather")
    grads = torch.autograd.grad((out * torch.arange(out.numel(), dtype=out.dtype).view_as(out).sin()).sum(), inputs2)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_sample_at_pixel_centre_reads_that_pixel():
    # 1 level of 2x4, one head of width 1: location of pixel (row 1, col 2) centre is ((2+.5)/4, (1+.5)/2).
    value = torch.arange(8, dtype=torch.float64).view(1, 8, 1, 1)
    loc = torch.tensor([[2.5 / 4, 1.5 / 2]], dtype=torch.float64).view(1, 1, 1, 1, 1, 2)
    w = torch.ones(1, 1, 1, 1, 1, dtype=torch.float64)
    for backend in ("reference", "gather"):
        assert ms_deform_attn(value, [(2, 4)], loc, w, backend).item() == pytest.approx(6.0)
    # Halfway between pixels 5 and 6, and fully outside the map (zero padding).
    loc_mid = torch.tensor([[2.0 / 4, 1.5 / 2]], dtype=torch.float64).view(1, 1, 1, 1, 1, 2)
    loc_out = torch.tensor([[1.5, 1.5]], dtype=torch.float64).view(1, 1, 1, 1, 1, 2)
    for backend in ("reference", "gather"):
        assert ms_deform_attn(value, [(2, 4)], loc_mid, w, backend).item() == pytest.approx(5.5)
        assert ms_deform_attn(value, [(2, 4)], loc_out, w, backend).item() == 0.0


def test_module_initialisation_follows_official_pattern():
    attn = MSDeformAttn(dim=32, num_levels=2, num_heads=8, num_points=3)
    bias = attn.sampling_offsets.bias.view(8, 2, 3, 2)
    # Head 1 points at 45 degrees: direction (1, 1) after scaling by the max-abs component.
    assert torch.allclose(bias[1, 0, 0], torch.tensor([1.0, 1.0]))
    assert torch.allclose(bias[1, 1, 2], torch.tensor([3.0, 3.0]))
    # Head 2 points straight down (x ~ 0, y = 1) scaled by the point index.
    assert abs(bias[2, 0, 1, 0].item()) < 1e-6 and bias[2, 0, 1, 1].item() == pytest.approx(2.0)
    assert attn.sampling_offsets.weight.abs().sum() == 0
    assert attn.attention_weights.weight.abs().sum() == 0 and attn.attention_weights.bias.abs().sum() == 0


def test_module_masks_padding_and_box_reference():
    torch.manual_seed(0)
    attn = MSDeformAttn(dim=16, num_levels=1, num_heads=2, num_points=2).double()
    value = torch.randn(1, 6, 16, dtype=torch.float64)
    query = torch.randn(1, 3, 16, dtype=torch.float64)
    ref = torch.rand(1, 3, 1, 4, dtype=torch.float64) * 0.5 + 0.25
    pad = torch.tensor([[False, False, False, True, True, True]])
    out = attn(query, ref, value, [(2, 3)], pad)
    # Changing padded values must not change the result.
    value2 = value.clone()
    value2[0, 3:] += 100
    torch.testing.assert_close(attn(query, ref, value2, [(2, 3)], pad), out)
    assert out.shape == (1, 3, 16) and math.isfinite(out.sum().item())
