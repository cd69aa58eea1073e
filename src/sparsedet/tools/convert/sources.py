"""The released formats ``sparsedet convert --from NAME`` reads (``SOURCES``), converted to our model
and its config (``convert_model``) and written as a run folder (``convert_to_run``). Below
``api.py``, which converts a zoo name on first use through ``convert_to_run``; the package's
``convert`` (above ``api.py``) returns the model as a ``Detector``."""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ...config import Config, apply_overrides
from ...data.categories import coco_class_table, raw_id_table
from ...engine.checkpoint import save_run
from ...errors import SparsedetError, close_names
from ...models.detector import DetectionTransformer
from ...presets import get_preset
from .common import Renamed, check_layout
from .hf_conditional_detr import convert_hf_conditional_detr
from .hf_deformable_detr import convert_hf_deformable_detr
from .official_conditional_detr import convert_official_conditional_detr
from .official_deformable_detr import convert_official_deformable_detr
from .official_dino import convert_official_dino
from .official_focus_detr import convert_official_focus_detr
from .official_salience_detr import convert_official_salience_detr
from .official_sam_detr import convert_official_sam_detr
from .official_sparse_detr import convert_official_sparse_detr


@dataclass(frozen=True)
class Source:
    """A released format ``sparsedet convert --from NAME`` reads.

    read: path -> (state dict in our names, config overrides the file implies), applied over
    the preset named ``preset``.
    """

    name: str
    preset: str
    read: Callable[[str | Path], tuple[Renamed, dict]]


SOURCES: dict[str, Source] = {source.name: source for source in (
    Source("hf-deformable-detr", "deformable_detr_r50", convert_hf_deformable_detr),
    Source("hf-conditional-detr", "conditional_detr_r50", convert_hf_conditional_detr),
    Source("official-deformable-detr", "deformable_detr_r50", convert_official_deformable_detr),
    Source("official-conditional-detr", "conditional_detr_r50", convert_official_conditional_detr),
    Source("official-dino", "dino_r50", convert_official_dino),
    Source("official-sparse-detr", "sparse_detr_r50", convert_official_sparse_detr),
    Source("official-focus-detr", "focus_detr_r50", convert_official_focus_detr),
    Source("official-salience-detr", "salience_detr_r50", convert_official_salience_detr),
    Source("official-sam-detr", "sam_detr_r50", convert_official_sam_detr),
)}


def convert_model(source: str, path: str | Path, overrides: dict | list[str] | None = None,
                  build: Callable[[Config], nn.Module] | None = None):
    """Returns (the model ``build(config)`` makes, with the converted weights loaded, its ``Config``);
    ``build`` defaults to ``DetectionTransformer``, ``Detector``'s base (``convert`` passes
    ``Detector.from_config``).

    overrides: config values the checkpoint cannot tell (e.g. ``{"model.encoder.object_tokens": 64}``),
    applied after those read from it.
    """
    if source not in SOURCES:
        close = close_names(source, SOURCES)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise SparsedetError(f"unknown checkpoint source {source!r}; {hint}choose one of {', '.join(sorted(SOURCES))}")
    try:
        model, state, config = _convert(SOURCES[source], path, overrides, build or _base_model)
    except SparsedetError as e:  # every message says which source the file was read as
        raise SparsedetError(f"convert --from {source}: {e}") from None
    model.load_state_dict(state, strict=False)
    return model.eval(), config


def _base_model(config: Config) -> nn.Module:
    return DetectionTransformer(config.model)


def _convert(source: Source, path: str | Path, overrides, build: Callable[[Config], nn.Module]):
    state, found = source.read(path)
    config: Config = get_preset(source.preset)
    config.source = f"{source.name}: {Path(path).name}"
    config.model.mask_padding = False  # the official code's features on a padded batch (parity)
    found = dict(found)
    config.model.classes, config.model.category_ids = _class_table(found, path)
    apply_overrides(config, found)
    apply_overrides(config, overrides or {})
    model = build(config)
    ours = model.state_dict()
    check_layout(state, [k for k in ours if not k.endswith("num_batches_tracked")])
    misshapen = [f"{state.origin.get(k, k)} {tuple(v.shape)} (expected {tuple(ours[k].shape)})"
                 for k, v in state.items() if v.shape != ours[k].shape]
    if misshapen:
        raise SparsedetError(f"{path}: shapes do not fit the model the file describes ({len(misshapen)} tensors): "
                             f"{', '.join(misshapen[:5])}")
    return model, state, config


def _class_table(found: dict, path) -> tuple[list[str], list[int]]:
    """The class table a converter read from the file, else the COCO table its column count implies."""
    if "classes" in found:
        return found.pop("classes"), found.pop("category_ids")
    n = found["model.num_classes"]
    table = coco_class_table(n)
    if table is None:
        warnings.warn(f"{path}: {n} classes is not a COCO class table, so column i is taken to be category "
                      f"id i, as the official code trains on custom data; name them with model.classes=[...]",
                      stacklevel=5)  # the caller of convert_model or convert
        table = raw_id_table([f"class {i}" for i in range(n)])
    return table


def convert_to_run(source: str, path: str | Path, out: str | Path, overrides: dict | list[str] | None = None) -> None:
    """Convert ``path`` (as released by ``source``) and write a run folder to ``out``."""
    model, config = convert_model(source, path, overrides)
    save_run(out, model.state_dict(), config)
