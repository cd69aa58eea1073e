"""Focus-DETR encoder (Zheng et al., ICCV 2023; code in docs/methods.md): a foreground token selector scored
per level, coarse to fine with top-down modulation, keeps a nested cascade of tokens per layer; each layer
runs dual attention: self-attention among the most object-like tokens (foreground logit x best class logit
of the shared two-stage class head), then deformable attention whose values are the original backbone
tokens."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ...config import ModelConfig
from ...errors import SparsedetError
from ...losses.selection import ForegroundSupervision
from ...nn.attention import SelfAttention
from ...nn.neck import MultiLevel
from ...ops.functional import gather_rows, top_k
from ...ops.padding import rank_padding_last
from ...stage_kinds import MIXED_QUERY_SELECTION, TOKEN_PROJECTION
from ..projection import TokenProjection
from .dense import DeformableEncoderLayer, EncoderOutput
from .scoring import (LayerSelection, TokenScorer, TokenSelection, TokenSparseEncoder, cascade, check_ratios,
                      encoder_points, gather_points, scatter_tokens, top_down_scores, top_share,
                      uniform_alpha, written)


class DualAttentionLayer(DeformableEncoderLayer):
    """Self-attention over the ``num_objects`` best-scored tokens (q = k = token + pos, v = token;
    residual, ``pre_norm``), then the deformable layer on all given tokens."""

    def __init__(self, dim: int, ffn_dim: int, dropout: float, num_levels: int, num_heads: int, num_points: int):
        super().__init__(dim, ffn_dim, dropout, num_levels, num_heads, num_points)
        self.pre_attn = SelfAttention(dim, num_heads, dropout=dropout)
        self.pre_norm = nn.LayerNorm(dim)

    def forward(self, query: Tensor, pos: Tensor, reference: Tensor, value: Tensor, shapes: list[tuple[int, int]],
                value_padding: Tensor, object_scores: Tensor, num_objects: int, unused: Tensor | None = None
                ) -> Tensor:
        """unused: [B, k] True on entries that only fill the batch's width: ranked last among the
        objects and masked as keys (None: every entry takes part, as the official code)."""
        if unused is not None:
            object_scores = object_scores.masked_fill(unused, float("-inf"))
        top = top_k(object_scores, min(num_objects, query.shape[1]))[1]
        objects, objects_pos = gather_rows(query, top), gather_rows(pos, top)
        q = objects + objects_pos
        if unused is None:
            attended = self.pre_attn(q, q, objects, need_weights=False)[0]
        else:  # the best object of each image is one of its own, so every query keeps a key
            attended = self.pre_attn.with_key_padding(q, q, objects, unused.gather(1, top))
        objects = self.pre_norm(objects + self.dropout(attended))
        query = query.scatter(1, top[..., None].expand(-1, -1, query.shape[-1]), objects.to(query.dtype))
        return super().forward(query, pos, reference, value, shapes, value_padding)


class FocusEncoder(TokenSparseEncoder):
    supervision = ForegroundSupervision
    config_fields = ("keep_ratio", "layer_ratios", "object_tokens", "label_ranges")
    # Its object scores come from the class head of the mixed query selection.
    needs = frozenset({TOKEN_PROJECTION, MIXED_QUERY_SELECTION})

    def alpha_index(self, num_levels: int) -> list[int]:
        """Which modulation weight each level below the top uses: Focus counts from the top
        (alpha[0] modulates the second-coarsest level)."""
        return list(range(num_levels - 2, -1, -1))

    def __init__(self, c: ModelConfig):
        super().__init__()
        e = c.encoder
        if len(e.layer_ratios) != c.num_encoder_layers:
            raise SparsedetError(f"encoder.layer_ratios has {len(e.layer_ratios)} entries for "
                                 f"{c.num_encoder_layers} encoder layers; give one ratio per layer")
        check_ratios([e.keep_ratio] + list(e.layer_ratios), "encoder.keep_ratio and encoder.layer_ratios")
        self.keep_ratio, self.layer_ratios, self.object_tokens = e.keep_ratio, list(e.layer_ratios), e.object_tokens
        self.layers = nn.ModuleList(
            DualAttentionLayer(c.hidden_dim, c.ffn_dim, c.dropout, c.num_levels, c.num_heads, c.enc_points)
            for _ in range(c.num_encoder_layers))
        self.scorer = TokenScorer(c.hidden_dim)
        self.alpha = uniform_alpha(c.num_levels - 1)

    def select(self, level_logits: list[Tensor], ranking: Tensor, levels: MultiLevel) -> list[LayerSelection]:
        """Global top-k of floor(rho * valid) + 1 tokens of the padding-masked ``ranking`` [B, S],
        then nested prefixes per layer."""
        top = top_share(ranking, levels.padding, self.keep_ratio, plus_one=True)
        return cascade(top.indices, top.scores, top.counts, self.layer_ratios, per_image=levels.per_image)

    def forward(self, levels: MultiLevel, projection: TokenProjection) -> EncoderOutput:
        """``projection``: the token projection and class head (object scores) shared with the
        mixed query selection."""
        tokens, padding, shapes = levels.tokens, levels.padding, levels.shapes
        feats, _ = projection.project(tokens + levels.pos, padding, shapes)
        level_logits = top_down_scores(self.scorer, feats, shapes, self.alpha, self.alpha_index(len(shapes)),
                                       padding if levels.per_image else None)
        logits = torch.cat(level_logits, 1)
        foreground = rank_padding_last(logits, padding)
        layers = self.select(level_logits, foreground, levels)
        points = encoder_points(shapes, levels.valid_ratios)
        memory = tokens
        for layer, sel in zip(self.layers, layers):
            query = gather_rows(memory, sel.indices)
            objectness = projection.class_head(query).max(-1).values * foreground.gather(1, sel.indices)
            # Entries past an image's count fill the batch's width: never among its objects.
            unused = ~written(sel.indices, sel.counts) if levels.per_image else None
            query = layer(query, gather_rows(levels.pos, sel.indices), gather_points(points, sel.indices, len(shapes)),
                          tokens, shapes, padding, objectness, self.object_tokens, unused)
            memory = scatter_tokens(memory, sel.indices, query, sel.counts)
        selection = TokenSelection.of(logits, layers, levels)
        return EncoderOutput(self.finish(memory, selection, levels), selection)

    def finish(self, memory: Tensor, selection: TokenSelection, levels: MultiLevel) -> Tensor:
        """Hook for what a method does to the memory after the layers (Salience)."""
        return memory
