"""Precision: the autocast dtype a precision word (``train.precision``, ``--precision``) means on
this device, the one inference context eval, predict, viz and bench run under, and the model
outputs brought back to fp32 for the losses."""
from __future__ import annotations

import threading
import warnings
import weakref
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


class LossScaler(torch.amp.GradScaler):
    """fp16 training's loss scaler (disabled in other precisions), as a part of a checkpoint's
    training state: the state of a run trained without one (empty) leaves it as it starts, so a
    run may resume in fp16 from a checkpoint of another precision."""

    def load_state_dict(self, state: dict) -> None:
        if state:
            super().load_state_dict(state)


def autocast(dtype: torch.dtype | None, device: torch.device):
    """Autocast to ``dtype`` on ``device``; None: off (fp32)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


@contextmanager
def inference_precision(model, dtype: torch.dtype | None):
    """Run ``model``'s inference in eval mode (see ``evaluating``) and in ``dtype`` (from
    ``resolve_precision``)."""
    with evaluating(model), autocast(dtype, next(model.parameters()).device):
        yield


_scope_lock = threading.Lock()
_in_scope: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> [open scopes, was training]


@contextmanager
def evaluating(model):
    """``model`` in eval mode for the block and in its previous mode after it, safe to enter from
    several threads at once: the first block to open switches the mode, the last to close switches
    it back, and none changes the model while another runs. A model already in eval mode (as
    ``from_pretrained`` returns it) is never touched."""
    with _scope_lock:
        scope = _in_scope.setdefault(model, [0, False])
        if scope[0] == 0:
            scope[1] = model.training
            if model.training:
                model.eval()
        scope[0] += 1
    try:
        yield
    finally:
        with _scope_lock:
            scope[0] -= 1
            if scope[0] == 0 and scope[1]:
                model.train()


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
