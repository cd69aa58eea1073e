"""Triton kernels of the ``triton`` deformable-attention backend (launched by ``deform_attn_triton.py``,
which imports this module only when a call needs it: it imports triton).

Semantics are the Deformable DETR op's (Zhu et al., "Deformable DETR", ICLR 2021; the official
``models/ops/src/cuda/ms_deform_im2col_cuda.cuh`` in fundamentalvision/Deformable-DETR), with the
sampling convention of this package's ``reference`` backend: ``grid_sample`` with
``align_corners=False`` and zero padding. The pixel coordinate is computed with ``grid_sample``'s
CPU arithmetic, operation for operation, so that a location on a pixel line falls in the same
cell (and gets the same one-sided gradient) as in ``reference``.

Tensors are contiguous: value [B, S, M, D], locations [B, Q, M, L, P, 2], weights [B, Q, M, L, P],
out and grad_out [B, Q, M, D]; ``levels`` is [L, 3] int32 (H, W, first token). One row is one
(image, query, head) triple, r = (b * Q + q) * M + m, so that a row's locations, weights and
output are contiguous; a program handles BLOCK_R rows and all D channels of each. Every sample is
read once, straight from ``value`` (no gathered neighbour tensor), and sums run in fp32.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _samples(levels_ptr, loc_ptr, weight_ptr, row, rmask, L, P, BLOCK_K: tl.constexpr):
    """Per (row, sample) [BLOCK_R, BLOCK_K]: the top-left neighbour (x0, y0) as int32, the fractions
    (fx, fy), the attention weight, whether any neighbour can lie inside the map (False for NaN;
    coordinates out of range are zeroed before the integer conversion), and per sample [BLOCK_K] the
    level's H, W and first token."""
    K = L * P
    k = tl.arange(0, BLOCK_K)
    kmask = k < K
    lv = k // P
    h = tl.load(levels_ptr + 3 * lv, mask=kmask, other=0)
    w = tl.load(levels_ptr + 3 * lv + 1, mask=kmask, other=0)
    first = tl.load(levels_ptr + 3 * lv + 2, mask=kmask, other=0).to(tl.int64)
    mask = rmask[:, None] & kmask[None, :]
    at = row[:, None] * K + k[None, :]
    lx = tl.load(loc_ptr + at * 2, mask=mask, other=0.0).to(tl.float32)
    ly = tl.load(loc_ptr + at * 2 + 1, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(weight_ptr + at, mask=mask, other=0.0).to(tl.float32)
    wf = w.to(tl.float32)[None, :]
    hf = h.to(tl.float32)[None, :]
    # grid = 2 * loc - 1, then (grid + 1) * (size / 2) - 0.5 with one rounding (a fused multiply-add),
    # as grid_sample computes it: PyTorch's AVX2 CPU kernel contracts it so, and its CUDA kernel's
    # ((grid + 1) * size - 1) / 2 rounds the same once fused (halving is exact).
    x = tl.fma(2.0 * lx - 1.0 + 1.0, wf * 0.5, -0.5)
    y = tl.fma(2.0 * ly - 1.0 + 1.0, hf * 0.5, -0.5)
    # At exactly -1 only the far neighbour is inside, with bilinear weight 0 but a gradient.
    inside = mask & (x >= -1.0) & (x < wf) & (y >= -1.0) & (y < hf)
    x = tl.where(inside, x, 0.0)
    y = tl.where(inside, y, 0.0)
    x0 = tl.floor(x)
    y0 = tl.floor(y)
    return x0.to(tl.int32), y0.to(tl.int32), x - x0, y - y0, a, inside, h[None, :], w[None, :], first[None, :], at


@triton.jit
def _neighbour(dx: tl.constexpr, dy: tl.constexpr, x0, y0, fx, fy, inside, h, w, first, base, d, M, D):
    """The neighbour (x0 + dx, y0 + dy) of every (row, sample): whether it lies inside its level,
    its bilinear factors along x and y, and the [BLOCK_R, BLOCK_K, BLOCK_D] offsets of its channels
    in ``value`` (token 0 where outside: the loads and adds there are masked)."""
    xi = x0 + dx
    yi = y0 + dy
    ok = inside & (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    s = first + tl.where(ok, yi * w + xi, 0)
    wx = fx if dx else 1.0 - fx
    wy = fy if dy else 1.0 - fy
    return ok, wx, wy, (base[:, None] + s * (M * D))[:, :, None] + d[None, None, :]


@triton.jit
def _forward_kernel(value_ptr, levels_ptr, loc_ptr, weight_ptr, out_ptr, rows, S, M, D, Q, L, P,
                    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = row < rows
    d = tl.arange(0, BLOCK_D)
    dmask = (d < D)[None, None, :]
    # Token s of this row's head starts at base + s * M * D.
    base = ((row // (Q * M)) * S * M + row % M) * D
    x0, y0, fx, fy, a, inside, h, w, first, _ = _samples(levels_ptr, loc_ptr, weight_ptr, row, rmask, L, P, BLOCK_K)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for n in tl.static_range(4):
        ok, wx, wy, at = _neighbour(n % 2, n // 2, x0, y0, fx, fy, inside, h, w, first, base, d, M, D)
        coef = a * wx * wy
        v = tl.load(value_ptr + at, mask=ok[:, :, None] & dmask, other=0.0).to(tl.float32)
        acc += tl.sum(coef[:, :, None] * v, axis=1)
    out = out_ptr + row[:, None] * D + d[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & (d < D)[None, :])


@triton.jit
def _backward_kernel(value_ptr, levels_ptr, loc_ptr, weight_ptr, grad_out_ptr, grad_value_ptr, grad_loc_ptr,
                     grad_weight_ptr, rows, S, M, D, Q, L, P,
                     BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad_value (fp32, zeroed by the caller) receives atomic adds; grad_loc and grad_weight are
    written in full, in their own dtype."""
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = row < rows
    d = tl.arange(0, BLOCK_D)
    dmask = (d < D)[None, None, :]
    base = ((row // (Q * M)) * S * M + row % M) * D
    x0, y0, fx, fy, a, inside, h, w, first, at_k = _samples(levels_ptr, loc_ptr, weight_ptr, row, rmask, L, P,
                                                            BLOCK_K)
    g = tl.load(grad_out_ptr + row[:, None] * D + d[None, :], mask=rmask[:, None] & (d < D)[None, :],
                other=0.0).to(tl.float32)[:, None, :]
    gw = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    gx = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    gy = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for n in tl.static_range(4):
        dx = n % 2
        dy = n // 2
        ok, wx, wy, at = _neighbour(dx, dy, x0, y0, fx, fy, inside, h, w, first, base, d, M, D)
        okd = ok[:, :, None] & dmask
        v = tl.load(value_ptr + at, mask=okd, other=0.0).to(tl.float32)
        dot = tl.sum(g * v, axis=2)  # zero where the neighbour is outside
        gw += wx * wy * dot
        # d(bilinear weight) / dx and / dy, in pixel units
        gx += (wy if dx else -wy) * dot
        gy += (wx if dy else -wx) * dot
        tl.atomic_add(grad_value_ptr + at, (a * wx * wy)[:, :, None] * g, mask=okd, sem="relaxed")
    mask = rmask[:, None] & (tl.arange(0, BLOCK_K) < L * P)[None, :]
    tl.store(grad_weight_ptr + at_k, gw.to(grad_weight_ptr.dtype.element_ty), mask=mask)
    # x = loc * W - 0.5 in exact arithmetic: d x / d loc = W (and H for y)
    tl.store(grad_loc_ptr + at_k * 2, (a * gx * w.to(tl.float32)).to(grad_loc_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_loc_ptr + at_k * 2 + 1, (a * gy * h.to(tl.float32)).to(grad_loc_ptr.dtype.element_ty), mask=mask)
