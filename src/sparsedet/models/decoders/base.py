"""What every decoder is: the first queries and the encoder's memory -> every layer's queries and
references (``DecoderOutput``), built from the model config, and what it declares to the rest of
the model (read as class attributes, never probed)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from ...nn.neck import MultiLevel
from ..stage import Stage


@dataclass
class DecoderOutput:
    """hidden: per layer the queries [B, Q, C] the heads read (SD-DETR: a pair, the class and the
    box stream); references: per layer the reference [B, Q, 2|4] in [0, 1] that layer's box delta
    is added to; sampling: when recorded, (locations [B, layers, Q, heads, levels, points, 2] as
    (x, y) in [0, 1] of the padded input, weights [B, layers, Q, heads, levels, points]), else None."""

    hidden: list[Tensor | tuple[Tensor, Tensor]]
    references: list[Tensor]
    sampling: tuple[Tensor, Tensor] | None = None


class Decoder(Stage):
    """The base of every decoder (``register_decoder`` takes its subclasses; a base detector names
    one by its kind).

    config_fields: the ``model.decoder.*`` fields it reads (overrides of the others are refused for
    the model kinds built on it); provides: what it gives the other stages (``stage_kinds``
    capabilities: ``DECODER_SAMPLING``, where it can record where it sampled); single_level, check,
    from_config: ``Stage``.

    ``forward``: the first queries (``tgt`` [B, Q, C], ``reference`` [B, Q, 2|4] in [0, 1],
    ``query_pos``), the memory [B, S, C] and its levels -> ``DecoderOutput``. ``attn_mask`` keeps
    denoising groups apart; ``box_heads`` refine boxes layer by layer where given;
    ``record_sampling`` asks for the sampling (given only where declared). A decoder ignores what
    its method has no use for.
    """

    provides: frozenset[str] = frozenset()

    def forward(self, tgt: Tensor, reference: Tensor, memory: Tensor, levels: MultiLevel,
                query_pos: Tensor | None = None, attn_mask: Tensor | None = None,
                box_heads: list[Callable[[Tensor], Tensor]] | None = None,
                record_sampling: bool = False) -> DecoderOutput:
        raise NotImplementedError
