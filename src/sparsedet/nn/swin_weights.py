"""Official Swin ImageNet files (microsoft/Swin-Transformer releases: ``{"model": state_dict}``)
fitted to our ``SwinTransformer``: what to skip, and bias tables resized to another window."""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor

from ..errors import SparsedetError
from .weights_file import read_backbone_file, require_tensors

# Not ours: the classifier and its final norm, and buffers the official code saves but we derive.
_SKIP = re.compile(r"(head|norm)\.\w+|.*\.(relative_position_index|attn_mask)")
_TABLE = "relative_position_bias_table"


def read_swin_weights(path: str | Path) -> dict[str, Tensor]:
    """The state dict in an official ``.pth`` (``model``/``state_dict`` entry or flat) or a
    ``.safetensors`` file, read without running pickled code."""
    state = require_tensors(read_backbone_file(path), path)
    return {str(k).removeprefix("module."): v for k, v in state.items()}


def resize_bias_table(table: Tensor, rows: int) -> Tensor:
    """[(2w-1)^2, heads] -> [rows, heads] for another window, resampling the (2w-1) x (2w-1) grid
    of each head bicubically."""
    heads, old, new = table.shape[1], math.isqrt(table.shape[0]), math.isqrt(rows)
    grid = table.T.reshape(1, heads, old, old).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return grid.reshape(heads, rows).T.to(table.dtype)


def fit_swin_weights(state: dict[str, Tensor], ours: dict[str, Tensor], path: str | Path,
                     variant: str) -> dict[str, Tensor]:
    """``state`` restricted to the tensors ``ours`` (our model's state dict) has, bias tables
    resized to our window. Refuses a file that leaves more than the output norms missing, has
    tensors we do not know (other than skipped ones and unbuilt stages) or of other shapes."""
    fitted, unexpected, misshapen = {}, [], []
    for key, value in state.items():
        if key not in ours:
            if not _SKIP.fullmatch(key) and not _unbuilt(key, ours):
                unexpected.append(key)
            continue
        if key.endswith(_TABLE) and value.shape != ours[key].shape and value.shape[1] == ours[key].shape[1]:
            value = resize_bias_table(value, ours[key].shape[0])
        if value.shape != ours[key].shape:
            misshapen.append(f"{key} {tuple(value.shape)} (expected {tuple(ours[key].shape)})")
        fitted[key] = value
    missing = [k for k in ours if k not in fitted and not re.fullmatch(r"norm\d\.\w+", k)]
    if missing or unexpected or misshapen:
        raise SparsedetError(
            f"backbone weights {path} do not fit Swin-{variant} (missing: {missing[:5]}, unexpected: "
            f"{unexpected[:5]}, misshapen: {misshapen[:3]}); expected an official Swin ImageNet file of "
            "the same variant (swin_tiny_* for T, swin_small_* for S, swin_base_* for B, swin_large_* for L)")
    return fitted


def _unbuilt(key: str, ours: dict[str, Tensor]) -> bool:
    """A tensor of a stage, or of the last built stage's patch merging, that our model leaves out."""
    m = re.match(r"layers\.\d+\.(downsample\.)?", key)
    return m is not None and not any(k.startswith(m.group(0)) for k in ours)
