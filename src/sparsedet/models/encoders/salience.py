"""Salience DETR encoder (Hou et al., CVPR 2024; code: github.com/xiuqhou/Salience-DETR): Focus-DETR's
dual-attention cascade with hierarchical filtering (a quota of each level's valid tokens, then nested
prefixes per layer of the score-sorted union), a learned background embedding on the tokens the last layer
did not update, and cross-level fusion of the memory."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ...config import ModelConfig
from ...errors import SparsedetError
from ...losses.selection import SalienceSupervision
from ...nn.fusion import CrossLevelFusion
from ...nn.init import keep_own_init
from ...nn.neck import MultiLevel
from ...ops.padding import has_padding
from .focus import FocusEncoder
from .scoring import LayerSelection, TokenSelection, cascade, check_ratios, top_share, written


class SalienceEncoder(FocusEncoder):
    supervision = SalienceSupervision
    config_fields = ("layer_ratios", "object_tokens", "label_ranges", "level_ratios", "background_size", "fusion")

    def alpha_index(self, num_levels: int) -> list[int]:
        """Salience indexes the modulation weights by level (alpha[l] for level l)."""
        return list(range(num_levels - 1))

    def __init__(self, c: ModelConfig):
        super().__init__(c)
        e = c.encoder
        if len(e.level_ratios) != c.num_levels:
            raise SparsedetError(f"encoder.level_ratios has {len(e.level_ratios)} entries for {c.num_levels} levels")
        check_ratios(e.level_ratios, "encoder.level_ratios")
        self.level_ratios = list(e.level_ratios)
        self.background_rows = nn.Embedding(e.background_size, c.hidden_dim // 2)
        self.background_cols = nn.Embedding(e.background_size, c.hidden_dim // 2)
        nn.init.uniform_(self.background_rows.weight)
        nn.init.uniform_(self.background_cols.weight)
        self.fusion = CrossLevelFusion(c.hidden_dim, c.num_levels) if e.fusion else None
        keep_own_init(self.background_rows, self.background_cols, self.fusion)

    def select(self, level_logits: list[Tensor], ranking: Tensor, levels: MultiLevel) -> list[LayerSelection]:
        """Per level, the top floor(ratio_l * valid) tokens (batch-wide quota = the largest; padding
        masked per level), merged and re-sorted by score; then nested prefixes per layer."""
        scores, indices, counts = [], [], 0
        for lvl, (start, logits) in enumerate(zip(levels.level_starts, level_logits)):
            top = top_share(logits, levels.padding[:, start:start + logits.shape[1]], self.level_ratios[lvl],
                            plus_one=False)
            if levels.per_image:  # entries past an image's quota (the batch's width) sort last
                top.scores = top.scores.masked_fill(~written(top.indices, top.counts), float("-inf"))
            scores.append(top.scores)
            indices.append(top.indices + start)
            counts = counts + top.counts
        scores, order = torch.cat(scores, 1).sort(dim=1, descending=True, stable=True)
        indices = torch.cat(indices, 1).gather(1, order)
        return cascade(indices, scores, counts, self.layer_ratios, per_image=levels.per_image)

    def finish(self, memory: Tensor, selection: TokenSelection, levels: MultiLevel) -> Tensor:
        """Background embedding on every valid token the last layer did not select; then fusion."""
        B, _, C = memory.shape
        if max(max(s) for s in levels.shapes) > self.background_rows.num_embeddings:
            raise SparsedetError(
                f"feature map {max(levels.shapes)} is larger than the background embedding table "
                f"({self.background_rows.num_embeddings} cells per side); lower the input size or raise "
                "model.encoder.background_size")
        background = torch.cat([torch.cat([self.background_cols.weight[:w][None].expand(h, -1, -1),
                                           self.background_rows.weight[:h][:, None].expand(-1, w, -1)], -1).view(h * w, C)
                                for h, w in levels.shapes])
        last = selection.layers[-1]
        # Only the tokens the last layer wrote (the official code: its whole batch-wide width).
        updated = written(last.indices, last.counts).to(memory.dtype) if levels.per_image else 1.0
        keep = (~levels.padding).to(memory.dtype).scatter(1, last.indices, 1.0 - updated)
        memory = memory + background[None].to(memory.dtype) * keep[..., None]
        if self.fusion is None:
            return memory
        sizes = [h * w for h, w in levels.shapes]
        maps = [m.transpose(1, 2).reshape(B, C, h, w) for m, (h, w) in zip(memory.split(sizes, 1), levels.shapes)]
        keeps = None
        if levels.per_image and has_padding(levels.padding):
            keeps = [(~p).view(B, 1, h, w) for p, (h, w) in zip(levels.padding.split(sizes, 1), levels.shapes)]
        return torch.cat([m.flatten(2).transpose(1, 2) for m in self.fusion(maps, keeps)], 1)
