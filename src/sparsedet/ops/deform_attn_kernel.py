"""The ``cpu`` deformable-attention backend: ``deform_attn_cpu.c`` built once per machine with the
system C compiler and called through ctypes.

No PyTorch headers are involved, so the build takes well under a second; the library is cached
under ``$SPARSEDET_HOME/kernels`` (default ``~/.cache/sparsedet``), keyed by the source, the
compiler and the CPU (it is built for this CPU's instruction set). It is parallel with OpenMP and
loaded after PyTorch, so it joins the OpenMP runtime PyTorch loaded and follows
``torch.set_num_threads``; its own Python threads would compete with PyTorch's spinning OpenMP
workers on a small machine. Where no compiler works, ``load()`` returns None and says why once;
the caller falls back to another backend.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("deform_attn_cpu.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared", "-std=c11"]
OPENMP = "-fopenmp"  # dropped, with one thread per call, by compilers without OpenMP
# Below this many (query, head, point) samples a call runs on one thread: waking threads costs more.
PARALLEL_MIN_SAMPLES = 16384

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_failure: str | None = None


def cache_dir() -> Path:
    return Path(os.environ.get("SPARSEDET_HOME", Path.home() / ".cache" / "sparsedet")) / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _cpu_identity() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() or platform.machine()


def _build(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, version, " ".join(FLAGS), _cpu_identity()]).encode())
    target = cache_dir() / f"ms_deform_attn-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent processes never load a half-written file.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        command = [cc, *FLAGS, OPENMP, str(SOURCE), "-o", str(built), "-lm"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if result.returncode:
            command.remove(OPENMP)
            result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if result.returncode:
            raise RuntimeError(f"{cc} failed: {result.stderr.strip()[-500:]}")
        os.replace(built, target)
    return target


def load() -> ctypes.CDLL | None:
    """The built library, or None (with one warning per process) where it cannot be built."""
    global _library, _failure
    if _library is not None or _failure is not None:  # no lock once decided (torch.compile traces this)
        return _library
    with _lock:
        if _library is None and _failure is None:
            cc = _compiler()
            try:
                if cc is None:
                    raise RuntimeError("no C compiler found (set CC or install gcc)")
                lib = ctypes.CDLL(str(_build(cc)))
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                _failure = str(e)
                warnings.warn(f"deformable attention: the fast CPU kernel is unavailable ({_failure}); "
                              f"using the slower grid_sample path", stacklevel=3)
                return None
            long, ptr = ctypes.c_int64, ctypes.c_void_p
            lib.ms_deform_attn_forward.argtypes = [ptr] * 6 + [long] * 7 + [ctypes.c_int]
            lib.ms_deform_attn_backward.argtypes = [ptr] * 9 + [long] * 7 + [ctypes.c_int]
            lib.ms_deform_attn_forward.restype = lib.ms_deform_attn_backward.restype = None
            _library = lib
        return _library


def available() -> bool:
    return load() is not None


def _layout(shapes: list[int]) -> tuple[Tensor, Tensor]:
    pairs = torch.tensor(shapes, dtype=torch.long).view(-1, 2)
    starts = torch.cat([pairs.new_zeros(1), (pairs[:, 0] * pairs[:, 1]).cumsum(0)[:-1]])
    return pairs.contiguous(), starts.contiguous()


def forward(value: Tensor, shapes: list[int], locations: Tensor, weights: Tensor) -> Tensor:
    """value [B, S, M, D], shapes flat (H_0, W_0, H_1, ...), locations [B, Q, M, L, P, 2],
    weights [B, Q, M, L, P], all fp32 on the CPU. Returns [B, Q, M * D]."""
    lib = load()
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = locations.shape
    value, locations, weights = value.contiguous(), locations.contiguous(), weights.contiguous()
    pairs, starts = _layout(shapes)
    out = value.new_empty(B, Q, M, D)
    ptrs = [t.data_ptr() for t in (value, pairs, starts, locations, weights, out)]
    lib.ms_deform_attn_forward(*ptrs, B, S, M, D, Q, L, P, Q * M * L * P >= PARALLEL_MIN_SAMPLES)
    return out.view(B, Q, M * D)


def backward(grad_out: Tensor, value: Tensor, shapes: list[int], locations: Tensor,
             weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``forward`` for value, locations and weights (same shapes as those)."""
    lib = load()
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = locations.shape
    value, locations, weights = value.contiguous(), locations.contiguous(), weights.contiguous()
    grad_out = grad_out.contiguous()
    pairs, starts = _layout(shapes)
    grad_value = torch.zeros_like(value)
    grad_locations, grad_weights = torch.empty_like(locations), torch.empty_like(weights)
    ptrs = [t.data_ptr() for t in (value, pairs, starts, locations, weights, grad_out,
                                   grad_value, grad_locations, grad_weights)]
    lib.ms_deform_attn_backward(*ptrs, B, S, M, D, Q, L, P, Q * M * L * P >= PARALLEL_MIN_SAMPLES)
    return grad_value, grad_locations, grad_weights
