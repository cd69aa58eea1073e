"""The base detectors (papers and official code: docs/methods.md): what each builds around the shared chain
(its queries and decoder) and the rules it states. ``DetectionTransformer`` reads this table and names no
base detector itself; a new base is one entry here plus its decoder and query modules."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..config import ModelConfig
from .decoders.conditional import ConditionalDecoder
from .decoders.decoupled import DecoupledDecoder
from .decoders.deformable import DeformableDecoder
from .decoders.sam import SamDecoder
from .queries import AnchorPointQueries, BoxQueries, LearnedQueries, ProposalQueries


@dataclass(frozen=True)
class Base:
    """queries / decoder: build the stage for a config. single_level: attends globally over the
    last backbone level alone (no level embedding). refines: boxes are refined layer by layer
    whatever ``box_refine`` says. shared_heads: the default of ``share_heads`` (None: shared unless
    boxes are refined). denoising: contrastive denoising queries in training. size_bias: the
    initial bias of the box heads' size outputs."""

    queries: Callable[[ModelConfig], nn.Module]
    decoder: Callable[[ModelConfig], nn.Module]
    single_level: bool = False
    refines: bool = False
    shared_heads: bool | None = None
    denoising: bool = False
    size_bias: Callable[[ModelConfig], float] = lambda c: 0.0

    def refine(self, c: ModelConfig) -> bool:
        return self.refines or c.box_refine

    def share_heads(self, c: ModelConfig) -> bool:
        if c.share_heads is not None:
            return c.share_heads
        return self.shared_heads if self.shared_heads is not None else not c.box_refine


def _deformable_queries(c: ModelConfig) -> nn.Module:
    if c.two_stage:
        mode = "efficient" if c.efficient_queries else "two_stage"
        return ProposalQueries(mode, c.num_queries, c.hidden_dim, c.num_classes, c.proposal_nms)
    return LearnedQueries(c.num_queries, c.hidden_dim)


def _mixed_queries(c: ModelConfig) -> nn.Module:
    """DINO's mixed query selection: positions from the best proposals, learned content."""
    return ProposalQueries("mixed", c.num_queries, c.hidden_dim, c.num_classes, c.proposal_nms)


def _deformable_decoder(c: ModelConfig, dino: bool = False) -> nn.Module:
    return DeformableDecoder(
        c.num_decoder_layers, c.hidden_dim, c.ffn_dim, c.dropout, c.num_levels, c.num_heads, c.dec_points,
        query_pos_from_reference=dino, final_norm=dino, look_forward_twice=dino, eps=c.sigmoid_eps)


BASES: dict[str, Base] = {
    # Without two-stage proposals the first boxes are small: the size bias starts them at sigmoid(-2).
    "deformable": Base(_deformable_queries, _deformable_decoder, size_bias=lambda c: 0.0 if c.two_stage else -2.0),
    "dino": Base(_mixed_queries, lambda c: _deformable_decoder(c, dino=True), refines=True, shared_heads=True,
                 denoising=True),
    "conditional": Base(
        lambda c: AnchorPointQueries(c.num_queries, c.hidden_dim),
        lambda c: ConditionalDecoder(c.num_decoder_layers, c.hidden_dim, c.ffn_dim, c.dropout, c.num_heads),
        single_level=True, shared_heads=True),
    "sam": Base(
        lambda c: BoxQueries(c.num_queries, c.hidden_dim),
        lambda c: SamDecoder(c.num_decoder_layers, c.hidden_dim, c.ffn_dim, c.dropout, c.num_heads, c.decoder.smca,
                             c.sigmoid_eps),
        single_level=True, refines=True, shared_heads=False),
    "decoupled": Base(
        _mixed_queries,
        lambda c: DecoupledDecoder(c.num_decoder_layers, c.hidden_dim, c.ffn_dim, c.dropout, c.num_heads,
                                   c.decoder.task_queries, c.decoder.split_cross_attention, c.decoder.task_points,
                                   c.sigmoid_eps),
        single_level=True, refines=True, shared_heads=False),
}
