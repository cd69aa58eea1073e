"""Which tokens a token-sparse encoder kept: the facts its scorer's supervision (``losses/selection.py``),
``Corr``, ``viz`` and ``bench`` read. Here, beside ``MultiLevel``, so that the losses read them without
importing the encoders (``models/encoders/scoring.py`` makes them and re-exports them)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.functional import token_levels
from .neck import MultiLevel


@dataclass
class LayerSelection:
    """One encoder layer's tokens. indices: [B, k] flat token indices, best first; scores: [B, k]
    their ranking logits; counts: [B] entries per image that are written back (the rest are
    padding of the batch-wide width)."""

    indices: Tensor
    scores: Tensor
    counts: Tensor


@dataclass
class TokenSelection:
    """The facts losses, visualisation and benchmarks read about a sparse encoder's choices.

    token_logits: [B, S] scorer logits before padding is masked (the selection losses' input);
    layers: one ``LayerSelection`` per encoder layer; shapes: per level (H, W); padding: [B, S];
    image_sizes: [B, 2] unpadded (height, width) and padded_size (height, width) in input pixels
    (``MultiLevel``'s, see ``of``).
    """

    token_logits: Tensor
    layers: list[LayerSelection]
    shapes: list[tuple[int, int]]
    padding: Tensor
    image_sizes: Tensor | None = None
    padded_size: tuple[int, int] | None = None

    @classmethod
    def of(cls, token_logits: Tensor, layers: list[LayerSelection], levels: MultiLevel) -> "TokenSelection":
        """The selection made on ``levels``, with their shapes, padding and image sizes."""
        return cls(token_logits, layers, levels.shapes, levels.padding, levels.image_sizes, levels.padded_size)

    def level_counts(self, layer: int) -> Tensor:
        """[B, L] tokens each image kept per level in ``layer``."""
        sel = self.layers[layer]
        onehot = F.one_hot(token_levels(sel.indices, self.shapes), len(self.shapes))
        return (onehot * written(sel.indices, sel.counts)[..., None]).sum(1)

    def kept_fraction(self) -> float:
        """Mean over layers and images of kept tokens / valid tokens."""
        valid = (~self.padding).sum(1).clamp(min=1).float()
        return float(torch.stack([s.counts.float() / valid for s in self.layers]).mean())


def written(indices: Tensor, counts: Tensor) -> Tensor:
    """[B, k] True on the entries of a selection that are written back (each image's first counts[i])."""
    return torch.arange(indices.shape[1], device=indices.device)[None] < counts[:, None]
