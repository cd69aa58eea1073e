"""Encoders by ``model.encoder.kind``: the one table from config name to class
(``register_encoder`` adds one), and the contract every encoder keeps (``Encoder``).

An encoder class is built as ``cls.from_config(model_config)``. A token-sparse one also declares
``supervision`` (its scorer's loss, from ``losses/selection.py``), ``config_fields`` (the
``model.encoder.*`` fields it reads, so that overrides of the others are refused) and, where it
needs more of the model than the chain gives, ``check(config)``.
"""
from __future__ import annotations

from typing import Protocol

from torch import nn

from ...config import ModelConfig
from ...errors import SparsedetError
from ...plugins import not_found_hint
from ...nn.neck import MultiLevel
from ..projection import TokenProjection
from .dense import DenseEncoder, EncoderOutput
from .focus import FocusEncoder
from .global_attention import GlobalEncoder
from .salience import SalienceEncoder
from .sparse import SparseEncoder


class Encoder(Protocol):
    """The neck's levels -> the memory (and a token-sparse encoder's selection and auxiliary
    predictions). ``projection``: the model's two-stage token projection and class head (None
    without two-stage proposals), which the token-sparse encoders score tokens with; the others
    ignore it."""

    def __call__(self, levels: MultiLevel, projection: TokenProjection | None) -> EncoderOutput: ...


ENCODERS: dict[str, type[nn.Module]] = {"dense": DenseEncoder, "global": GlobalEncoder, "sparse": SparseEncoder,
                                        "focus": FocusEncoder, "salience": SalienceEncoder}


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


def build_encoder(c: ModelConfig) -> nn.Module:
    cls = encoder_class(c.encoder.kind)
    if hasattr(cls, "check"):
        cls.check(c)
    return cls.from_config(c)
