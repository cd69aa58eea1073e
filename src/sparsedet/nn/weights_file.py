"""Reading an ImageNet backbone file: one place for the checks every backbone's reader shares."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from ..errors import SparsedetError


def read_backbone_file(path: str | Path, pickle_reader: Callable[[Path], dict] | None = None) -> dict:
    """The mapping of names to arrays in ``path``: ``.safetensors``, a torch file read with
    ``weights_only=True`` (no pickled code runs), or a ``.pkl`` read by ``pickle_reader`` where the
    backbone has one; a ``{"model": ...}`` or ``{"state_dict": ...}`` wrapper is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise SparsedetError(f"backbone weights not found: {path}; pass an existing file as "
                             "model.backbone.weights=PATH")
    if path.suffix == ".pkl" and pickle_reader is not None:
        state = pickle_reader(path)
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means a wrong file
            raise SparsedetError(f"could not read backbone weights {path}: {e}") from None
        if isinstance(state, dict):
            state = state.get("model", state.get("state_dict", state))
    if not isinstance(state, dict):
        raise SparsedetError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return state


def require_tensors(state: dict, path: str | Path) -> dict[str, Tensor]:
    if not all(isinstance(v, Tensor) for v in state.values()):
        raise SparsedetError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return state
