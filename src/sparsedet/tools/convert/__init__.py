"""Converters from released checkpoints to sparsedet run folders (one module per source; sources.py:
the table of them and the conversion)."""
from __future__ import annotations

from pathlib import Path

from .sources import SOURCES, Source, convert_model, convert_to_run  # noqa: F401 (re-exported)


def convert(source: str, path: str | Path, overrides: dict | list[str] | None = None):
    """Returns (our ``Detector`` with the converted weights loaded, its ``Config``).

    overrides: config values the checkpoint cannot tell (e.g. ``{"model.encoder.object_tokens": 64}``),
    applied after those read from it.
    """
    from ...api import Detector  # this package's __init__ sits above api.py; sources.py below it

    return convert_model(source, path, overrides, build=Detector.from_config)
