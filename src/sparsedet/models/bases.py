"""The base detectors (papers and official code: docs/methods.md): what each builds around the shared chain
(its queries, the decoder it names) and the rules it states. ``DetectionTransformer`` reads this table
and names no base detector itself; a new base is one ``register_base`` call (and its decoder, if new,
one ``register_decoder`` class), in any module that is imported (a plug-in's)."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import nn

from ..config import ModelConfig, parse_value
from ..stage_kinds import BASES, DECODERS, MIXED_QUERY_SELECTION, TOKEN_PROJECTION, register_base  # noqa: F401
from .decoders import Decoder
from .projection import TokenProjection
from .queries import AnchorPointQueries, BoxQueries, LearnedQueries, ProposalQueries


def _nothing(c: ModelConfig) -> None:
    """No rule beyond the shared chain's."""


@dataclass(frozen=True)
class Base:
    """queries: builds the query stage for a config, given the model's ``TokenProjection`` (None
    unless the base provides one). decoder: the decoder kind it uses (``register_decoder``; its
    ``single_level`` makes the model single-level). provides: what its queries give the other
    stages (``stage_kinds`` capabilities); provides_with: those it gives under a model setting
    ({capability: "field=value"}), which messages name as the fix. refines: boxes are refined layer
    by layer whatever ``box_refine`` says. shared_heads: the default of ``share_heads`` (None:
    shared unless boxes are refined). denoising: contrastive denoising queries in training.
    size_bias: the initial bias of the box heads' size outputs. check: refuses a model config it
    cannot be built into."""

    queries: Callable[[ModelConfig, TokenProjection | None], nn.Module]
    decoder: str
    provides: frozenset[str] = frozenset()
    provides_with: Mapping[str, str] = field(default_factory=dict)
    refines: bool = False
    shared_heads: bool | None = None
    denoising: bool = False
    size_bias: Callable[[ModelConfig], float] = lambda c: 0.0
    check: Callable[[ModelConfig], None] = _nothing

    @property
    def decoder_class(self) -> type[Decoder]:
        return DECODERS.find(self.decoder)

    @property
    def single_level(self) -> bool:
        return self.decoder_class.single_level

    def capabilities(self, c: ModelConfig) -> frozenset[str]:
        """What the queries (under ``c``) and the decoder give the other stages."""
        switched = {cap for cap, setting in self.provides_with.items() if _holds(c, setting)}
        return self.provides | switched | self.decoder_class.provides

    def refine(self, c: ModelConfig) -> bool:
        return self.refines or c.box_refine

    def share_heads(self, c: ModelConfig) -> bool:
        if c.share_heads is not None:
            return c.share_heads
        return self.shared_heads if self.shared_heads is not None else not c.box_refine


def _holds(c: ModelConfig, setting: str) -> bool:
    key, value = setting.split("=", 1)
    return getattr(c, key) == parse_value(value)


def _deformable_queries(c: ModelConfig, projection: TokenProjection | None) -> nn.Module:
    if c.two_stage:
        mode = "efficient" if c.efficient_queries else "two_stage"
        return ProposalQueries(mode, c.num_queries, c.hidden_dim, projection, c.proposal_nms)
    return LearnedQueries(c.num_queries, c.hidden_dim)


def _mixed_queries(c: ModelConfig, projection: TokenProjection | None) -> nn.Module:
    """DINO's mixed query selection: positions from the best proposals, learned content."""
    return ProposalQueries("mixed", c.num_queries, c.hidden_dim, projection, c.proposal_nms)


MIXED = frozenset({TOKEN_PROJECTION, MIXED_QUERY_SELECTION})
# Without two-stage proposals the first boxes are small: the size bias starts them at sigmoid(-2).
register_base("deformable", Base(_deformable_queries, "deformable", provides_with={TOKEN_PROJECTION: "two_stage=true"},
                                 size_bias=lambda c: 0.0 if c.two_stage else -2.0))
register_base("dino", Base(_mixed_queries, "dino", MIXED, refines=True, shared_heads=True, denoising=True))
register_base("conditional", Base(lambda c, p: AnchorPointQueries(c.num_queries, c.hidden_dim), "conditional",
                                  shared_heads=True))
register_base("sam", Base(lambda c, p: BoxQueries(c.num_queries, c.hidden_dim), "sam", refines=True,
                          shared_heads=False))
register_base("decoupled", Base(_mixed_queries, "decoupled", MIXED, refines=True, shared_heads=False))
