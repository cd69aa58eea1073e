"""What every encoder is: the neck's levels -> the memory (``EncoderOutput``), built from the model
config, and what it declares to the rest of the model (read as class attributes, never probed)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import Tensor, nn

from ...config import ModelConfig
from ...nn.neck import MultiLevel
from ...nn.tokens import TokenSelection
from ..heads import Predictions
from ..projection import TokenProjection

if TYPE_CHECKING:
    from ...losses.selection import SelectionSupervision


@dataclass
class EncoderOutput:
    """memory: [B, S, C]; selection: a sparse encoder's ``TokenSelection`` (None when dense);
    aux: detections on the sparse tokens of encoder layers (Sparse DETR)."""

    memory: Tensor
    selection: TokenSelection | None = None
    aux: list[Predictions] = field(default_factory=list)


class Encoder(nn.Module):
    """The base of every encoder (``register_encoder`` takes its subclasses).

    supervision: the loss of a token-sparse encoder's scorer (``loss_select``; None: it selects
    nothing); config_fields: the ``model.encoder.*`` fields it reads (overrides of the others are
    refused); needs: what it needs from the other stages (``stage_kinds`` capabilities: the token
    projection it scores with, the decoder's sampling its loss reads, which the detector then
    records in training), checked against what the base and its decoder provide; single_level: it
    attends over one feature level (the single-level decoders' encoder); check: refuses a model
    config it cannot be built into; from_config: builds it.

    ``forward(levels, projection)``: ``projection`` is the model's ``TokenProjection`` (None where
    the base provides none), which the token-sparse encoders score tokens with; the others ignore it.
    """

    supervision: type[SelectionSupervision] | None = None
    config_fields: tuple[str, ...] = ()
    needs: frozenset[str] = frozenset()
    single_level = False

    @classmethod
    def check(cls, c: ModelConfig) -> None:
        """Nothing beyond the shared chain is needed by default."""

    @classmethod
    def from_config(cls, c: ModelConfig) -> "Encoder":
        return cls(c)

    def forward(self, levels: MultiLevel, projection: TokenProjection | None = None) -> EncoderOutput:
        raise NotImplementedError
