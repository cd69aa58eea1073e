"""Run folders: ``model.safetensors`` + ``config.json``, written atomically."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..config import Config
from ..errors import SparsedetError

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: a crash never leaves
    a half-written file in place of the previous one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_run(run_dir: str | Path, state_dict: dict[str, torch.Tensor], config: Config,
             extra: dict | None = None) -> None:
    run_dir = Path(run_dir)
    # safetensors refuses tensors that share memory; store each once, contiguous.
    tensors = {k: v.detach().contiguous().clone() for k, v in state_dict.items()}
    atomic_write(run_dir / WEIGHTS, lambda p: save_file(tensors, p))
    payload = config.to_dict()
    from .. import __version__
    payload["sparsedet_version"] = __version__
    if extra:
        payload.update(extra)
    atomic_write(run_dir / CONFIG, lambda p: Path(p).write_text(json.dumps(payload, indent=2)))


def load_run(run_dir: str | Path) -> tuple[Config, dict[str, torch.Tensor]]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SparsedetError(
            f"run folder not found: {run_dir}; pass a folder written by `sparsedet train` or `convert`")
    for name in (WEIGHTS, CONFIG):
        if not (run_dir / name).is_file():
            raise SparsedetError(f"{run_dir} has no {name}; it is not a sparsedet run folder")
    try:
        raw = json.loads((run_dir / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise SparsedetError(f"malformed {run_dir / CONFIG}: {e}") from None
    raw = {k: v for k, v in raw.items() if k in ("model", "data", "train")}
    config = Config.from_dict(raw)
    try:
        state = load_file(str(run_dir / WEIGHTS))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for corrupt files
        raise SparsedetError(f"could not read {run_dir / WEIGHTS}: {e}") from None
    return config, state
