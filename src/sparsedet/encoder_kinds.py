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
# What every encoder class declares (models/encoders/base.py, ``Encoder``, says what each means).
DECLARATIONS = ("supervision", "config_fields", "learns_from_decoder", "check", "from_config")


def register_encoder(kind: str):
    """Class decorator: ``model.encoder.kind=KIND`` builds the decorated class."""
    def add(cls: type[nn.Module]) -> type[nn.Module]:
        missing = [name for name in DECLARATIONS if not hasattr(cls, name)]
        if missing:  # checked once, here, so that the config, the losses and the detector read them directly
            raise SparsedetError(f"encoder kind {kind!r}: {cls.__name__} does not declare {', '.join(missing)}; derive "
                                 "it from sparsedet.models.encoders.Encoder (or one of the built-in encoders)")
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
