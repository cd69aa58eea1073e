"""Run folders and resumable checkpoints, written atomically.

A run folder holds ``model.safetensors`` + ``config.json`` (and ``ema.safetensors`` when training
kept an EMA). Training adds ``checkpoints/step_NNNNNNNN/`` (the newest ``keep`` of them) and
``checkpoints/best_step_NNNNNNNN/``: each a run folder plus ``train_state.pt`` (each part of the
trainer's state under its name: ``Trainer.state_parts``), written into a temporary folder and renamed, so a
crash at any moment leaves the previous checkpoint complete. A best checkpoint of a step that
also has a step checkpoint shares its files (hard links), so it costs no second copy on disk.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..config import Config
from ..errors import SparsedetError
from ..filewrite import atomic_write, fresh_path, guarded
from ..jsonfile import read_json_object
from ..version import __version__

WEIGHTS, EMA_WEIGHTS, CONFIG, TRAIN_STATE = "model.safetensors", "ema.safetensors", "config.json", "train_state.pt"
CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_BEST_DIR = re.compile(r"^best_step_(\d+)$")


def save_weights(path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    # safetensors refuses tensors that share memory; store each once, contiguous, on the CPU.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    atomic_write(path, lambda p: save_file(tensors, p))


def save_run(run_dir: str | Path, state_dict: dict[str, torch.Tensor], config: Config,
             extra: dict | None = None, ema_state: dict[str, torch.Tensor] | None = None) -> None:
    run_dir = Path(run_dir)
    save_weights(run_dir / WEIGHTS, state_dict)
    if ema_state is not None:
        save_weights(run_dir / EMA_WEIGHTS, ema_state)
    payload = config.to_dict()
    payload["sparsedet_version"] = __version__
    if extra:
        payload.update(extra)
    atomic_write(run_dir / CONFIG, lambda p: Path(p).write_text(json.dumps(payload, indent=2)))


def load_config(run_dir: str | Path) -> Config:
    """A run folder's config (its weights are not read)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SparsedetError(
            f"run folder not found: {run_dir}; pass a folder written by `sparsedet train` or `convert`")
    for name in (WEIGHTS, CONFIG):
        if not (run_dir / name).is_file():
            raise SparsedetError(f"{run_dir} has no {name}; it is not a sparsedet run folder")
    raw = read_json_object(run_dir / CONFIG, "run config")
    # preset and source travel on: a resumed or fine-tuned run still says where it started.
    return Config.from_dict({k: v for k, v in raw.items() if k in ("preset", "source", "model", "data", "train")})


def load_run(run_dir: str | Path, ema: bool = False) -> tuple[Config, dict[str, torch.Tensor]]:
    """The run's config and weights (its EMA weights with ``ema``), read without unpickling."""
    config = load_config(run_dir)
    path = Path(run_dir) / (EMA_WEIGHTS if ema else WEIGHTS)
    if ema and not path.is_file():
        raise SparsedetError(f"{run_dir} has no {EMA_WEIGHTS}; it was trained without train.ema=true")
    try:
        state = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for corrupt files
        raise SparsedetError(f"could not read {path}: {e}") from None
    return config, state


def save_checkpoint(run_dir: str | Path, name: str, state_dict: dict[str, torch.Tensor], config: Config,
                    train_state: dict, ema_state: dict[str, torch.Tensor] | None = None,
                    what: str = "checkpoint", needed: int | None = None) -> Path:
    """Write ``run_dir/checkpoints/name`` whole or not at all: into a temporary folder, then renamed.
    A failed write raises ``WriteFailed`` naming ``what`` (``needed``: the bytes it should take)."""

    def fill(folder: Path) -> None:
        save_run(folder, state_dict, config, ema_state=ema_state)
        torch.save(train_state, folder / TRAIN_STATE)

    return _write_folder(Path(run_dir) / CHECKPOINTS, name, fill, what, needed)


def link_checkpoint(checkpoint: Path, name: str) -> Path:
    """Make ``name`` (a folder beside ``checkpoint``) hold ``checkpoint``'s files without a second
    copy on disk: hard links where the file system has them, copies otherwise; whole or not at all."""

    def fill(folder: Path) -> None:
        for source in checkpoint.iterdir():
            _link_or_copy(source, folder / source.name)

    return _write_folder(checkpoint.parent, name, fill, f"checkpoint {name}")


def _write_folder(root: Path, name: str, fill, what: str, needed: int | None = None) -> Path:
    """``root/name`` as ``fill(folder)`` makes it, in a temporary folder renamed when complete; a
    failed write removes the temporary folder and raises ``WriteFailed`` naming ``what``."""
    final = root / name
    with guarded(final, what, needed):
        root.mkdir(parents=True, exist_ok=True)
        tmp = fresh_path(root, f".{name}.", os.mkdir)
        try:
            fill(tmp)
            if final.exists():  # the same step saved twice (e.g. the last step is also a checkpoint step)
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return final


def publish(checkpoint: Path, run_dir: str | Path, what: str = "run folder's weights") -> None:
    """Make ``run_dir``'s weights and config those of ``checkpoint`` (a folder inside it): hard links
    where the file system has them (no second serialisation), copies otherwise; each file replaced
    atomically."""
    for name in (WEIGHTS, EMA_WEIGHTS, CONFIG):
        source = checkpoint / name
        if source.is_file():
            atomic_write(Path(run_dir) / name, lambda tmp, source=source: _replace_with_link(source, Path(tmp)),
                         f"{what} ({name})")


def _replace_with_link(source: Path, target: Path) -> None:
    target.unlink()
    _link_or_copy(source, target)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _numbered(run_dir: Path, pattern: re.Pattern) -> list[tuple[int, Path]]:
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := pattern.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete step checkpoint of a run, or None."""
    found = _numbered(Path(run_dir), _STEP_DIR)
    return found[-1][1] if found else None


def prune_checkpoints(run_dir: str | Path, keep: int, upto: int | None = None) -> None:
    """Delete all but the newest ``keep`` step checkpoints and all but the newest best checkpoint,
    and leftovers of interrupted writes. With ``upto`` (the step training is at), checkpoints of
    later steps are neither counted nor deleted: a run resumed from an older checkpoint (the newest
    was corrupt) keeps what it has just written, and overwrites the later ones when it gets there."""
    run_dir = Path(run_dir)

    def counted(pattern: re.Pattern) -> list[tuple[int, Path]]:
        return [(s, p) for s, p in _numbered(run_dir, pattern) if upto is None or s <= upto]

    doomed = [p for _, p in counted(_STEP_DIR)[:-max(keep, 1)]]
    doomed += [p for _, p in counted(_BEST_DIR)[:-1]]
    doomed += list((run_dir / CHECKPOINTS).glob(".*.tmp"))
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)


def load_train_state(checkpoint: str | Path) -> dict:
    """A checkpoint's training state, each part under its name (an older checkpoint's flat layout
    read into that one); tensors and plain containers only (``weights_only=True``)."""
    path = Path(checkpoint) / TRAIN_STATE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SparsedetError(f"{path} not found: {checkpoint} is not a resumable checkpoint") from None
    except Exception as e:  # noqa: BLE001 - corrupt or foreign pickles raise many types
        raise SparsedetError(f"could not read {path} as a training state: {e}") from None
    try:
        return state if "trainer" in state else _by_part(state)
    except (KeyError, TypeError) as e:  # a readable file that holds something else
        raise SparsedetError(f"could not read {path} as a training state: it has no {e}") from None


def _by_part(flat: dict) -> dict:
    """The one flat dict of counters and parts that checkpoints held before each part kept its own
    state, in today's layout, so that older runs resume."""
    return {"trainer": {key: flat[key] for key in ("step", "trained_seconds", "skipped_images")},
            "data": {"epoch": flat["epoch"], "batch_in_epoch": flat["batch_in_epoch"]},
            "optimizer": flat["optimizer"], "scaler": flat["scaler"],
            "rng": {"world_size": flat["world_size"], "states": flat["rng"]},
            "ema": {"updates": flat["ema_updates"]}, "checkpoints": {"best": flat["best"]}}


def split_resume_target(path: str | Path) -> tuple[Path, Path | None]:
    """``--resume PATH`` -> (run folder, checkpoint): a run folder resumes from its newest checkpoint
    (None here), ``RUN/checkpoints/NAME`` from that one."""
    path = Path(path)
    if path.parent.name == CHECKPOINTS:
        return path.parent.parent, path
    return path, None


def is_intact(checkpoint: Path) -> bool:
    """Whether every file of ``checkpoint`` reads (its weights, EMA weights and training state)."""
    try:
        load_train_state(checkpoint)
        load_run(checkpoint)
        if (checkpoint / EMA_WEIGHTS).is_file():
            load_run(checkpoint, ema=True)
    except SparsedetError:
        return False
    return True


def newest_intact_checkpoint(run_dir: str | Path, other_than: Path | None = None) -> Path | None:
    """The newest step or best checkpoint of the run (by step; a step checkpoint first) whose files
    all read, skipping ``other_than``; None when there is none. Reads each until one reads."""
    found = _numbered(Path(run_dir), _STEP_DIR) + _numbered(Path(run_dir), _BEST_DIR)
    for _, path in sorted(found, key=lambda f: (f[0], f[1].name.startswith("step_")), reverse=True):
        if (other_than is None or path.resolve() != Path(other_than).resolve()) and is_intact(path):
            return path
    return None


def folder_bytes(folder: Path) -> int:
    """The size of the files in ``folder`` (a checkpoint: what the next one will take again)."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def tensor_bytes(obj: object) -> int:
    """The bytes of the tensors in ``obj`` (nested dicts, lists and tuples): a new checkpoint's size
    to within its small non-tensor part."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0
