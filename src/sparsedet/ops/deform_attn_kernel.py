"""The ``cpu`` deformable-attention backend: ``deform_attn_cpu.c`` built once per machine with the
system C compiler (``deform_attn_build.py``) and called through ctypes.

It is parallel with OpenMP and loaded after PyTorch, so where its ``libgomp.so.1`` is the one
PyTorch already loaded (Linux pip wheels), it joins PyTorch's OpenMP thread pool. Every call
passes ``torch.get_num_threads()`` (OpenMP's own count is per calling thread, so a call from a new
Python thread would ignore ``torch.set_num_threads``). It runs one thread per call, with one
warning, where it was built without OpenMP or where loading it brought a second OpenMP runtime
into the process (two pools would compete for the cores). Where no compiler works, ``load()``
returns None and says why once; the caller falls back to the ``reference`` backend.
"""
from __future__ import annotations

import ctypes
import platform
import re
import subprocess
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

from ..errors import SparsedetError
from . import deform_attn_build
from .deform_attn_check import check_grad, check_inputs

# Below this many (query, head, level, point) samples a call runs on one thread: waking threads costs more.
PARALLEL_MIN_SAMPLES = 16384
# docs/results.md, "Deformable attention alone": reference against cpu, forward+backward, 2 threads.
REFERENCE_SLOWDOWN = "about 5-9× slower forward and backward (docs/results.md)"
OPENMP_RUNTIME = re.compile(r"^lib(gomp|iomp5|omp)(-[0-9a-f]+)?\.(so(\.\d+)*|\d*\.?dylib)$")

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_failure: str | None = None
_threaded = False  # whether calls may use more than one thread (OpenMP build sharing PyTorch's runtime)


def runtimes_in_maps(maps: str) -> set[str]:
    """Paths of the OpenMP runtimes in a /proc/<pid>/maps listing."""
    paths = {line.split(None, 5)[5].strip() for line in maps.splitlines() if len(line.split(None, 5)) == 6}
    return {p for p in paths if OPENMP_RUNTIME.match(Path(p).name)}


def openmp_runtimes() -> set[str] | None:
    """The OpenMP runtimes this process has loaded, or None where they cannot be listed."""
    if platform.system() == "Darwin":
        try:  # dyld lists the loaded images (no /proc on macOS)
            libc = ctypes.CDLL(None)
            libc._dyld_get_image_name.restype = ctypes.c_char_p
            names = [libc._dyld_get_image_name(i) or b"" for i in range(libc._dyld_image_count())]
        except (OSError, AttributeError):
            return None
        return {n.decode() for n in names if OPENMP_RUNTIME.match(Path(n.decode()).name)}
    try:
        return runtimes_in_maps(Path("/proc/self/maps").read_text(errors="replace"))
    except OSError:
        return None


def runtimes_conflict(before: set[str], after: set[str]) -> str | None:
    """Why the kernel must not run threaded, given the OpenMP runtimes loaded before and after
    loading it; None when it added none (it uses PyTorch's, or PyTorch has none to compete)."""
    added = sorted(after - before)
    if not added or not before:
        return None
    return f"it loaded the OpenMP runtime {added[0]} while PyTorch uses {', '.join(sorted(before))}"


def load() -> ctypes.CDLL | None:
    """The built library, or None (with one warning per process) where it cannot be built."""
    global _library, _failure, _threaded
    if _library is not None or _failure is not None:  # no lock once decided (torch.compile traces this)
        return _library
    with _lock:
        if _library is None and _failure is None:
            cc = deform_attn_build.compiler()
            try:
                if cc is None:
                    raise RuntimeError("no C compiler found (set CC or install gcc)")
                path, tuning_tried = deform_attn_build.build(cc)
                before = openmp_runtimes()
                lib = ctypes.CDLL(str(path))
                after = openmp_runtimes()
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                _failure = str(e)
                warnings.warn(f"deformable attention: the fast CPU kernel is unavailable ({_failure}); using the "
                              f"slower grid_sample path, {REFERENCE_SLOWDOWN}", stacklevel=3)
                return None
            long, ptr = ctypes.c_int64, ctypes.c_void_p
            lib.ms_deform_attn_forward.argtypes = [ptr] * 6 + [long] * 7 + [ctypes.c_int]
            lib.ms_deform_attn_backward.argtypes = [ptr] * 9 + [long] * 7 + [ctypes.c_int]
            lib.ms_deform_attn_forward.restype = lib.ms_deform_attn_backward.restype = None
            lib.ms_deform_attn_build_info.restype = ctypes.c_int
            info = lib.ms_deform_attn_build_info()
            reason = _one_thread_reason(cc, info, before, after)
            _threaded = reason is None
            notes = [] if reason is None else [f"{reason}, so it runs one thread per call"]
            if tuning_tried and not info & 2:
                notes.append(f"is generic code: {cc} rejected native tuning (-march=native, -mcpu=native)")
            if notes:
                warnings.warn("deformable attention: the CPU kernel " + "; ".join(notes), stacklevel=3)
            _library = lib
        return _library


def _one_thread_reason(cc: str, info: int, before: set[str] | None, after: set[str] | None) -> str | None:
    """Why calls must stay on one thread (bit 0 of ``info``: built with OpenMP), or None."""
    if not info & 1:
        return (f"was built without OpenMP ({cc} has no -fopenmp, as Apple clang has not): it ignores "
                f"torch.set_num_threads")
    if before is None or after is None:
        return "cannot list this process's OpenMP runtimes to check that it shares PyTorch's"
    conflict = runtimes_conflict(before, after)
    if conflict is not None:
        return (f"found that {conflict} (two thread pools would compete for the cores; set CC to the compiler "
                f"family PyTorch was built with)")
    return None


def available() -> bool:
    return load() is not None


def threaded() -> bool:
    """Whether calls use ``torch.get_num_threads()`` threads (else one)."""
    return available() and _threaded


def failure() -> str | None:
    """Why the kernel is unavailable (after ``load()``), or None."""
    return _failure


def _threads(samples: int) -> int:
    return max(1, torch.get_num_threads()) if _threaded and samples >= PARALLEL_MIN_SAMPLES else 1


def _library_or_raise() -> ctypes.CDLL:
    lib = load()
    if lib is None:
        raise SparsedetError(f"the cpu deformable-attention kernel is unavailable ({_failure}); "
                             f"use backend='reference' or 'gather'")
    return lib


def _check_tensors(*tensors: Tensor) -> None:
    for t in tensors:
        if t.dtype != torch.float32 or t.device.type != "cpu":
            raise SparsedetError(f"the cpu deformable-attention kernel takes fp32 CPU tensors; got {t.dtype} on "
                                 f"{t.device} (convert with .float().cpu())")


def _layout(shapes: list[int]) -> tuple[Tensor, Tensor]:
    pairs = torch.tensor(shapes, dtype=torch.long).view(-1, 2)
    starts = torch.cat([pairs.new_zeros(1), (pairs[:, 0] * pairs[:, 1]).cumsum(0)[:-1]])
    return pairs.contiguous(), starts.contiguous()


def forward(value: Tensor, shapes: list[int], locations: Tensor, weights: Tensor) -> Tensor:
    """value [B, S, M, D], shapes flat (H_0, W_0, H_1, ...), locations [B, Q, M, L, P, 2],
    weights [B, Q, M, L, P], all fp32 on the CPU. Returns [B, Q, M * D]."""
    check_inputs(value, shapes, locations, weights)
    _check_tensors(value, locations, weights)
    lib = _library_or_raise()
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = locations.shape
    value, locations, weights = value.contiguous(), locations.contiguous(), weights.contiguous()
    pairs, starts = _layout(shapes)
    out = value.new_empty(B, Q, M, D)
    ptrs = [t.data_ptr() for t in (value, pairs, starts, locations, weights, out)]
    lib.ms_deform_attn_forward(*ptrs, B, S, M, D, Q, L, P, _threads(Q * M * L * P))
    return out.view(B, Q, M * D)


def backward(grad_out: Tensor, value: Tensor, shapes: list[int], locations: Tensor,
             weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``forward`` for value, locations and weights (same shapes as those);
    grad_out is [B, Q, M, D] or [B, Q, M * D]."""
    check_inputs(value, shapes, locations, weights)
    check_grad(grad_out, value, locations)
    _check_tensors(grad_out, value, locations, weights)
    lib = _library_or_raise()
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = locations.shape
    value, locations, weights = value.contiguous(), locations.contiguous(), weights.contiguous()
    grad_out = grad_out.contiguous()
    pairs, starts = _layout(shapes)
    grad_value = torch.zeros_like(value)
    grad_locations, grad_weights = torch.empty_like(locations), torch.empty_like(weights)
    ptrs = [t.data_ptr() for t in (value, pairs, starts, locations, weights, grad_out,
                                   grad_value, grad_locations, grad_weights)]
    lib.ms_deform_attn_backward(*ptrs, B, S, M, D, Q, L, P, _threads(Q * M * L * P))
    return grad_value, grad_locations, grad_weights
