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
from ...encoder_kinds import ENCODERS, encoder_class, register_encoder  # noqa: F401 (re-exported)
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


# The built-in kinds, first in the table (which lives in encoder_kinds.py, below the config and the
# losses that read it).
ENCODERS.update({"dense": DenseEncoder, "global": GlobalEncoder, "sparse": SparseEncoder, "focus": FocusEncoder,
                 "salience": SalienceEncoder})


def build_encoder(c: ModelConfig) -> nn.Module:
    cls = encoder_class(c.encoder.kind)
    if hasattr(cls, "check"):
        cls.check(c)
    return cls.from_config(c)
