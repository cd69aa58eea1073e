"""Sparse DETR encoder (Roh et al., ICLR 2022; code: github.com/kakaobrain/sparse-detr): one scorer over all
levels picks the top rho of each image's valid tokens; every layer updates only those, reading the
progressively updated memory as deformable-attention values. Optional detection heads on the sparse tokens
of every layer but the last (encoder auxiliary loss)."""
from __future__ import annotations

from torch import Tensor, nn

from ...config import ModelConfig
from ...losses.selection import AttentionMapSupervision
from ...nn.neck import MultiLevel
from ...ops.functional import gather_rows
from ...stage_kinds import DECODER_SAMPLING, TOKEN_PROJECTION
from ..heads import PredictionHeads, Predictions
from ..projection import TokenProjection
from .dense import DeformableEncoderLayer, EncoderOutput
from .scoring import (LayerSelection, TokenScorer, TokenSelection, TokenSparseEncoder, check_ratios, encoder_points,
                      gather_points, scatter_tokens, top_share)


class SparseEncoder(TokenSparseEncoder):
    supervision = AttentionMapSupervision
    # It scores tokens with the two-stage projection; its scorer's target is the decoder's attention map (DAM).
    needs = frozenset({TOKEN_PROJECTION, DECODER_SAMPLING})
    config_fields = ("keep_ratio", "aux_heads")

    def __init__(self, c: ModelConfig):
        super().__init__()
        check_ratios([c.encoder.keep_ratio], "encoder.keep_ratio")
        self.keep_ratio = c.encoder.keep_ratio
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(c.hidden_dim, c.ffn_dim, c.dropout, c.num_levels, c.num_heads, c.enc_points)
            for _ in range(c.num_encoder_layers))
        self.scorer = TokenScorer(c.hidden_dim)
        n_aux = c.num_encoder_layers - 1
        self.aux_heads = (PredictionHeads(c.hidden_dim, c.num_classes, n_aux, shared=False, initial_size_bias=0.0)
                          if c.encoder.aux_heads and n_aux > 0 else None)

    def select(self, logits: Tensor, levels: MultiLevel) -> LayerSelection:
        """Top floor(rho * valid) + 1 tokens of each image over all levels (one set for all layers)."""
        return top_share(logits, levels.padding, self.keep_ratio, plus_one=True)

    def forward(self, levels: MultiLevel, projection: TokenProjection) -> EncoderOutput:
        """``projection``: the token projection shared with the two-stage head."""
        tokens, padding, shapes = levels.tokens, levels.padding, levels.shapes
        feats, proposals = projection.project(tokens + levels.pos, padding, shapes)
        logits = self.scorer(feats, padding if levels.per_image else None)
        selected = self.select(logits, levels)
        indices, counts = selected.indices, selected.counts

        reference = gather_points(encoder_points(shapes, levels.valid_ratios), indices, len(shapes))
        pos = gather_rows(levels.pos, indices)
        query = gather_rows(tokens, indices)
        memory, aux = tokens, []
        for t, layer in enumerate(self.layers):
            query = layer(query, pos, reference, memory, shapes, padding)
            memory = scatter_tokens(memory, indices, query, counts)
            # The auxiliary heads only feed losses: inference neither runs nor pays for them.
            if self.training and self.aux_heads is not None and t < len(self.aux_heads.box_embed):
                box = self.aux_heads.box_head(t)(query) + gather_rows(proposals, indices)
                aux.append(Predictions(self.aux_heads.class_head(t)(query), box.sigmoid()))
        selection = TokenSelection.of(logits, [selected] * len(self.layers), levels)
        return EncoderOutput(memory, selection, aux)

