"""Input projections to the transformer width, the extra coarse level, and level bookkeeping."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.padding import content_cells, has_padding, image_sizes
from .position import SineMapEmbedding


@dataclass
class MultiLevel:
    """Flattened multi-level features (levels fine to coarse).

    tokens: [B, S, C]; padding: [B, S] True on padding; pos: [B, S, C] (sine + level embedding);
    shapes: per level (H, W) as Python ints; valid_ratios: [B, L, 2] as (w, h) fraction of the
    padded map covered by the image; image_sizes: [B, 2] each image's unpadded (height, width)
    and padded_size the batch's (height, width), in input pixels. per_image: the neck kept the
    batch's padding out of each image's levels (``model.mask_padding``), and the stages after it
    do too: every image computes what it computes alone.
    """

    tokens: Tensor
    padding: Tensor
    pos: Tensor
    shapes: list[tuple[int, int]]
    valid_ratios: Tensor
    image_sizes: Tensor | None = None
    padded_size: tuple[int, int] | None = None
    per_image: bool = False

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
    (multi-level models); single-level DETRs have none. in_strides: the backbone maps' strides.
    mask_padding: each level's padding is the cells an image has alone (``ops.padding``), left out
    of the GroupNorm statistics and zeroed before the extra levels' convolutions; False computes
    as the official code (padding resized to each level, GroupNorm over the whole padded map).
    """

    def __init__(self, in_channels: list[int], dim: int, num_levels: int,
                 pos_temperature: float = 10000.0, pos_offset: float = -0.5, norm: bool = True,
                 level_embed: bool = True, in_strides: list[int] | None = None, mask_padding: bool = False):
        super().__init__()
        strides = list(in_strides or [2 ** (i + 3) for i in range(len(in_channels))])[:num_levels]
        self.strides = strides + [strides[-1] * 2 ** (i + 1) for i in range(num_levels - len(strides))]
        self.mask_padding = mask_padding
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
        sizes = image_sizes(mask)
        masked = self.mask_padding and has_padding(mask)
        cells: list[Tensor] = []  # per level, each image's cells (mask_padding)
        maps, last = [], features[-1]
        for lvl, proj in enumerate(self.input_proj):
            if lvl < self.num_backbone_levels:
                out = proj[0](features[lvl])
            else:  # the extra levels' 3x3 convolutions read the previous level's padding
                out = proj[0](last * cells[lvl - 1][:, None].to(last.dtype) if masked else last)
            if self.mask_padding:
                cells.append(content_cells(sizes, self.strides[lvl], out.shape[-2:]))
            if len(proj) > 1:
                out = _masked_group_norm(proj[1], out, cells[lvl]) if masked else proj[1](out)
            maps.append(out)
            last = out if lvl >= self.num_backbone_levels else last
        tokens, pads, poss, shapes, ratios = [], [], [], [], []
        for lvl, m in enumerate(maps):
            h, w = m.shape[-2:]
            pad = ~cells[lvl] if self.mask_padding else F.interpolate(mask[None].float(), size=(h, w)).to(torch.bool)[0]
            pos = self.position(pad).to(m.dtype)
            tokens.append(m.flatten(2).transpose(1, 2))
            pads.append(pad.flatten(1))
            pos = pos.flatten(2).transpose(1, 2)
            poss.append(pos + self.level_embed[lvl] if self.level_embed is not None else pos)
            shapes.append((h, w))  # SymInts while exporting with a dynamic size
            valid_h = (~pad[:, :, 0]).sum(1).float() / h
            valid_w = (~pad[:, 0, :]).sum(1).float() / w
            ratios.append(torch.stack([valid_w, valid_h], -1))
        return MultiLevel(torch.cat(tokens, 1), torch.cat(pads, 1), torch.cat(poss, 1), shapes,
                          torch.stack(ratios, 1), sizes, tuple(mask.shape[-2:]), self.mask_padding)


def _masked_group_norm(norm: nn.GroupNorm, x: Tensor, cells: Tensor) -> Tensor:
    """``norm(x)`` with each image's statistics over its content ``cells`` [B, h, w] only (in fp32);
    the padded cells' outputs are left for the level's padding mask to hide."""
    B, C, h, w = x.shape
    groups = x.float().reshape(B, norm.num_groups, -1, h * w)
    keep = cells.reshape(B, 1, 1, h * w).to(groups.dtype)
    count = keep.sum(-1, keepdim=True) * groups.shape[2]
    mean = (groups * keep).sum((2, 3), keepdim=True) / count
    var = ((groups - mean).square() * keep).sum((2, 3), keepdim=True) / count
    out = ((groups - mean) * torch.rsqrt(var + norm.eps)).reshape(B, C, h, w)
    return (out * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)).to(x.dtype)
