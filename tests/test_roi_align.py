"""RoIAlign (pure PyTorch) against an explicit per-sample evaluation of torchvision's formula."""
import math

import pytest
import torch

from sparsedet.ops.roi_align import roi_align


def _bilinear(fmap, y, x):
    """torchvision's roi_align bilinear read: 0 outside [-1, size], clamped to the border."""
    H, W = fmap.shape[-2:]
    if y < -1.0 or y > H or x < -1.0 or x > W:
        return torch.zeros(fmap.shape[0], dtype=fmap.dtype)
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= H - 1:
        y0 = y1 = H - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= W - 1:
        x0 = x1 = W - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * fmap[:, y0, x0] + (1 - ly) * lx * fmap[:, y0, x1]
            + ly * (1 - lx) * fmap[:, y1, x0] + ly * lx * fmap[:, y1, x1])


def _explicit(fmap, box, out_h, out_w, ratio):
    x1, y1, x2, y2 = (float(v) - 0.5 for v in box)
    bin_h, bin_w = (y2 - y1) / out_h, (x2 - x1) / out_w
    gh = ratio if ratio > 0 else math.ceil((y2 - y1) / out_h)
    gw = ratio if ratio > 0 else math.ceil((x2 - x1) / out_w)
    out = torch.zeros(fmap.shape[0], out_h, out_w, dtype=fmap.dtype)
    for i in range(out_h):
        for j in range(out_w):
            acc = torch.zeros(fmap.shape[0], dtype=fmap.dtype)
            for iy in range(gh):
                for ix in range(gw):
                    y = y1 + i * bin_h + (iy + 0.5) * bin_h / gh
                    x = x1 + j * bin_w + (ix + 0.5) * bin_w / gw
                    acc += _bilinear(fmap, y, x)
            out[:, i, j] = acc / max(gh * gw, 1)
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("ratio", [-1, 2])
def test_matches_explicit_sampling(ratio, device):
    gen = torch.Generator().manual_seed(0)
    fmap = torch.randn(2, 3, 9, 11, generator=gen, dtype=torch.float64)
    boxes = torch.tensor([
        [[0.0, 0.0, 11.0, 9.0], [2.3, 1.7, 6.9, 8.2], [4.0, 4.0, 4.0, 4.0], [8.5, 0.2, 11.0, 3.1]],   # whole, inner, empty, edge
        [[0.1, 0.1, 1.4, 1.2], [3.3, 2.2, 10.9, 8.8], [10.2, 8.1, 11.0, 9.0], [0.0, 5.5, 7.7, 9.0]],  # tiny, large, corner
    ], dtype=torch.float64)
    got = roi_align(fmap.to(device), boxes.to(device), (7, 5), ratio).cpu()
    assert got.shape == (2, 4, 3, 7, 5)
    for b in range(2):
        for n in range(4):
            torch.testing.assert_close(got[b, n], _explicit(fmap[b], boxes[b, n], 7, 5, ratio), rtol=0, atol=1e-12)


def test_gradient_reaches_features_only_inside_the_box():
    fmap = torch.randn(1, 2, 8, 8, requires_grad=True)
    out = roi_align(fmap, torch.tensor([[[1.0, 1.0, 3.0, 3.0]]]), (2, 2))
    out.sum().backward()
    touched = fmap.grad[0, 0] != 0
    assert touched[:4, :4].any() and not touched[5:].any() and not touched[:, 5:].any()
