"""Conditional DETR's decoder: content and spatial parts of the cross-attention are separate,
concatenated per head, and the spatial query is the sine embedding of each query's reference
point, scaled by a function of the query's content (Meng et al., ICCV 2021; code:
github.com/Atten4Vis/ConditionalDETR)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ...nn.attention import ProjectedAttention
from ...nn.mlp import FeedForward, MLP
from ...nn.neck import MultiLevel
from ...nn.position import sine_embed_coords
from ...config import ModelConfig
from ...stage_kinds import register_decoder
from .base import Decoder, DecoderOutput


def heads_concat(a: Tensor, b: Tensor, num_heads: int) -> Tensor:
    """[B, N, C] and [B, N, C] -> [B, N, 2C] with each head's slices of a and b side by side."""
    B, N, C = a.shape
    return torch.cat([a.view(B, N, num_heads, -1), b.view(B, N, num_heads, -1)], -1).view(B, N, 2 * C)


class QueryPositionSelfAttention(nn.Module):
    """The self-attention of Conditional DETR, SAM-DETR and SD-DETR: separate content and
    position projections for q and k (``sa_*_proj``), no in-projection inside the attention,
    residual and ``norm1``."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.sa_qcontent_proj = nn.Linear(dim, dim)
        self.sa_qpos_proj = nn.Linear(dim, dim)
        self.sa_kcontent_proj = nn.Linear(dim, dim)
        self.sa_kpos_proj = nn.Linear(dim, dim)
        self.sa_v_proj = nn.Linear(dim, dim)
        self.self_attn = ProjectedAttention(dim, num_heads, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def self_attend(self, tgt: Tensor, pos: Tensor) -> Tensor:
        q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(pos)
        k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(pos)
        return self.norm1(tgt + self.dropout(self.self_attn(q, k, self.sa_v_proj(tgt))))


class ConditionalCrossAttention(FeedForward, nn.Module):
    """Conditional cross-attention -> norm2 -> FFN -> norm3. Per head, the content parts
    (32 wide at C=256) and the spatial parts of q and k are concatenated, so each logit is
    content.content + spatial.spatial. ``first``: the layer also adds the learned positional
    query to the content query (``ca_qpos_proj``; the official model has it in layer 0 only)."""

    def __init__(self, dim: int, ffn_dim: int, dropout: float, num_heads: int, first: bool):
        super().__init__()
        self.num_heads = num_heads
        self.ca_qcontent_proj = nn.Linear(dim, dim)
        self.ca_qpos_proj = nn.Linear(dim, dim) if first else None
        self.ca_kcontent_proj = nn.Linear(dim, dim)
        self.ca_kpos_proj = nn.Linear(dim, dim)
        self.ca_v_proj = nn.Linear(dim, dim)
        self.ca_qpos_sine_proj = nn.Linear(dim, dim)
        self.cross_attn = ProjectedAttention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.add_feed_forward(dim, ffn_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, query_sine: Tensor, memory: Tensor, pos: Tensor, padding: Tensor,
                query_pos: Tensor | None = None) -> Tensor:
        """tgt: [B, Q, C]; query_sine: [B, Q, C] (scaled sine of the reference point);
        memory/pos: [B, S, C]; padding: [B, S]; query_pos: the learned positional query (first layer)."""
        q, k, k_pos = self.ca_qcontent_proj(tgt), self.ca_kcontent_proj(memory), self.ca_kpos_proj(pos)
        if self.ca_qpos_proj is not None:
            q, k = q + self.ca_qpos_proj(query_pos), k + k_pos
        q = heads_concat(q, self.ca_qpos_sine_proj(query_sine), self.num_heads)
        k = heads_concat(k, k_pos, self.num_heads)
        tgt = self.norm2(tgt + self.dropout(self.cross_attn(q, k, self.ca_v_proj(memory), padding)))
        ffn = self.feed_forward(tgt)
        return self.norm3(tgt + self.dropout(ffn))


class ConditionalDecoderLayer(QueryPositionSelfAttention):
    """Self-attention (position = the learned positional query) -> norm1 -> ``cross``."""

    def __init__(self, dim: int, ffn_dim: int, dropout: float, num_heads: int, first: bool):
        super().__init__(dim, num_heads, dropout)
        self.cross = ConditionalCrossAttention(dim, ffn_dim, dropout, num_heads, first)

    def forward(self, tgt: Tensor, query_pos: Tensor, query_sine: Tensor, memory: Tensor, pos: Tensor,
                padding: Tensor) -> Tensor:
        return self.cross(self.self_attend(tgt, query_pos), query_sine, memory, pos, padding, query_pos)


@register_decoder("conditional")
class ConditionalDecoder(Decoder):
    """Reference points stay fixed across layers; every layer's output goes through the shared
    final LayerNorm (``norm``) before the heads."""

    single_level = True

    @classmethod
    def from_config(cls, c: ModelConfig) -> "ConditionalDecoder":
        return cls(c.num_decoder_layers, c.hidden_dim, c.ffn_dim, c.dropout, c.num_heads)

    def __init__(self, num_layers: int, dim: int, ffn_dim: int, dropout: float, num_heads: int):
        super().__init__()
        self.layers = nn.ModuleList(
            ConditionalDecoderLayer(dim, ffn_dim, dropout, num_heads, i == 0) for i in range(num_layers))
        self.query_scale = MLP(dim, dim, dim, 2)
        self.norm = nn.LayerNorm(dim)
        self.dim = dim

    def forward(self, tgt: Tensor, reference: Tensor, memory: Tensor, levels: MultiLevel,
                query_pos: Tensor | None = None, attn_mask: Tensor | None = None, box_heads=None,
                record_sampling: bool = False) -> DecoderOutput:
        """tgt: [B, Q, C] (zeros); reference: [B, Q, 2] points in [0, 1]; query_pos: [B, Q, C].
        Every layer's boxes refine the same reference points."""
        sine = sine_embed_coords(reference, self.dim // 2, 10000.0, "yxwh")
        outputs = []
        for i, layer in enumerate(self.layers):
            scaled = sine if i == 0 else sine * self.query_scale(tgt)
            tgt = layer(tgt, query_pos, scaled, memory, levels.pos, levels.padding)
            outputs.append(self.norm(tgt))
        return DecoderOutput(outputs, [reference] * len(outputs))
