"""Input projections to the transformer width, the extra coarse level, and level bookkeeping."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .position import SineMapEmbedding


@dataclass
class MultiLevel:
    """Flattened multi-level features (levels fine to coarse).

    tokens: [B, S, C]; padding: [B, S] True on padding; pos: [B, S, C] (sine + level embedding);
    shapes: per level (H, W) as Python ints; valid_ratios: [B, L, 2] as (w, h) fraction of the
    padded map covered by the image; image_sizes: [B, 2] each image's unpadded (height, width)
    and padded_size the batch's (height, width), in input pixels.
    """

    tokens: Tensor
    padding: Tensor
    pos: Tensor
    shapes: list[tuple[int, int]]
    valid_ratios: Tensor
    image_sizes: Tensor | None = None
    padded_size: tuple[int, int] | None = None

    @property
    def level_starts(self) -> list[int]:
        starts = [0]
        for h, w in self.shapes[:-1]:
            starts.append(starts[-1] + h * w)
        return starts


class Neck(nn.Module):
    """Projects backbone maps to ``dim`` channels (1x1 conv + GroupNorm) and adds extra levels
    (3x3 stride-2 conv + GroupNorm, the first applied to the raw last backbone map).

    norm: GroupNorm after the 1x1 projections (Conditional DETR has none; SAM-DETR's 12-epoch
    checkpoints have it). level_embed: a learned vector per level added to the position
    (multi-level models); single-level DETRs have none.
    """

    def __init__(self, in_channels: list[int], dim: int, num_levels: int,
                 pos_temperature: float = 10000.0, pos_offset: float = -0.5, norm: bool = True,
                 level_embed: bool = True):
        super().__init__()
        projs = [nn.Sequential(nn.Conv2d(c, dim, 1), *([nn.GroupNorm(32, dim)] if norm else []))
                 for c in in_channels[:num_levels]]
        cin = in_channels[-1]
        for _ in range(num_levels - len(in_channels)):
            projs.append(nn.Sequential(nn.Conv2d(cin, dim, 3, stride=2, padding=1), nn.GroupNorm(32, dim)))
            cin = dim
        self.input_proj = nn.ModuleList(projs)
        self.level_embed = nn.Parameter(torch.empty(num_levels, dim)) if level_embed else None
        self.position = SineMapEmbedding(dim // 2, pos_temperature, pos_offset)
        self.num_backbone_levels = min(len(in_channels), num_levels)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        if self.level_embed is not None:
            nn.init.normal_(self.level_embed)

    def forward(self, features: list[Tensor], mask: Tensor) -> MultiLevel:
        """features: backbone maps fine to coarse; mask: [B, H, W] image padding (True = pad)."""
        maps = [self.input_proj[i](f) for i, f in enumerate(features[:self.num_backbone_levels])]
        last = features[-1]
        for proj in self.input_proj[self.num_backbone_levels:]:
            last = proj(last)
            maps.append(last)
        tokens, pads, poss, shapes, ratios = [], [], [], [], []
        for lvl, m in enumerate(maps):
            h, w = m.shape[-2:]
            pad = F.interpolate(mask[None].float(), size=(h, w)).to(torch.bool)[0]
            pos = self.position(pad).to(m.dtype)
            tokens.append(m.flatten(2).transpose(1, 2))
            pads.append(pad.flatten(1))
            pos = pos.flatten(2).transpose(1, 2)
            poss.append(pos + self.level_embed[lvl] if self.level_embed is not None else pos)
            shapes.append((h, w))  # SymInts while exporting with a dynamic size
            valid_h = (~pad[:, :, 0]).sum(1).float() / h
            valid_w = (~pad[:, 0, :]).sum(1).float() / w
            ratios.append(torch.stack([valid_w, valid_h], -1))
        image_sizes = torch.stack([(~mask[:, :, 0]).sum(1), (~mask[:, 0, :]).sum(1)], -1)
        return MultiLevel(torch.cat(tokens, 1), torch.cat(pads, 1), torch.cat(poss, 1), shapes,
                          torch.stack(ratios, 1), image_sizes, tuple(mask.shape[-2:]))
