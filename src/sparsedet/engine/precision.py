"""Training precision: which autocast dtype ``train.amp`` means on this device, and the model
outputs brought back to fp32 for the losses."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..errors import SparsedetError


def resolve_amp(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.amp``: "bf16", "fp16" (trained with a loss scaler), "none", or
    "auto" = bf16 only where the hardware runs it natively (emulated bf16 on an older CPU is slower
    than fp32)."""
    if name == "none":
        return None
    if name == "fp16":
        return torch.float16
    if name not in ("auto", "bf16"):
        raise SparsedetError(f"train.amp must be none, bf16, fp16 or auto, got {name!r}")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if name == "bf16":
            warnings.warn("this GPU has no bf16; training in fp32 (train.amp=fp16 gives mixed precision on it)")
        return None
    native = cpu_has_native_bf16()
    if name == "bf16" and not native:
        warnings.warn("this CPU has no native bf16; training in bf16 anyway (slow)")
        return torch.bfloat16
    return torch.bfloat16 if native else None


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def outputs_in_fp32(out):
    """Losses run in fp32 whatever precision the forward pass used."""
    out.logits, out.boxes = out.logits.float(), out.boxes.float()
    out.aux = [{k: v.float() for k, v in a.items()} for a in out.aux]
    out.enc_aux = [{k: v.float() for k, v in a.items()} for a in out.enc_aux]
    if out.enc is not None:
        out.enc = {k: v.float() if torch.is_tensor(v) else v for k, v in out.enc.items()}
    if out.dn is not None:
        out.dn = {k: v.float() if torch.is_tensor(v) else v for k, v in out.dn.items()}
    return out
