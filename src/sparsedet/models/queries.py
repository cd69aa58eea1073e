"""Decoder query initialisation: learned queries (Deformable DETR's, Conditional DETR's anchor
points, SAM-DETR's reference boxes), two-stage proposals, mixed query selection.

All return a ``QueryInit``: content queries, initial references (sigmoid space) and,
for the two-stage kinds, the encoder-side predictions that get their own loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from ..nn.init import keep_own_init
from ..nn.mlp import MLP
from ..nn.neck import MultiLevel
from ..nn.position import sine_embed_coords
from ..ops.boxes import cell_nms_batch
from ..ops.functional import gather_rows, host_tensor, token_levels, top_k
from ..ops.padding import rank_padding_last
from .heads import ProposalPredictions
from .projection import TokenProjection


class Queries(Protocol):
    """The encoder's memory and levels -> the decoder's first queries (``QueryInit``)."""

    def __call__(self, memory: Tensor, levels: MultiLevel) -> QueryInit: ...


@dataclass
class QueryInit:
    """tgt: [B, Q, C] content; reference: [B, Q, 2|4] in [0, 1]; query_pos: [B, Q, C] or None
    (then the decoder derives it from the reference); enc: the proposals' predictions or None."""

    tgt: Tensor
    reference: Tensor
    query_pos: Tensor | None = None
    enc: ProposalPredictions | None = None


class LearnedQueries(nn.Module):
    """Single-stage Deformable DETR: an embedding holds query_pos and tgt; references are
    predicted from query_pos (2-D)."""

    def __init__(self, num_queries: int, dim: int):
        super().__init__()
        self.query_embed = nn.Embedding(num_queries, 2 * dim)
        self.reference_points = nn.Linear(dim, 2)
        keep_own_init(self.query_embed)  # N(0, 1), as the official top-level model
        self.reset_parameters()

    reinit_after_xavier = True

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
        nn.init.zeros_(self.reference_points.bias)

    def forward(self, memory: Tensor, levels: MultiLevel) -> QueryInit:
        B = memory.shape[0]
        pos, tgt = self.query_embed.weight.chunk(2, dim=-1)
        pos, tgt = pos[None].expand(B, -1, -1), tgt[None].expand(B, -1, -1)
        return QueryInit(tgt, self.reference_points(pos).sigmoid(), pos)


class AnchorPointQueries(nn.Module):
    """Conditional DETR: learned positional queries (``query_embed``, C wide), zero content, and
    one 2-D reference point per query predicted from its positional query (``ref_point_head``),
    fixed for all decoder layers."""

    def __init__(self, num_queries: int, dim: int):
        super().__init__()
        self.query_embed = nn.Embedding(num_queries, dim)
        self.ref_point_head = MLP(dim, dim, 2, 2)
        keep_own_init(self.query_embed)

    def forward(self, memory: Tensor, levels: MultiLevel) -> QueryInit:
        pos = self.query_embed.weight[None].expand(memory.shape[0], -1, -1)
        return QueryInit(torch.zeros_like(pos), self.ref_point_head(pos).sigmoid(), pos)


class BoxQueries(nn.Module):
    """SAM-DETR: learned reference boxes (``query_embed``, 4 logits per query, N(0, 1) init) and
    zero content; the decoder derives positions from the boxes."""

    def __init__(self, num_queries: int, dim: int):
        super().__init__()
        self.dim = dim
        self.query_embed = nn.Embedding(num_queries, 4)
        keep_own_init(self.query_embed)

    def forward(self, memory: Tensor, levels: MultiLevel) -> QueryInit:
        B, Q = memory.shape[0], self.query_embed.num_embeddings
        boxes = self.query_embed.weight.sigmoid()[None].expand(B, -1, -1)
        return QueryInit(memory.new_zeros(B, Q, self.dim), boxes)


class ProposalQueries(nn.Module):
    """Two-stage query selection on the encoder memory.

    ``mode='two_stage'`` (Deformable DETR): rank by the first class channel, build query_pos and
    tgt from the sine embedding of the selected boxes; encoder loss is class-agnostic over all tokens.
    ``mode='efficient'`` (Sparse DETR, after Efficient DETR): rank by the best class; content queries
    are the selected memory tokens themselves, query_pos comes from their boxes; encoder loss is
    multi-class over all tokens.
    ``mode='mixed'`` (DINO): rank by the best class, content queries are a learned ``tgt_embed``;
    encoder loss is multi-class on the selected tokens. ``nms_iou > 0`` (Salience DETR) first drops
    candidates next to a better one on the same level (cell-grid NMS).

    ``projection``: the model's ``TokenProjection``, whose layers it holds (``enc_output``,
    ``enc_output_norm``, ``class_head``); the token-sparse encoders score tokens with the same
    projection and class head (weights shared as in the official models).
    """

    def __init__(self, mode: str, num_queries: int, dim: int, projection: TokenProjection, nms_iou: float = 0.0):
        super().__init__()
        if mode not in ("two_stage", "efficient", "mixed"):
            raise ValueError(f"unknown query selection mode {mode!r}")
        self.mode, self.num_queries, self.dim, self.nms_iou = mode, num_queries, dim, nms_iou
        self.projection = projection  # a plain attribute: its layers are registered here, by their own names
        for name, layer in projection.layers().items():
            self.add_module(name, layer)
        self.box_head = MLP(dim, dim, 4, 3, fp32=True)
        if mode == "two_stage":
            self.pos_trans = nn.Linear(2 * dim, 2 * dim)
            self.pos_trans_norm = nn.LayerNorm(2 * dim)
        elif mode == "efficient":
            self.pos_trans = nn.Linear(2 * dim, dim)
            self.pos_trans_norm = nn.LayerNorm(dim)
        else:
            self.tgt_embed = nn.Embedding(num_queries, dim)
        nn.init.zeros_(self.box_head.layers[-1].weight)
        nn.init.zeros_(self.box_head.layers[-1].bias)
        keep_own_init(self.box_head)

    def select(self, logits: Tensor, k: int, padding: Tensor | None = None) -> Tensor:
        """Indices [B, k] of the tokens that become queries, ranked by raw logits: the first
        class channel (two-stage) or the best class; ``padding`` [B, S], where given, ranks last
        (the official code ranks it by its logits, which depend on the batch)."""
        scores = logits[..., 0] if self.mode == "two_stage" else logits.max(-1).values
        return top_k(scores if padding is None else rank_padding_last(scores, padding), k)[1]

    def forward(self, memory: Tensor, levels: MultiLevel) -> QueryInit:
        B = memory.shape[0]
        feats, proposals = self.projection.project(memory, levels.padding, levels.shapes)
        logits = self.class_head(feats)
        boxes_unact = self.box_head(feats) + proposals
        padding = levels.padding if levels.per_image else None
        if self.nms_iou > 0:
            top = self.select_distinct(logits, levels.shapes, padding)
        else:
            top = self.select(logits, min(self.num_queries, logits.shape[1]), padding)
        if self.mode != "mixed":
            ref_unact = gather_rows(boxes_unact, top).detach()
            pos = self.pos_trans_norm(self.pos_trans(
                sine_embed_coords(ref_unact.sigmoid(), self.dim // 2, 10000.0, order="xywh")))
            if self.mode == "two_stage":
                query_pos, tgt = pos.split(self.dim, dim=-1)
            else:
                query_pos, tgt = pos, gather_rows(memory, top)
            enc = ProposalPredictions(logits, boxes_unact.sigmoid(), class_agnostic=self.mode == "two_stage")
            return QueryInit(tgt, ref_unact.sigmoid(), query_pos, enc)
        ref_unact = gather_rows(boxes_unact, top)
        enc = ProposalPredictions(self.class_head(gather_rows(feats, top)), ref_unact.sigmoid())
        tgt = self.tgt_embed.weight[None, :top.shape[1]].expand(B, -1, -1)
        return QueryInit(tgt, ref_unact.detach().sigmoid(), None, enc)

    @torch.no_grad()
    def select_distinct(self, logits: Tensor, shapes: list[tuple[int, int]], padding: Tensor | None = None
                        ) -> Tensor:
        """Salience DETR's redundancy removal: of the best 4 x num_queries tokens, suppress those
        whose 3x3-cell box on their own level overlaps a better one by IoU > ``nms_iou`` (direct
        neighbours at 0.3; diagonal ones survive). Returns [B, num_queries]: survivors by score,
        then, where an image has too few, its best suppressed tokens (the official code instead
        truncates every image to the smallest survivor count). ``padding`` as in ``select``."""
        S = logits.shape[1]
        scores = logits.max(-1).values
        cand = top_k(scores if padding is None else rank_padding_last(scores, padding),
                     min(4 * self.num_queries, S))[1]  # best first
        starts = host_tensor([0] + [h * w for h, w in shapes], logits.device).cumsum(0)
        widths = host_tensor([w for _, w in shapes], logits.device)
        level = token_levels(cand, shapes)
        local = cand - starts[level]
        kept = cell_nms_batch(level, local % widths[level], local // widths[level], self.nms_iou)
        # Survivors in candidate order, then the suppressed ones: the largest of these distinct keys.
        n = cand.shape[1]
        key = kept.long() * n + torch.arange(n - 1, -1, -1, device=cand.device)
        return cand.gather(1, top_k(key, min(self.num_queries, S))[1])
