"""Converters from released checkpoints to sparsedet run folders (one module per source)."""
from __future__ import annotations

from pathlib import Path

from ...config import apply_overrides
from ...engine.checkpoint import save_run
from ...presets import get_preset

SOURCES = ("hf-deformable-detr",)


def convert_to_run(source: str, path: str | Path, out: str | Path) -> None:
    """Convert ``path`` (as released by ``source``) and write a run folder to ``out``."""
    if source == "hf-deformable-detr":
        from .hf_deformable_detr import convert_hf_deformable_detr
        state, overrides = convert_hf_deformable_detr(path)
        config = get_preset("deformable_detr_r50")
    else:
        raise ValueError(f"unknown source {source!r}; choose one of {SOURCES}")
    overrides = dict(overrides)
    config.model.classes = overrides.pop("classes")
    config.model.category_ids = overrides.pop("category_ids")
    apply_overrides(config, overrides)
    # Building the model checks that the converted weights fit the config before anything is written.
    from ...api import Detector
    model = Detector.from_config(config)
    model.load_state_dict(state, strict=True)
    save_run(out, model.state_dict(), config)
