"""Deformable decoder with iterative box refinement (Deformable DETR and DINO conventions)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ...nn.attention import MSDeformAttn, SelfAttention
from ...nn.mlp import FeedForward, MLP
from ...nn.neck import MultiLevel
from ...nn.position import sine_embed_coords
from ...ops.functional import apply_box_delta
from ...config import ModelConfig
from ...stage_kinds import DECODER_SAMPLING, register_decoder
from .base import Decoder, DecoderOutput


class DeformableDecoderLayer(FeedForward, nn.Module):
    """Self-attention (q = k = tgt + pos) -> norm2 -> deformable cross-attention -> norm1 -> FFN -> norm3."""

    def __init__(self, dim: int, ffn_dim: int, dropout: float, num_levels: int, num_heads: int, num_points: int):
        super().__init__()
        self.self_attn = SelfAttention(dim, num_heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = MSDeformAttn(dim, num_levels, num_heads, num_points)
        self.norm1 = nn.LayerNorm(dim)
        self.add_feed_forward(dim, ffn_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference: Tensor, memory: Tensor,
                shapes: list[tuple[int, int]], memory_padding: Tensor, attn_mask: Tensor | None = None,
                record_sampling: bool = False) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Returns (tgt, (sampling locations, attention weights) of the cross-attention or None)."""
        q = tgt + query_pos
        x = self.self_attn(q, q, tgt, attn_mask=attn_mask, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout(x))
        x = self.cross_attn(tgt + query_pos, reference, memory, shapes, memory_padding, return_sampling=record_sampling)
        sampling = None
        if record_sampling:
            x, sampling = x[0], x[1:]
        tgt = self.norm1(tgt + self.dropout(x))
        x = self.feed_forward(tgt)
        return self.norm3(tgt + self.dropout(x)), sampling


@register_decoder("deformable")
class DeformableDecoder(Decoder):
    """Stack of deformable decoder layers (Deformable DETR's; ``DinoDecoder`` switches DINO's on).

    Args:
        query_pos_from_reference: DINO: query_pos = ref_point_head(sine(reference)) at every layer.
        final_norm: DINO: a shared LayerNorm on every layer's output before the heads.
        look_forward_twice: DINO: layer l predicts from the undetached refined box of layer l-1.
        eps: inverse-sigmoid floor (1e-5 Deformable DETR, 1e-3 DINO).
    """

    provides = frozenset({DECODER_SAMPLING})  # its cross-attention's sampling, where asked

    @classmethod
    def from_config(cls, c: ModelConfig, dino: bool = False) -> "DeformableDecoder":
        return cls(c.num_decoder_layers, c.hidden_dim, c.ffn_dim, c.dropout, c.num_levels, c.num_heads, c.dec_points,
                   query_pos_from_reference=dino, final_norm=dino, look_forward_twice=dino, eps=c.sigmoid_eps)

    def __init__(self, num_layers: int, dim: int, ffn_dim: int, dropout: float, num_levels: int,
                 num_heads: int, num_points: int, query_pos_from_reference: bool = False,
                 final_norm: bool = False, look_forward_twice: bool = False, eps: float = 1e-5):
        super().__init__()
        self.layers = nn.ModuleList(
            DeformableDecoderLayer(dim, ffn_dim, dropout, num_levels, num_heads, num_points) for _ in range(num_layers))
        self.ref_point_head = MLP(2 * dim, dim, dim, 2) if query_pos_from_reference else None
        self.norm = nn.LayerNorm(dim) if final_norm else None
        self.look_forward_twice, self.eps, self.dim = look_forward_twice, eps, dim

    def forward(self, tgt: Tensor, reference: Tensor, memory: Tensor, levels: MultiLevel,
                query_pos: Tensor | None = None, attn_mask: Tensor | None = None,
                box_heads: list[Callable[[Tensor], Tensor]] | None = None,
                record_sampling: bool = False) -> DecoderOutput:
        """
        Args:
            tgt: [B, Q, C]; reference: [B, Q, 2|4] in [0, 1] of the valid image.
            box_heads: per-layer box-delta heads for iterative refinement (None: references stay fixed).
            record_sampling: also return every layer's cross-attention sampling (Sparse DETR's
                attention-map target).
        Returns ``DecoderOutput``; references are what each layer's box delta is added to (DINO
        looks forward twice: the previous layer's undetached boxes).
        """
        ratios = levels.valid_ratios
        outputs, pred_refs, sampling = [], [], []
        prev_undetached = reference
        for lid, layer in enumerate(self.layers):
            scale = torch.cat([ratios, ratios], -1) if reference.shape[-1] == 4 else ratios
            ref_input = reference[:, :, None] * scale[:, None]
            pos = query_pos
            if self.ref_point_head is not None:
                # The official code embeds the reference in the padded map's coordinates, which
                # moves each query's position with its batch-mates' sizes (levels.per_image: not).
                embedded = reference if levels.per_image else ref_input[:, :, 0]
                pos = self.ref_point_head(sine_embed_coords(embedded, self.dim // 2, 10000.0, "yxwh"))
            tgt, sampled = layer(tgt, pos, ref_input, memory, levels.shapes, levels.padding, attn_mask, record_sampling)
            sampling.append(sampled)
            pred_refs.append(prev_undetached if self.look_forward_twice else reference)
            outputs.append(self.norm(tgt) if self.norm is not None else tgt)
            if box_heads is not None:
                new_ref = apply_box_delta(box_heads[lid](tgt), reference, self.eps)
                prev_undetached = new_ref
                reference = new_ref.detach()
        if not record_sampling:
            return DecoderOutput(outputs, pred_refs)
        return DecoderOutput(outputs, pred_refs,
                             (torch.stack([s[0] for s in sampling], 1), torch.stack([s[1] for s in sampling], 1)))


@register_decoder("dino")
class DinoDecoder(DeformableDecoder):
    """DINO's: query positions from the reference at every layer, a final norm, look-forward-twice."""

    @classmethod
    def from_config(cls, c: ModelConfig) -> "DinoDecoder":
        return super().from_config(c, dino=True)
