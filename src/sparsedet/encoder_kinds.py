"""The ``model.encoder.kind`` -> encoder class table (``register_encoder`` adds one).

The table sits below ``config`` and ``losses``, which read what a class declares (``config_fields``:
the ``model.encoder.*`` fields it reads; ``supervision``: its scorer's loss); the classes sit above
both, in ``models/encoders``, which puts the built-in ones in the table when it is imported
(``import sparsedet`` imports it) and is where users import these names from.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import SparsedetError
from .plugins import not_found_hint

if TYPE_CHECKING:
    from torch import nn

ENCODERS: dict[str, type[nn.Module]] = {}


def register_encoder(kind: str):
    """Class decorator: ``model.encoder.kind=KIND`` builds the decorated class."""
    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if kind in ENCODERS and ENCODERS[kind] is not cls:
            raise SparsedetError(f"encoder kind {kind!r} is already {ENCODERS[kind].__name__}")
        ENCODERS[kind] = cls
        return cls
    return add


def encoder_class(kind: str) -> type[nn.Module]:
    if kind not in ENCODERS:
        hint = not_found_hint()  # loads the installed plugins, which may register the kind
        if kind not in ENCODERS:
            raise SparsedetError(f"unknown encoder kind {kind!r}; choose one of {', '.join(ENCODERS)}{hint}")
    return ENCODERS[kind]
