"""Encoders by ``model.encoder.kind``: the one table from config name to class, and the contract
every encoder keeps (``Encoder``)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from torch import nn

from ...config import ModelConfig
from ...errors import SparsedetError
from ...nn.neck import MultiLevel
from .dense import DenseEncoder, EncoderOutput
from .focus import FocusEncoder
from .global_attention import GlobalEncoder
from .salience import SalienceEncoder
from .sparse import SparseEncoder

if TYPE_CHECKING:  # queries imports the encoders' scoring
    from ..queries import TokenProjection


class Encoder(Protocol):
    """The neck's levels -> the memory (and a token-sparse encoder's selection and auxiliary
    predictions). ``queries`` lends its token projection and class head, which the token-sparse
    encoders score tokens with; the others ignore it."""

    def __call__(self, levels: MultiLevel, queries: TokenProjection) -> EncoderOutput: ...


ENCODERS = {"dense": None, "global": GlobalEncoder, "sparse": SparseEncoder, "focus": FocusEncoder, "salience": SalienceEncoder}


def build_encoder(c: ModelConfig) -> nn.Module:
    kind = c.encoder.kind
    if kind not in ENCODERS:
        raise SparsedetError(f"unknown encoder kind {kind!r}; choose one of {', '.join(ENCODERS)}")
    if kind == "dense":
        return DenseEncoder(c.num_encoder_layers, c.hidden_dim, c.ffn_dim, c.dropout, c.num_levels, c.num_heads,
                            c.enc_points)
    if kind == "global":
        return GlobalEncoder(c.num_encoder_layers, c.hidden_dim, c.ffn_dim, c.dropout, c.num_heads)
    if kind in ("focus", "salience") and c.kind != "dino":
        raise SparsedetError(f"encoder.kind={kind!r} needs the DINO base (kind='dino'): its object scores come "
                             "from the mixed query selection's class head")
    if kind == "sparse" and not c.two_stage:
        raise SparsedetError("encoder.kind='sparse' scores tokens with the two-stage projection; set two_stage=true")
    return ENCODERS[kind](c)
