"""Decoders by ``model.kind``: the one table from base detector to decoder."""
from __future__ import annotations

from torch import nn

from ...config import ModelConfig
from .conditional import ConditionalDecoder
from .decoupled import DecoupledDecoder
from .deformable import DeformableDecoder
from .sam import SamDecoder

SINGLE_LEVEL = ("conditional", "sam", "decoupled")


def build_decoder(c: ModelConfig) -> nn.Module:
    d = c.decoder
    if c.kind == "conditional":
        return ConditionalDecoder(c.num_decoder_layers, c.hidden_dim, c.ffn_dim, c.dropout, c.num_heads)
    if c.kind == "sam":
        return SamDecoder(c.num_decoder_layers, c.hidden_dim, c.ffn_dim, c.dropout, c.num_heads, d.smca, c.sigmoid_eps)
    if c.kind == "decoupled":
        return DecoupledDecoder(c.num_decoder_layers, c.hidden_dim, c.ffn_dim, c.dropout, c.num_heads,
                                d.task_queries, d.split_cross_attention, d.task_points, c.sigmoid_eps)
    dino = c.kind == "dino"
    return DeformableDecoder(
        c.num_decoder_layers, c.hidden_dim, c.ffn_dim, c.dropout, c.num_levels, c.num_heads, c.dec_points,
        query_pos_from_reference=dino, final_norm=dino, look_forward_twice=dino, eps=c.sigmoid_eps)
