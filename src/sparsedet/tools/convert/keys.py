"""Counting in state-dict key names, below both ``common.py`` and ``swin.py``, which read the
converted layout with it (common.py imports swin.py)."""
from __future__ import annotations

from collections.abc import Iterable


def layer_count(keys: Iterable[str], prefix: str) -> int:
    """How many numbered modules ``prefix<N>.`` the keys hold (1 + the largest N; 0 for none),
    e.g. decoder layers under ``transformer.decoder.layers.``."""
    return 1 + max((int(k[len(prefix):].split(".", 1)[0]) for k in keys if k.startswith(prefix)), default=-1)
