"""Dense deformable encoder (Deformable DETR / DINO): every token is updated by every layer."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ...config import ModelConfig
from ...nn.attention import MSDeformAttn
from ...nn.neck import MultiLevel
from ...nn.mlp import FeedForward
from ..projection import TokenProjection
from .base import Encoder, EncoderOutput  # noqa: F401 (EncoderOutput re-exported)


def encoder_reference_points(shapes: list[tuple[int, int]], valid_ratios: Tensor) -> Tensor:
    """Each token's own pixel centre, normalised by the valid extent of its level, then
    scaled to every level: [B, S, L, 2] as (x, y)."""
    refs = []
    for lvl, (h, w) in enumerate(shapes):
        # arange + 0.5 equals linspace(0.5, h - 0.5, h) exactly and keeps a symbolic h symbolic.
        ys, xs = torch.meshgrid(torch.arange(h, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5,
                                torch.arange(w, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5,
                                indexing="ij")
        y = ys.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
        x = xs.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
        refs.append(torch.stack([x, y], -1))
    return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]


class DeformableEncoderLayer(FeedForward, nn.Module):
    """Post-norm layer: deformable self-attention (query = token + pos, value = tokens) then FFN."""

    def __init__(self, dim: int, ffn_dim: int, dropout: float, num_levels: int, num_heads: int, num_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(dim, num_levels, num_heads, num_points)
        self.norm1 = nn.LayerNorm(dim)
        self.add_feed_forward(dim, ffn_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, query: Tensor, pos: Tensor, reference: Tensor, value: Tensor,
                shapes: list[tuple[int, int]], value_padding: Tensor) -> Tensor:
        """query: [B, Q, C] tokens to update; value: [B, S, C] tokens attended to."""
        x = query + self.dropout(self.self_attn(query + pos, reference, value, shapes, value_padding))
        x = self.norm1(x)
        x = x + self.dropout(self.feed_forward(x))
        return self.norm2(x)


class DenseEncoder(Encoder):
    @classmethod
    def from_config(cls, c: ModelConfig) -> "DenseEncoder":
        return cls(c.num_encoder_layers, c.hidden_dim, c.ffn_dim, c.dropout, c.num_levels, c.num_heads, c.enc_points)

    def __init__(self, num_layers: int, dim: int, ffn_dim: int, dropout: float,
                 num_levels: int, num_heads: int, num_points: int):
        super().__init__()
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(dim, ffn_dim, dropout, num_levels, num_heads, num_points) for _ in range(num_layers))

    def forward(self, levels: MultiLevel, projection: TokenProjection | None = None) -> EncoderOutput:
        """Every token attends, every layer (``projection`` is unused: sparse encoders score with it)."""
        reference = encoder_reference_points(levels.shapes, levels.valid_ratios)
        x = levels.tokens
        for layer in self.layers:
            x = layer(x, levels.pos, reference, x, levels.shapes, levels.padding)
        return EncoderOutput(x)
