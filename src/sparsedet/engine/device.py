"""One place that turns a device name into a ``torch.device`` the machine really has."""
from __future__ import annotations

import torch

from ..errors import SparsedetError


def resolve_device(name: str | int | torch.device, fix: str = "train.device=cpu") -> torch.device:
    """``"auto"`` -> cuda when torch sees a GPU, else cpu; an int N is cuda:N. Anything else is
    checked: a CUDA device on a CPU build of torch, on a machine without a visible GPU, or past the
    last GPU is a SparsedetError that names ``fix`` (what to use instead, e.g. ``train.device=cpu``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device("cuda", name) if isinstance(name, int) else torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise SparsedetError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.version.cuda and not getattr(torch.version, "hip", None):
            raise SparsedetError(f"CUDA is not available in this torch build (torch {torch.__version__}); use {fix} "
                                 "or install a CUDA build of torch (pytorch.org)")
        if not torch.cuda.is_available():
            raise SparsedetError(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device; check "
                                 f"the driver and CUDA_VISIBLE_DEVICES, or use {fix}")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise SparsedetError(f"{device} asked for, but torch sees {count} CUDA device(s) (cuda:0 to "
                                 f"cuda:{count - 1}); use one of them or {fix}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise SparsedetError(f"MPS is not available on this machine; use {fix}")
    return device
