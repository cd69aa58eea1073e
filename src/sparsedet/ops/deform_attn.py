"""Multi-scale deformable attention core (no parameters), one ``torch.library`` op.

``ms_deform_attn(value, shapes, locations, weights)`` samples every head's value map bilinearly at
the given locations and sums the samples with the attention weights. Location convention: (x, y)
in [0, 1] where 0 is the left/top edge of the map and 1 the right/bottom edge (``grid_sample``
with ``align_corners=False``); samples outside the map read zeros.

It runs as the custom op ``sparsedet::ms_deform_attn`` (with a fake implementation and its own
backward op), so ``torch.compile`` and ``torch.export`` see one node whatever the backend:
- ``reference``: one ``F.grid_sample`` per level, gradients by autograd through it; the ground
  truth in tests.
- ``cpu``: a fused C kernel for forward and backward (``deform_attn_cpu.c``, built once per
  machine, see ``deform_attn_kernel.py``); the default on CPU.
- ``gather``: explicit bilinear gather of the four neighbours in plain PyTorch on any device, with
  a backward that scatter-adds the value gradient (``index_add_``) instead of grid_sample's; the
  default on GPUs where triton does not import.
- ``triton``: fused Triton kernels for forward and backward (``deform_attn_triton.py``), reading
  each sample straight from ``value``; the default on CUDA where triton imports. On CPU tensors it
  runs only under Triton's interpreter (``TRITON_INTERPRET=1``, for tests).

``SPARSEDET_DEFORM_ATTN=reference|cpu|gather|triton`` overrides the automatic choice;
benchmarks/deform_attn.py measures the backends against each other.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import SparsedetError
from . import deform_attn_kernel, deform_attn_triton
from .deform_attn_check import check_inputs
from .functional import host_tensor

BACKENDS = ("reference", "cpu", "gather", "triton")
ENV = "SPARSEDET_DEFORM_ATTN"
_override: str | None = None


def set_default_backend(name: str | None) -> str | None:
    """Choose the backend used when ``ms_deform_attn`` is called without one (None: automatic).
    Returns the previous choice (None: it was automatic), to restore it with."""
    global _override
    if name is not None:
        _check(name, "set_default_backend")
    previous, _override = _override, name
    return previous


def default_backend(device: torch.device | str = "cpu") -> str:
    """The backend a call on ``device`` runs: ``set_default_backend``'s choice, else
    ``$SPARSEDET_DEFORM_ATTN``, else ``cpu`` on CPUs (``reference`` where no C compiler builds the
    kernel), ``triton`` on CUDA where triton imports and ``gather`` on other GPUs.

    Raises:
        SparsedetError: the name is unknown, or it is ``triton`` and cannot run on ``device``."""
    device = torch.device(device)
    name = _override or os.environ.get(ENV) or None
    if name is not None:
        _check(name, ENV if _override is None else "set_default_backend")
        if name == "cpu" and device.type != "cpu":
            warnings.warn(f"deformable attention: the cpu backend cannot run on {device.type}; using gather",
                          stacklevel=2)
            return "gather"
        if name == "triton":
            _check_triton(device)
    elif device.type == "cpu":
        name = "cpu"
    else:
        name = "triton" if device.type == "cuda" and deform_attn_triton.available() else "gather"
    if name == "cpu" and not deform_attn_kernel.available():
        return "reference"
    return name


def _check(name: str, where: str) -> None:
    """Refuse an unknown backend name, saying where it came from (the variable or the argument)."""
    if name not in BACKENDS:
        fix = f"choose one of {', '.join(BACKENDS)}"
        if where == ENV:
            fix = f"set {ENV} to one of {', '.join(BACKENDS)}, or unset it for the automatic choice"
        raise SparsedetError(f"{where}: unknown deformable-attention backend {name!r}; {fix}")


def _check_triton(device: torch.device) -> None:
    """Refuse the triton backend where it cannot run: no triton, or CPU tensors outside Triton's
    interpreter."""
    reason = deform_attn_triton.unusable_reason(device)
    if reason is not None:
        raise SparsedetError(reason)


def ms_deform_attn(
    value: Tensor,
    shapes: list[tuple[int, int]],
    locations: Tensor,
    weights: Tensor,
    backend: str | None = None,
) -> Tensor:
    """Multi-scale deformable attention.

    Args:
        value: [B, S, M, D] per-head values, levels flattened fine to coarse, S = sum(H_l * W_l).
        shapes: per level (H_l, W_l) as Python ints.
        locations: [B, Q, M, L, P, 2] sampling locations (x, y) in [0, 1].
        weights: [B, Q, M, L, P] attention weights (already normalised).
        backend: one of ``BACKENDS``; defaults to ``default_backend(value.device)``.

    Returns:
        [B, Q, M * D], in ``value``'s dtype.

    Raises:
        SparsedetError: the sizes disagree (e.g. the level shapes do not add up to S), or the backend
            is unknown or cannot run on ``value``'s device.
    """
    flat = [n for hw in shapes for n in hw]
    check_inputs(value, flat, locations, weights)
    if backend is None:
        backend = default_backend(value.device)
    else:
        _check(backend, "ms_deform_attn")
        if backend == "cpu" and value.device.type != "cpu":
            raise SparsedetError(f"the cpu deformable-attention backend cannot run on {value.device.type} tensors; "
                                 "use backend='gather' there, or leave backend out for the automatic choice")
        if backend == "cpu" and not deform_attn_kernel.available():
            backend = "reference"
        if backend == "triton":
            _check_triton(value.device)
    return torch.ops.sparsedet.ms_deform_attn(value, flat, locations, weights, backend)


def _pairs(flat: list[int]) -> list[tuple[int, int]]:
    return list(zip(flat[0::2], flat[1::2]))


# --- the op -----------------------------------------------------------------------------------

@torch.library.custom_op("sparsedet::ms_deform_attn", mutates_args=())
def _op(value: Tensor, shapes: list[int], locations: Tensor, weights: Tensor, backend: str) -> Tensor:
    if backend == "cpu":
        return deform_attn_kernel.forward(value.float(), shapes, locations.float(), weights.float()).to(value.dtype)
    if backend == "gather":
        return _gather_forward(value, _pairs(shapes), locations, weights)
    if backend == "triton":
        return deform_attn_triton.forward(value, shapes, locations, weights)
    return _reference(value, _pairs(shapes), locations, weights)


@_op.register_fake
def _(value: Tensor, shapes: list[int], locations: Tensor, weights: Tensor, backend: str) -> Tensor:
    B, _, M, D = value.shape
    return value.new_empty(B, locations.shape[1], M * D)


@torch.library.custom_op("sparsedet::ms_deform_attn_backward", mutates_args=())
def _op_backward(grad: Tensor, value: Tensor, shapes: list[int], locations: Tensor, weights: Tensor,
                 backend: str) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "cpu":
        B, Q = grad.shape[:2]
        grads = deform_attn_kernel.backward(grad.float().view(B, Q, *value.shape[2:]), value.float(), shapes,
                                            locations.float(), weights.float())
    elif backend == "triton":
        grads = deform_attn_triton.backward(grad, value, shapes, locations, weights)
    else:
        grads = _gather_backward(grad, value, _pairs(shapes), locations, weights)
    return tuple(g.to(t.dtype) for g, t in zip(grads, (value, locations, weights)))


@_op_backward.register_fake
def _(grad: Tensor, value: Tensor, shapes: list[int], locations: Tensor, weights: Tensor,
      backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(value), torch.empty_like(locations), torch.empty_like(weights)


def _setup_context(ctx, inputs, output) -> None:
    value, shapes, locations, weights, backend = inputs
    ctx.save_for_backward(value, locations, weights)
    ctx.shapes, ctx.backend = shapes, backend


def _backward(ctx, grad: Tensor):
    value, locations, weights = ctx.saved_tensors
    if ctx.backend == "reference":
        # The ground truth: autograd through grid_sample, recomputed here (autograd runs above the op).
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (value, locations, weights)]
            out = _reference(leaves[0], _pairs(ctx.shapes), leaves[1], leaves[2])
            gv, gl, gw = torch.autograd.grad(out, leaves, grad)
    else:
        gv, gl, gw = torch.ops.sparsedet.ms_deform_attn_backward(grad.contiguous(), value, ctx.shapes, locations,
                                                                 weights, ctx.backend)
    return gv, None, gl, gw, None


_op.register_autograd(_backward, setup_context=_setup_context)


# --- backends in PyTorch ----------------------------------------------------------------------

def _reference(value: Tensor, shapes: list[tuple[int, int]], locations: Tensor, weights: Tensor) -> Tensor:
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = locations.shape
    grids = (2 * locations - 1).transpose(1, 2).reshape(B * M, Q, L, P, 2)
    wts = weights.transpose(1, 2).reshape(B * M, 1, Q, L, P)
    out = None
    start = 0
    # Accumulate level by level: never materialise the [B*M, D, Q, L, P] stack of all samples.
    for level, (h, w) in enumerate(shapes):
        v = value[:, start:start + h * w].permute(0, 2, 3, 1).reshape(B * M, D, h, w)
        start += h * w
        sampled = F.grid_sample(v, grids[:, :, level], mode="bilinear", padding_mode="zeros", align_corners=False)
        part = (sampled * wts[..., level, :]).sum(-1)  # [B*M, D, Q]
        out = part if out is None else out + part
    return out.view(B, M * D, Q).transpose(1, 2).contiguous()


def _unnormalize(grid: Tensor, size: Tensor) -> Tensor:
    """grid in [-1, 1] -> pixel coordinate ``(grid + 1) * (size / 2) - 0.5`` as grid_sample computes
    it: ``grid + 1`` in grid's dtype, then the product and the difference rounded once, as its
    fused multiply-add does (both are exact in fp64; MPS has no fp64 and rounds twice)."""
    wide = torch.float64 if grid.device.type != "mps" else torch.float32
    return ((grid + 1).to(wide) * (size.to(wide) * 0.5) - 0.5).to(grid.dtype)


def _corners(shapes: list[tuple[int, int]], locations: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four bilinear neighbours of every location, as [B, M, Q, L*P, 4] tensors:
    flat row index into S (0 where outside), bilinear weight (0 where outside), and the weight's
    derivatives by x and y in location units (0 where outside)."""
    dev, dt = locations.device, locations.dtype
    starts, acc = [], 0
    for h, w in shapes:
        starts.append(acc)
        acc += h * w
    level_h = host_tensor([h for h, _ in shapes], dev)[:, None]
    level_w = host_tensor([w for _, w in shapes], dev)[:, None]
    level_start = host_tensor(starts, dev)[:, None]
    loc = locations.transpose(1, 2)  # [B, M, Q, L, P, 2]
    # Pixel coordinates with align_corners=False (the centre of pixel i sits at i + 0.5), computed
    # as grid_sample does, so that locations on pixel lines fall in the same cell.
    x, y = _unnormalize(2 * loc[..., 0] - 1, level_w), _unnormalize(2 * loc[..., 1] - 1, level_h)
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    x0, y0 = x0.long(), y0.long()
    idx, bil, dbx, dby = [], [], [], []
    for dy in (0, 1):
        for dx in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            inside = ((xi >= 0) & (xi < level_w) & (yi >= 0) & (yi < level_h)).to(dt)
            wx, wy = (fx if dx else 1 - fx), (fy if dy else 1 - fy)
            idx.append((level_start + yi.clamp(min=0) * level_w + xi.clamp(min=0)) * inside.long())
            bil.append(wx * wy * inside)
            dbx.append((1 if dx else -1) * wy * inside * level_w.to(dt))
            dby.append((1 if dy else -1) * wx * inside * level_h.to(dt))
    B, M, Q = loc.shape[:3]
    return tuple(torch.stack(t, -1).reshape(B, M, Q, -1, 4) for t in (idx, bil, dbx, dby))


def _gather_rows(value: Tensor, idx: Tensor) -> Tensor:
    """value [B, S, M, D], idx [B, M, Q, K, 4] -> [B, M, Q, K, 4, D]."""
    B, S, M, D = value.shape
    v = value.permute(0, 2, 1, 3).reshape(B * M, S, D)
    flat = idx.reshape(B * M, -1, 1).expand(-1, -1, D)
    return torch.gather(v, 1, flat).view(*idx.shape, D)


def _gather_forward(value: Tensor, shapes: list[tuple[int, int]], locations: Tensor, weights: Tensor) -> Tensor:
    B, S, M, D = value.shape
    Q = locations.shape[1]
    idx, bil, _, _ = _corners(shapes, locations)
    w = bil * weights.transpose(1, 2).reshape(B, M, Q, -1, 1)
    out = torch.einsum("bmqkn,bmqknd->bmqd", w.to(value.dtype), _gather_rows(value, idx))
    return out.permute(0, 2, 1, 3).reshape(B, Q, M * D)


def _gather_backward(grad: Tensor, value: Tensor, shapes: list[tuple[int, int]], locations: Tensor,
                     weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = locations.shape
    idx, bil, dbx, dby = _corners(shapes, locations)
    a = weights.transpose(1, 2).reshape(B, M, Q, L * P, 1).to(value.dtype)
    g = grad.view(B, Q, M, D).transpose(1, 2).to(value.dtype)  # [B, M, Q, D]
    dot = torch.einsum("bmqd,bmqknd->bmqkn", g, _gather_rows(value, idx))
    grad_weights = (bil * dot).sum(-1)  # [B, M, Q, L*P]
    grad_loc = torch.stack([(dbx * dot).sum(-1), (dby * dot).sum(-1)], -1) * a  # [B, M, Q, L*P, 2]
    # The value gradient is a scatter-add of weighted output gradients into the sampled rows.
    contrib = (a * bil)[..., None] * g[:, :, :, None, None, :]  # [B, M, Q, K, 4, D]
    grad_value = torch.zeros(B * M, S, D, dtype=value.dtype, device=value.device)
    offsets = (torch.arange(B * M, device=value.device) * S).view(B, M, 1, 1, 1)
    grad_value.view(-1, D).index_add_(0, (idx + offsets).reshape(-1), contrib.reshape(-1, D))
    grad_value = grad_value.view(B, M, S, D).transpose(1, 2)
    return (grad_value,
            grad_loc.view(B, M, Q, L, P, 2).transpose(1, 2),
            grad_weights.view(B, M, Q, L, P).transpose(1, 2))
