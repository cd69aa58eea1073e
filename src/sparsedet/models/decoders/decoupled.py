"""SD-DETR ("Decoupled DETR", ICCV 2023) as we rebuild it: no official code exists, so every
choice below that the paper's public descriptions leave open is ours (docs/methods.md, "SD-DETR:
what follows the paper and what is ours").

Paper: anchors from a mini-detector on the encoder output (``ProposalQueries``, top-N by best
class); task-aware queries: per task (classification, localisation) salient points inside each
anchor whose bilinearly read features are averaged into that task's content query; one
self-attention over both query sets; cross-attention split per task; class head on the
classification stream, box head on the localisation stream.
Ours: the point predictor is SAM-DETR's (RoIAlign 7x7 -> conv -> MLP -> tanh offsets); each
task's reference point is its mean salient point (box-relative, so it follows the refined box);
positions are the sine embedding of that point through one shared MLP; the cross-attention is
Conditional DETR's; FFNs and norms after the split are per task; boxes are refined layer by layer
from the localisation stream (heads per layer, look forward once).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ...nn.mlp import MLP
from ...nn.neck import MultiLevel
from ...nn.position import sine_embed_coords
from ...ops.functional import apply_box_delta
from ...config import ModelConfig
from ...stage_kinds import register_decoder
from .base import Decoder, DecoderOutput
from .conditional import ConditionalCrossAttention, QueryPositionSelfAttention
from .sam import box_features, point_predictor, point_positions, salient_points

TASKS = ("cls", "loc")


class TaskPoints(nn.Module):
    """One task's salient points in each anchor box and the mean of their features."""

    def __init__(self, dim: int, num_points: int):
        super().__init__()
        self.num_points = num_points
        self.point1, self.point2 = point_predictor(dim, 2 * num_points)
        nn.init.zeros_(self.point2[-1].bias)

    def forward(self, rois: Tensor) -> tuple[Tensor, Tensor]:
        """rois: [B, Q, C, 7, 7] (``box_features``). Returns (content [B, Q, C], offsets
        [B, Q, M, 2] in half box sizes)."""
        offsets, feats, _ = salient_points(rois, self.point1, self.point2, self.num_points)
        return feats.mean(2), offsets


class DecoupledDecoderLayer(QueryPositionSelfAttention):
    """Self-attention over both tasks' queries together, then one conditional cross-attention
    (+ FFN) per task (``split=False``: one query set and one cross-attention, the ablation)."""

    def __init__(self, dim: int, ffn_dim: int, dropout: float, num_heads: int, split: bool):
        super().__init__(dim, num_heads, dropout)
        self.cross = nn.ModuleDict({t: ConditionalCrossAttention(dim, ffn_dim, dropout, num_heads, False)
                                    for t in (TASKS if split else TASKS[:1])})

    def forward(self, streams: list[Tensor], positions: list[Tensor], sines: list[Tensor], memory: Tensor,
                levels: MultiLevel) -> list[Tensor]:
        x = self.self_attend(torch.cat(streams, 1), torch.cat(positions, 1)).split(streams[0].shape[1], 1)
        return [cross(h, sine, memory, levels.pos, levels.padding)
                for cross, h, sine in zip(self.cross.values(), x, sines)]


@register_decoder("decoupled")
class DecoupledDecoder(Decoder):
    single_level = True
    config_fields = ("task_queries", "split_cross_attention", "task_points")

    @classmethod
    def from_config(cls, c: ModelConfig) -> "DecoupledDecoder":
        d = c.decoder
        return cls(c.num_decoder_layers, c.hidden_dim, c.ffn_dim, c.dropout, c.num_heads, d.task_queries,
                   d.split_cross_attention, d.task_points, c.sigmoid_eps)

    def __init__(self, num_layers: int, dim: int, ffn_dim: int, dropout: float, num_heads: int,
                 task_queries: bool, split: bool, num_points: int, eps: float = 1e-5):
        super().__init__()
        tasks = TASKS if split else TASKS[:1]
        self.layers = nn.ModuleList(
            DecoupledDecoderLayer(dim, ffn_dim, dropout, num_heads, split) for _ in range(num_layers))
        self.points = nn.ModuleDict({t: TaskPoints(dim, num_points) for t in tasks}) if task_queries else None
        self.query_scale = nn.ModuleDict({t: MLP(dim, dim, dim, 2) for t in tasks})
        self.pos_head = MLP(dim, dim, dim, 2)
        self.norm = nn.LayerNorm(dim)
        self.dim, self.eps = dim, eps

    def forward(self, tgt: Tensor, reference: Tensor, memory: Tensor, levels: MultiLevel,
                query_pos: Tensor | None = None, attn_mask: Tensor | None = None, box_heads=None,
                record_sampling: bool = False) -> DecoderOutput:
        """tgt: [B, Q, C] learned content (used where task-aware queries are off); reference:
        [B, Q, 4] anchor boxes. Hidden per layer: (classification stream, localisation stream);
        references: each layer's input boxes."""
        tasks = list(self.query_scale)
        if self.points is not None:
            rois = box_features(memory, levels, reference)
            made = [self.points[t](rois) for t in tasks]
            streams, offsets = [m[0] for m in made], [m[1].mean(2, keepdim=True) for m in made]
        else:
            streams, offsets = [tgt] * len(tasks), [tgt.new_zeros(*tgt.shape[:2], 1, 2)] * len(tasks)
        outputs, refs = [], []
        for lid, layer in enumerate(self.layers):
            refs.append(reference)
            sines = [sine_embed_coords(point_positions(reference, o)[:, :, 0], self.dim // 2, 10000.0, "yxwh")
                     for o in offsets]
            positions = [self.pos_head(s) for s in sines]
            if lid > 0:
                sines = [s * self.query_scale[t](h) for s, t, h in zip(sines, tasks, streams)]
            streams = layer(streams, positions, sines, memory, levels)
            normed = [self.norm(h) for h in streams]
            outputs.append((normed[0], normed[-1]))
            if lid + 1 < len(self.layers):
                reference = apply_box_delta(box_heads[lid](normed[-1]), reference, self.eps).detach()
        return DecoderOutput(outputs, refs)
