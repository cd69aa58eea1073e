"""DETR's encoder (Conditional DETR, SAM-DETR, SD-DETR): post-norm layers of global multi-head
self-attention over one feature level, q = k = tokens + position, v = tokens."""
from __future__ import annotations

from torch import Tensor, nn

from ...config import ModelConfig
from ...nn.attention import SelfAttention
from ...nn.neck import MultiLevel
from ...nn.mlp import FeedForward
from ..projection import TokenProjection
from .base import Encoder, EncoderOutput


class GlobalEncoderLayer(FeedForward, nn.Module):
    def __init__(self, dim: int, ffn_dim: int, dropout: float, num_heads: int):
        super().__init__()
        self.self_attn = SelfAttention(dim, num_heads, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.add_feed_forward(dim, ffn_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, pos: Tensor, padding: Tensor) -> Tensor:
        q = x + pos
        attn = self.self_attn(q, q, x, key_padding_mask=padding, need_weights=False)[0]
        x = self.norm1(x + self.dropout(attn))
        ffn = self.feed_forward(x)
        return self.norm2(x + self.dropout(ffn))


class GlobalEncoder(Encoder):
    """Every token attends to every token: cost grows with the square of the token count, so
    the methods built on it use the stride-32 map only."""

    single_level = True

    @classmethod
    def from_config(cls, c: ModelConfig) -> "GlobalEncoder":
        return cls(c.num_encoder_layers, c.hidden_dim, c.ffn_dim, c.dropout, c.num_heads)

    def __init__(self, num_layers: int, dim: int, ffn_dim: int, dropout: float, num_heads: int):
        super().__init__()
        self.layers = nn.ModuleList(GlobalEncoderLayer(dim, ffn_dim, dropout, num_heads) for _ in range(num_layers))

    def forward(self, levels: MultiLevel, projection: TokenProjection | None = None) -> EncoderOutput:
        x = levels.tokens
        for layer in self.layers:
            x = layer(x, levels.pos, levels.padding)
        return EncoderOutput(x)
