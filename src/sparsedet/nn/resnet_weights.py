"""ImageNet ResNet weights from the files users have: torchvision state dicts (``resnet50-*.pth``,
or ``.safetensors``) and detectron2 pickles (``R-50.pkl``, ``r50_v1.pkl``: torchvision weights under
detectron2 names, numpy arrays). Pickles are read without running arbitrary code: torch files with
``weights_only=True``, detectron2 pickles with an unpickler that only rebuilds numpy arrays.
"""
from __future__ import annotations

import importlib
import pickle
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import SparsedetError
from .weights_file import read_backbone_file, require_tensors

# What a detectron2 ``.pkl`` may reference: numpy's array reconstruction and containers.
_NUMPY_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                  ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict")}

_D2_STAGE = re.compile(r"res([2-5])\.(\d+)\.(conv[1-3]|shortcut)(\.norm)?\.(\w+)")
_D2_STEM = re.compile(r"stem\.(conv1|fc)(\.norm)?\.(\w+)")


def detectron2_name(key: str) -> str | None:
    """torchvision name of a detectron2 ResNet parameter (``res2.0.conv1.norm.weight`` ->
    ``layer1.0.bn1.weight``); None when ``key`` is not one."""
    if m := _D2_STEM.fullmatch(key):
        layer, norm, leaf = m.groups()
        return f"{'bn1' if norm else layer}.{leaf}"
    if m := _D2_STAGE.fullmatch(key):
        stage, block, layer, norm, leaf = m.groups()
        if layer == "shortcut":
            part = "downsample.1" if norm else "downsample.0"
        else:
            part = f"bn{layer[-1]}" if norm else layer
        return f"layer{int(stage) - 1}.{block}.{part}.{leaf}"
    return None


class _NumpyOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module.replace("numpy._core", "numpy.core"), name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are allowed)")
        if module.startswith("numpy.core") and hasattr(np, "_core"):  # numpy 2 renamed numpy.core
            module = module.replace("numpy.core", "numpy._core")
        return getattr(importlib.import_module(module), name)


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            data = _NumpyOnly(f, encoding="latin1").load()
    except Exception as e:  # noqa: BLE001 - any failure means a file we refuse to read
        raise SparsedetError(f"could not read {path} as a detectron2 weights pickle: {e}") from None
    if not isinstance(data, dict):
        raise SparsedetError(f"{path} holds a {type(data).__name__}, not a detectron2 weights dict")
    return data.get("model", data)


def read_resnet_weights(path: str | Path) -> dict[str, Tensor]:
    """A ResNet state dict in torchvision names (``fc.*`` included when the file has it)."""
    state = read_backbone_file(path, _read_pickle)
    if any(re.fullmatch(r"(res\d_\d+_branch\w+|conv1)_w", str(k)) for k in state):
        raise SparsedetError(
            f"{path} is a Caffe2 (MSRA) ResNet: it strides in the 1x1 convolutions and expects BGR 0-255 "
            "pixels, which our ResNet does not; use torchvision weights (resnet50-*.pth) or their detectron2 "
            "conversion (ImageNetPretrained/torchvision/R-50.pkl)")
    out = {}
    for key, value in state.items():
        key = str(key).removeprefix("module.").removeprefix("backbone.").removeprefix("body.")
        key = detectron2_name(key) or key
        out[key] = torch.as_tensor(value) if isinstance(value, np.ndarray) else value
    return require_tensors(out, path)
