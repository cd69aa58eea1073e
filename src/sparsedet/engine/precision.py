"""Precision: the autocast dtype a precision word (``train.precision``, ``--precision``) means on
this device, the one autocast context train, eval, predict and bench run under, and the model
outputs brought back to fp32 for the losses."""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from ..config import PRECISIONS, TRAIN_PRECISIONS
from ..errors import SparsedetError

NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}  # autocast dtype -> precision word


def resolve_precision(name: str, device: torch.device, training: bool = False) -> torch.dtype | None:
    """The autocast dtype for a precision word, None for fp32: "fp32", "bf16", "fp16" (trained with
    a loss scaler; inference on CUDA only), or for training "auto" = bf16 only where the hardware
    runs it natively (emulated bf16 on an older CPU is slower than fp32)."""
    allowed = TRAIN_PRECISIONS if training else PRECISIONS
    if name not in allowed:
        raise SparsedetError(f"unknown precision {name!r}; choose one of {', '.join(allowed)}")
    if name == "fp32":
        return None
    if name == "fp16":
        if not training and device.type != "cuda":
            raise SparsedetError("fp16 runs on CUDA only; use bf16 (or fp32) on a CPU")
        return torch.float16
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if name == "bf16":
            warnings.warn("this GPU has no bf16; running in fp32 (fp16 gives mixed precision on it)")
        return None
    native = cpu_has_native_bf16()
    if name == "bf16" and not native:
        warnings.warn("this CPU has no native bf16; running in bf16 anyway (slow)")
        return torch.bfloat16
    return torch.bfloat16 if native else None


def autocast(dtype: torch.dtype | None, device: torch.device):
    """Autocast to ``dtype`` on ``device``; None: off (fp32)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


@contextmanager
def inference_precision(model, dtype: torch.dtype | None):
    """Run ``model``'s inference in ``dtype`` (from ``resolve_precision``), with the backbone
    channels_last (faster convolutions: an R50 at 800x1333 on a 2-core CPU takes 0.9 instead of
    1.2 s in fp32). The backbone gets its layout back on exit, so that training and saving see the
    model as it was. Enter it outside ``torch.inference_mode``: the re-laid-out weights must stay
    ordinary tensors."""
    model.backbone.to(memory_format=torch.channels_last)
    try:
        with autocast(dtype, next(model.parameters()).device):
            yield
    finally:
        model.backbone.to(memory_format=torch.contiguous_format)


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def outputs_in_fp32(out):
    """Losses run in fp32 whatever precision the forward pass used."""
    out.logits, out.boxes = out.logits.float(), out.boxes.float()
    out.aux = [a.float() for a in out.aux]
    out.enc_aux = [a.float() for a in out.enc_aux]
    out.enc = out.enc.float() if out.enc is not None else None
    out.dn = out.dn.float() if out.dn is not None else None
    return out
