"""Decoders: deformable.py (Deformable DETR, DINO), conditional.py, sam.py (SAM-DETR, SMCA),
decoupled.py (SD-DETR). Which base detector uses which is declared in ``models/bases.py``; what
every decoder returns is ``DecoderOutput``."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class DecoderOutput:
    """hidden: per layer the queries [B, Q, C] the heads read (SD-DETR: a pair, the class and the
    box stream); references: per layer the reference [B, Q, 2|4] in [0, 1] that layer's box delta
    is added to; sampling: when recorded, (locations [B, layers, Q, heads, levels, points, 2] as
    (x, y) in [0, 1] of the padded input, weights [B, layers, Q, heads, levels, points]), else None."""

    hidden: list[Tensor | tuple[Tensor, Tensor]]
    references: list[Tensor]
    sampling: tuple[Tensor, Tensor] | None = None
