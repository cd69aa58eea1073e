"""Encoders by ``model.encoder.kind``: the one table from config name to class
(``register_encoder`` adds one), and the base class every encoder is (``Encoder``, in base.py:
``from_config``, ``check`` and what a token-sparse one declares).
"""
from __future__ import annotations

from torch import nn

from ...config import ModelConfig
from ...errors import SparsedetError
from ...encoder_kinds import ENCODERS, encoder_class, register_encoder  # noqa: F401 (re-exported)
from .base import Encoder, EncoderOutput  # noqa: F401 (re-exported)
from .dense import DenseEncoder
from .focus import FocusEncoder
from .global_attention import GlobalEncoder
from .salience import SalienceEncoder
from .sparse import SparseEncoder


# The built-in kinds, first in the table (which lives in encoder_kinds.py, below the config and the
# losses that read it).
ENCODERS.update({"dense": DenseEncoder, "global": GlobalEncoder, "sparse": SparseEncoder, "focus": FocusEncoder,
                 "salience": SalienceEncoder})


def build_encoder(c: ModelConfig) -> nn.Module:
    cls = encoder_class(c.encoder.kind)
    if not issubclass(cls, Encoder):
        raise SparsedetError(f"encoder kind {c.encoder.kind!r} is {cls.__name__}, which is not an Encoder: derive it "
                             "from sparsedet.models.encoders.Encoder (or one of the built-in encoders)")
    cls.check(c)
    return cls.from_config(c)
