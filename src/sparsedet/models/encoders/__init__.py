"""Encoders by ``model.encoder.kind``: the one table from config name to class
(``register_encoder`` adds one), and the base class every encoder is (``Encoder``, in base.py:
``from_config``, ``check`` and what it declares to the other stages).
"""
from __future__ import annotations

from ...config import ModelConfig
from ...stage_kinds import ENCODERS, encoder_class, register_encoder  # noqa: F401 (re-exported)
from .base import Encoder, EncoderOutput  # noqa: F401 (re-exported)
from .dense import DenseEncoder
from .focus import FocusEncoder
from .global_attention import GlobalEncoder
from .salience import SalienceEncoder
from .sparse import SparseEncoder


# The built-in kinds, first in the table (which lives in stage_kinds.py, below the config and the
# losses that read it).
ENCODERS.update({"dense": DenseEncoder, "global": GlobalEncoder, "sparse": SparseEncoder, "focus": FocusEncoder,
                 "salience": SalienceEncoder})


def build_encoder(c: ModelConfig) -> Encoder:
    return ENCODERS.build(c.encoder.kind, c, Encoder)
