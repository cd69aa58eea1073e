"""What the token-sparse encoders share: the token scorer, top-down score modulation, keep
counts, and the gather -> layer -> scatter bookkeeping.

Shapes stay static for a given input size and keep ratio: selections are top-k index tensors of
one width per batch with a per-image count of entries that are written back, never boolean masks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import SparsedetError
from ...losses.selection import SelectionSupervision
from ...nn.tokens import LayerSelection, TokenSelection, written  # noqa: F401 (re-exported)
from ...ops.functional import gather_rows, top_k
from ...ops.padding import rank_padding_last
from .base import Encoder
from .dense import encoder_reference_points


class TokenSparseEncoder(Encoder):
    """A token-sparse encoder: it declares its scorer's ``supervision`` (``Encoder`` says what each
    declaration means)."""

    supervision: type[SelectionSupervision]


class TokenScorer(nn.Module):
    """Per-token objectness logit (Sparse DETR's ``MaskPredictor``; child names kept for loading).

    Half of the hidden features are replaced by their mean over the tokens given, so every
    token's score also sees a summary of its image: over its own tokens where ``padding`` is
    given, over the padded batch's row (the official code) where it is None.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.layer1 = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.layer2 = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(),
                                    nn.Linear(dim // 4, 1))

    def forward(self, x: Tensor, padding: Tensor | None = None) -> Tensor:
        """x: [B, n, C], padding: [B, n] True on padding or None -> logits [B, n]."""
        z = self.layer1(x)
        local, summary = z.chunk(2, dim=-1)
        if padding is None:
            summary = summary.mean(1, keepdim=True)
        else:
            keep = (~padding)[..., None].to(summary.dtype)
            summary = (summary * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp(min=1)
        summary = summary.expand_as(local)
        return self.layer2(torch.cat([local, summary], -1)).squeeze(-1)


def top_down_scores(scorer: TokenScorer, feats: Tensor, shapes: list[tuple[int, int]], alpha: Tensor,
                    alpha_index: list[int], padding: Tensor | None = None) -> list[Tensor]:
    """Score levels coarse to fine; each finer level's features are modulated by the upsampled
    logits of the level above: x + alpha[alpha_index[l]] * x * up(s_{l+1}).

    feats: [B, S, C] flattened fine to coarse. padding: [B, S] to score and upsample each image
    within its own cells (None: over the padded maps, as the official code). Returns per-level
    logits [B, H_l * W_l], fine to coarse.
    """
    B = feats.shape[0]
    sizes = [h * w for h, w in shapes]
    parts = list(feats.split(sizes, 1))
    pads = list(padding.split(sizes, 1)) if padding is not None else [None] * len(shapes)
    scores: list[Tensor] = [feats.new_empty(0)] * len(shapes)
    above = None
    for lvl in range(len(shapes) - 1, -1, -1):
        x = parts[lvl]
        if above is not None:
            h, w = shapes[lvl]
            if padding is None:
                up = F.interpolate(above, size=(h, w), mode="bilinear", align_corners=True)
            else:
                up = upsample_within_images(above, content_size(pads[lvl + 1], shapes[lvl + 1]),
                                            content_size(pads[lvl], shapes[lvl]), (h, w))
            x = x + x * up.view(B, h * w, 1) * alpha[alpha_index[lvl]]
        scores[lvl] = scorer(x, pads[lvl])
        above = scores[lvl].view(B, 1, *shapes[lvl])
    return scores


def content_size(padding: Tensor, shape: tuple[int, int]) -> Tensor:
    """A level's flat padding [B, h * w] -> [B, 2] each image's (rows, columns) of content."""
    pad = padding.view(-1, *shape)
    return torch.stack([(~pad[:, :, 0]).sum(1), (~pad[:, 0, :]).sum(1)], -1)


def upsample_within_images(x: Tensor, size_in: Tensor, size_out: Tensor, shape: tuple[int, int]) -> Tensor:
    """Bilinear, corner-aligned upsampling of each image's content cells alone: x [B, C, H, W]
    whose image i fills its top-left ``size_in[i]`` (rows, columns) -> [B, C, h, w] whose top-left
    ``size_out[i]`` cells are what ``F.interpolate(align_corners=True)`` gives for the image alone."""
    H, W = x.shape[-2:]

    def axis(n: int, n_in: Tensor, n_out: Tensor, extent: int) -> Tensor:
        # Output cell j reads input position j * (n_in - 1) / (n_out - 1), in grid_sample's [-1, 1].
        step = (n_in - 1).float() / (n_out - 1).clamp(min=1).float()
        return torch.arange(n, device=x.device, dtype=torch.float32)[None] * step[:, None] / max(extent - 1, 1) * 2 - 1

    ys, xs = axis(shape[0], size_in[:, 0], size_out[:, 0], H), axis(shape[1], size_in[:, 1], size_out[:, 1], W)
    grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), -1)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", align_corners=True)


def keep_counts(valid: Tensor, ratio: float, plus_one: bool) -> Tensor:
    """Tokens kept per image: floor(valid * ratio) (+ 1 for Sparse DETR and Focus-DETR).
    Computed in float32 like the official code, so the floors agree."""
    n = (valid.float() * torch.tensor(ratio, dtype=torch.float32)).long()
    return n + 1 if plus_one else n


def size_value(value: Tensor, upper: int) -> int:
    """The int in a 0-d tensor, known to lie in [1, upper]. While exporting it stays a value of the
    graph (an unbacked size), so widths follow the input."""
    size = value.item()
    torch._check(size >= 1)
    torch._check(size <= upper)
    return size


def top_share(logits: Tensor, padding: Tensor, ratio: float, plus_one: bool) -> "LayerSelection":
    """Each image's best floor(ratio * valid) (+ 1) tokens of ``logits`` [B, n], padding masked to
    the minimum, at the batch-wide width of the largest count."""
    counts = keep_counts((~padding).sum(1), ratio, plus_one)
    # The batch's width is the largest count, at least one token and at most all (keep_ratio 1 with
    # the +1 asks for one more than there are; a small level's quota can floor to 0).
    width = size_value(counts.max().clamp(1, logits.shape[1]), logits.shape[1])
    scores, indices = top_k(rank_padding_last(logits, padding), width)
    return LayerSelection(indices, scores, counts)


def scatter_tokens(memory: Tensor, indices: Tensor, values: Tensor, counts: Tensor) -> Tensor:
    """Write ``values`` [B, k, C] at ``indices`` [B, k] of ``memory`` [B, S, C]; only each image's
    first ``counts[i]`` entries are written, the rest leave memory as it was."""
    values = torch.where(written(indices, counts)[..., None], values, gather_rows(memory, indices))
    return memory.scatter(1, indices[..., None].expand(-1, -1, memory.shape[-1]), values.to(memory.dtype))


def cascade(indices: Tensor, scores: Tensor, counts: Tensor, ratios: list[float],
            per_image: bool = False) -> list[LayerSelection]:
    """Layer t keeps the first floor(k * ratios[t]) of the score-sorted selection (nested sets) of
    the batch's width k; image i writes back at most its own count (the official code), or, with
    ``per_image``, the first floor(counts[i] * ratios[t]): what it keeps alone. The products are
    taken in float32 like the official code, so the floors agree."""
    k = indices.shape[1]
    out = []
    for r in ratios:
        ratio = torch.tensor(r, dtype=torch.float32)
        # A tensor product, so that a symbolic width (export) stays a value of the graph (not
        # torch.full((), k): its ONNX Expand to a 0-d shape is invalid ONNX, which OpenVINO refuses).
        k_t = size_value((ratio * k).long().clamp(min=1), k)
        kept = (counts.float() * ratio).long().clamp(min=1).minimum(counts) if per_image else counts
        out.append(LayerSelection(indices[:, :k_t], scores[:, :k_t], kept.clamp(max=k_t)))
    return out


def uniform_alpha(n: int) -> nn.Parameter:
    """Learnable top-down modulation weights, U(-0.3, 0.3) as in Focus-DETR and Salience DETR."""
    return nn.Parameter(torch.empty(n).uniform_(-0.3, 0.3))


def encoder_points(shapes: list[tuple[int, int]], valid_ratios: Tensor) -> Tensor:
    """Token reference points flattened to [B, S, L*2] so they gather like token rows."""
    return encoder_reference_points(shapes, valid_ratios).flatten(2)


def gather_points(points: Tensor, indices: Tensor, num_levels: int) -> Tensor:
    """Rows of ``encoder_points`` at ``indices`` -> [B, k, L, 2]."""
    return gather_rows(points, indices).view(indices.shape[0], indices.shape[1], num_levels, 2)


def check_ratios(ratios: list[float], name: str) -> None:
    """Keep ratios are fractions in (0, 1]."""
    for ratio in ratios:
        if not 0.0 < ratio <= 1.0 or math.isnan(ratio):
            raise SparsedetError(f"{name} must be in (0, 1], got {ratios}")
