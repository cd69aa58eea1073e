"""The ``triton`` deformable-attention backend: fused forward and backward kernels written in
Triton (``deform_attn_triton_kernels.py``), the default on CUDA where triton imports.

This module imports without triton: triton is imported by ``available()`` and the kernels at
the first call that runs them. The kernels read every sample once, straight from ``value``, and
keep nothing but the op's inputs for the backward (no gathered neighbour tensor). The forward
accumulates in fp32 and writes the input dtype; the backward accumulates the value gradient in
an fp32 buffer with atomic adds (4 per sample, one per bilinear neighbour, as the official CUDA
kernel does) and returns every gradient in its input's dtype.

On CPU tensors the kernels run only under Triton's interpreter (``TRITON_INTERPRET=1`` set before
triton is imported): that is how the tests run them on machines without a GPU, in a process of
their own (slowly: the interpreter runs one program after the other in numpy).
"""
from __future__ import annotations

import functools
import importlib
import os
import threading

import torch
from torch import Tensor

from ..errors import SparsedetError
from .deform_attn_check import check_grad, check_inputs

INTERPRET = "TRITON_INTERPRET"
# Multiply-adds fused where the compiler finds them (triton's default up to 3.9, named so that 3.9
# does not warn and 3.10 does not turn it off): the one rounding the coordinates need is an
# explicit fma in the kernels, so fusion elsewhere only speeds the sums up.
COMPILE = {"enable_fp_fusion": True}
_lock = threading.Lock()
_available: bool | None = None
_failure: str | None = None
_kernels = None  # the kernels module, imported at the first launch


def available() -> bool:
    """Whether triton imports here (decided once per process; says nothing about a GPU)."""
    global _available, _failure
    if _available is None:
        try:
            importlib.import_module("triton")
        except Exception as e:  # ImportError, or a broken install failing at import
            _failure = f"{type(e).__name__}: {e}"
            _available = False
        else:
            _available = True
    return _available


def failure() -> str | None:
    """Why triton does not import (after ``available()``), or None."""
    return _failure


def _interpret_requested() -> bool:
    """``TRITON_INTERPRET`` now, as Triton reads it (its knob, which a program may also set)."""
    knobs = getattr(importlib.import_module("triton"), "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get(INTERPRET, "0").strip().lower() in ("1", "true", "on")  # triton < 3.4


def interpreted() -> bool:
    """Whether triton runs kernels in its interpreter in this process. Triton fixes that when it is
    imported (its own library functions, ``tl.sum`` and the like, are then interpreted), so
    ``TRITON_INTERPRET=1`` must be set before anything imports triton: the tests start a fresh
    Python process with it."""
    if not available():
        return False
    standard = importlib.import_module("triton.language.standard")
    kind = type(getattr(standard, "sum", None)).__name__
    if kind in ("InterpretedFunction", "JITFunction"):
        return kind == "InterpretedFunction"
    return _interpret_requested()  # another triton layout: trust the variable


def unusable_reason(device: torch.device | str) -> str | None:
    """Why the backend cannot run on ``device`` tensors, or None where it can."""
    device = torch.device(device)
    if not available():
        return (f"the triton deformable-attention backend needs triton, which does not import here ({_failure}); "
                f"pip install triton, or use backend='gather'")
    if device.type == "cpu" and not interpreted():
        late = " (it was set after triton was imported)" if _interpret_requested() else ""
        return ("the triton deformable-attention backend runs on CPU tensors only under Triton's interpreter, "
                f"with {INTERPRET}=1 set before triton is imported{late}: slow, meant for tests; on CPUs use "
                "backend='cpu', or leave backend out for the automatic choice")
    if device.type not in ("cpu", "cuda"):
        return f"the triton deformable-attention backend runs on CUDA tensors, not {device.type}; use backend='gather'"
    return None


def _load():
    """The kernels module, imported at the first launch. ``triton.jit`` compiles or interprets as
    ``TRITON_INTERPRET`` says when it decorates, which must agree with how triton was imported."""
    global _kernels
    if _kernels is None:
        with _lock:
            if _kernels is None:
                if _interpret_requested() != interpreted():
                    raise SparsedetError(f"{INTERPRET} changed after triton was imported: triton interprets or "
                                         "compiles as the variable was at its import; set it before, or not at all")
                _kernels = importlib.import_module(f"{__package__}.deform_attn_triton_kernels")
    return _kernels


def _check_device(*tensors: Tensor) -> None:
    reason = unusable_reason(tensors[0].device)
    if reason is not None:
        raise SparsedetError(reason)
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise SparsedetError(f"deformable attention: the tensors lie on different devices: "
                             f"{sorted(map(str, devices))}")
    for t in tensors:
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise SparsedetError(f"the triton deformable-attention backend takes fp32, bf16 or fp16 tensors; "
                                 f"got {t.dtype}")


@functools.lru_cache(maxsize=64)
def _levels_on(shapes: tuple[int, ...], device: torch.device) -> Tensor:
    rows, first = [], 0
    for h, w in zip(shapes[0::2], shapes[1::2]):
        rows.append((h, w, first))
        first += h * w
    return torch.tensor(rows, dtype=torch.int32).to(device)


def _levels(shapes: list[int], device: torch.device) -> Tensor:
    """[L, 3] int32: (H, W, first token) per level; kept per shapes and device, so that a call
    copies nothing to the GPU but the first with its level shapes."""
    return _levels_on(tuple(shapes), device)


def _blocks(rows: int, K: int, D: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_K, BLOCK_D): a program's rows, and all of a row's samples and channels. On a
    GPU about 4096 elements per [rows, samples, channels] tile (a guess: no GPU measured yet); in the
    interpreter, which runs programs one after the other in numpy, far larger tiles."""
    block_k, block_d = _next_power_of_2(K), _next_power_of_2(D)
    per_row = block_k * block_d
    if interpreted():
        return max(1, min(_next_power_of_2(rows), (1 << 20) // per_row)), block_k, block_d
    return max(1, min(64, 4096 // per_row)), block_k, block_d


def _launch(rows: int, K: int, D: int, block_rows: int | None) -> tuple[tuple[int], dict]:
    """The grid and the tile sizes (with the compile options) of a launch over ``rows`` rows."""
    block_r, block_k, block_d = _blocks(rows, K, D)
    block_r = block_rows or block_r
    return (-(-rows // block_r),), {"BLOCK_R": block_r, "BLOCK_K": block_k, "BLOCK_D": block_d, **COMPILE}


def _next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def forward(value: Tensor, shapes: list[int], locations: Tensor, weights: Tensor,
            block_rows: int | None = None) -> Tensor:
    """value [B, S, M, D], shapes flat (H_0, W_0, H_1, ...), locations [B, Q, M, L, P, 2], weights
    [B, Q, M, L, P]. Returns [B, Q, M * D] in value's dtype. ``block_rows`` overrides the rows per
    program (tests use it to cover several programs and partial blocks)."""
    check_inputs(value, shapes, locations, weights)
    _check_device(value, locations, weights)
    kernels = _load()
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = locations.shape
    out = value.new_empty(B, Q, M, D)
    rows = B * Q * M
    if rows and D and L * P:
        grid, tiles = _launch(rows, L * P, D, block_rows)
        kernels._forward_kernel[grid](value.contiguous(), _levels(shapes, value.device), locations.contiguous(),
                                      weights.contiguous(), out, rows, S, M, D, Q, L, P,
                                      **tiles)
    elif out.numel():
        out.zero_()
    return out.view(B, Q, M * D)


def backward(grad_out: Tensor, value: Tensor, shapes: list[int], locations: Tensor, weights: Tensor,
             block_rows: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``forward`` for value, locations and weights, each in its input's dtype;
    grad_out is [B, Q, M, D] or [B, Q, M * D]."""
    check_inputs(value, shapes, locations, weights)
    check_grad(grad_out, value, locations)
    _check_device(grad_out, value, locations, weights)
    kernels = _load()
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = locations.shape
    grad_value = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
    # Contiguous whatever the inputs' strides (zeros_like would copy a permuted layout).
    grad_locations = torch.zeros(locations.shape, dtype=locations.dtype, device=locations.device)
    grad_weights = torch.zeros(weights.shape, dtype=weights.dtype, device=weights.device)
    rows = B * Q * M
    if rows and D and L * P:
        grid, tiles = _launch(rows, L * P, D, block_rows)
        kernels._backward_kernel[grid](value.contiguous(), _levels(shapes, value.device), locations.contiguous(),
                                       weights.contiguous(), grad_out.contiguous(), grad_value, grad_locations,
                                       grad_weights, rows, S, M, D, Q, L, P,
                                       **tiles)
    return grad_value.to(value.dtype), grad_locations, grad_weights
