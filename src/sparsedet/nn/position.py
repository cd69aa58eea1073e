"""Sine position embeddings for feature maps and for points/boxes.

The conventions differ between the official code bases and are not
interchangeable (a checkpoint converts only with its own), so each is a parameter here:
``temperature`` (10000 or 20), ``offset`` (-0.5 in Deformable DETR, 0 in DINO
and Conditional DETR) and the coordinate order of box embeddings.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _frequencies(num_feats: int, temperature: float, device, dtype=torch.float32) -> Tensor:
    i = torch.arange(num_feats, device=device, dtype=dtype)
    return temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / num_feats)


def sine_embed_1d(values: Tensor, num_feats: int = 128, temperature: float = 10000.0) -> Tensor:
    """Embed each scalar into ``num_feats`` values, interleaving sin (even) and cos (odd).

    values: [...] already scaled (e.g. by 2*pi) -> [..., num_feats].
    """
    x = values[..., None] / _frequencies(num_feats, temperature, values.device, values.dtype)
    return torch.stack([x[..., 0::2].sin(), x[..., 1::2].cos()], dim=-1).flatten(-2)


def sine_embed_coords(coords: Tensor, num_feats: int = 128, temperature: float = 10000.0,
                      order: str = "yxwh") -> Tensor:
    """Embed normalised points or boxes, one block of ``num_feats`` per coordinate.

    coords: [..., 2] (x, y) or [..., 4] (cx, cy, w, h) in [0, 1].
    order: ``yxwh`` puts y before x (DINO/Conditional ``gen_sineembed``); ``xywh`` keeps the
        input order (Deformable DETR's two-stage proposal embedding).
    Returns [..., num_feats * coords.shape[-1]].
    """
    emb = sine_embed_1d(coords * (2 * math.pi), num_feats, temperature)  # [..., K, F]
    parts = list(emb.unbind(-2))
    if order == "yxwh":
        parts[0], parts[1] = parts[1], parts[0]
    elif order != "xywh":
        raise ValueError(f"unknown coordinate order {order!r}")
    return torch.cat(parts, dim=-1)


class SineMapEmbedding(nn.Module):
    """Position embedding of a padded feature map: [B, 2 * num_feats, H, W] (y block then x block)."""

    def __init__(self, num_feats: int = 128, temperature: float = 10000.0, offset: float = 0.0):
        super().__init__()
        self.num_feats, self.temperature, self.offset = num_feats, temperature, offset

    def forward(self, mask: Tensor) -> Tensor:
        """mask: [B, H, W] True on padding."""
        not_mask = (~mask).float()
        y = not_mask.cumsum(1)
        x = not_mask.cumsum(2)
        eps = 1e-6
        y = (y + self.offset) / (y[:, -1:, :] + eps) * (2 * math.pi)
        x = (x + self.offset) / (x[:, :, -1:] + eps) * (2 * math.pi)
        pos = torch.cat([sine_embed_1d(y, self.num_feats, self.temperature),
                         sine_embed_1d(x, self.num_feats, self.temperature)], dim=-1)
        return pos.permute(0, 3, 1, 2)
