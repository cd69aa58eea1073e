"""What every encoder is: the neck's levels -> the memory (``EncoderOutput``), built from the model
config, and what it declares to the rest of the model (read as class attributes, never probed)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import Tensor

from ...nn.neck import MultiLevel
from ...nn.tokens import TokenSelection
from ..heads import Predictions
from ..projection import TokenProjection
from ..stage import Stage

if TYPE_CHECKING:
    from ...losses.selection import SelectionSupervision


@dataclass
class EncoderOutput:
    """memory: [B, S, C]; selection: a sparse encoder's ``TokenSelection`` (None when dense);
    aux: detections on the sparse tokens of encoder layers (Sparse DETR)."""

    memory: Tensor
    selection: TokenSelection | None = None
    aux: list[Predictions] = field(default_factory=list)


class Encoder(Stage):
    """The base of every encoder (``register_encoder`` takes its subclasses).

    supervision: the loss of a token-sparse encoder's scorer (``loss_select``; None: it selects
    nothing); config_fields: the ``model.encoder.*`` fields it reads; needs: what it needs from
    the other stages (``stage_kinds`` capabilities: the token projection it scores with, the
    decoder's sampling its loss reads, which the detector then records in training), checked
    against what the base and its decoder provide; single_level, check, from_config: ``Stage``.

    ``forward(levels, projection)``: ``projection`` is the model's ``TokenProjection`` (None where
    the base provides none), which the token-sparse encoders score tokens with; the others ignore it.
    """

    supervision: type[SelectionSupervision] | None = None
    needs: frozenset[str] = frozenset()

    def forward(self, levels: MultiLevel, projection: TokenProjection | None = None) -> EncoderOutput:
        raise NotImplementedError
