"""Decoders: deformable.py (Deformable DETR, DINO), conditional.py, sam.py (SAM-DETR, SMCA),
decoupled.py (SD-DETR). Which base detector uses which is declared in ``models/bases.py``; what
every decoder returns is ``DecoderOutput``."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from ...nn.neck import MultiLevel


@dataclass
class DecoderOutput:
    """hidden: per layer the queries [B, Q, C] the heads read (SD-DETR: a pair, the class and the
    box stream); references: per layer the reference [B, Q, 2|4] in [0, 1] that layer's box delta
    is added to; sampling: when recorded, (locations [B, layers, Q, heads, levels, points, 2] as
    (x, y) in [0, 1] of the padded input, weights [B, layers, Q, heads, levels, points]), else None."""

    hidden: list[Tensor | tuple[Tensor, Tensor]]
    references: list[Tensor]
    sampling: tuple[Tensor, Tensor] | None = None


class Decoder(Protocol):
    """The first queries (``tgt`` [B, Q, C], ``reference`` [B, Q, 2|4] in [0, 1], ``query_pos``),
    the memory [B, S, C] and its levels -> every layer's queries and references. ``attn_mask``
    keeps denoising groups apart; ``box_heads`` refine boxes layer by layer where given;
    ``record_sampling`` asks a deformable decoder for its sampling. A decoder ignores what its
    method has no use for."""

    def __call__(self, tgt: Tensor, reference: Tensor, memory: Tensor, levels: MultiLevel,
                 query_pos: Tensor | None = None, attn_mask: Tensor | None = None,
                 box_heads: list[Callable[[Tensor], Tensor]] | None = None,
                 record_sampling: bool = False) -> DecoderOutput: ...
