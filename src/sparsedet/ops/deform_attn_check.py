"""Shape checks for ``ms_deform_attn``'s inputs, in Python ints before any backend runs.

The native kernel indexes raw pointers with these sizes, so a mismatch there reads or writes
outside the tensors; the PyTorch backends would fail later with a less helpful message. Under
``torch.export`` or dynamic ``torch.compile`` sizes may be symbolic: each comparison runs only where
its sizes are plain ints, so tracing adds no guards.
"""
from __future__ import annotations

from torch import Tensor

from ..errors import SparsedetError


def _known(*sizes) -> bool:
    return all(type(n) is int for n in sizes)


def check_inputs(value: Tensor, shapes: list[int], locations: Tensor, weights: Tensor) -> None:
    """Raise SparsedetError unless value [B, S, M, D], flat shapes (H_0, W_0, ...) with
    S = sum(H_l * W_l), locations [B, Q, M, L, P, 2] and weights [B, Q, M, L, P] agree."""
    if value.dim() != 4 or locations.dim() != 6 or weights.dim() != 5:
        raise SparsedetError(
            f"deformable attention expects value [B, S, M, D], locations [B, Q, M, L, P, 2] and weights "
            f"[B, Q, M, L, P]; got {value.dim()}, {locations.dim()} and {weights.dim()} dimensions")
    if not _known(*shapes):
        return  # symbolic level shapes (tracing at any size)
    if len(shapes) % 2:
        raise SparsedetError(f"level shapes must be (H, W) pairs; got {len(shapes)} numbers: {list(shapes)}")
    pairs = list(zip(shapes[0::2], shapes[1::2]))
    if any(n < 0 for n in shapes):
        raise SparsedetError(f"level shapes {pairs} hold a negative size")
    B, S, M, _ = value.shape
    loc, w = tuple(locations.shape), tuple(weights.shape)
    # Each comparison runs only where both sides are plain ints (a traced batch may be symbolic).
    if _known(loc[5]) and loc[5] != 2:
        raise SparsedetError(f"locations must end in (x, y) pairs; got shape {loc}")
    if _known(loc[3], w[3]) and (loc[3] != len(pairs) or w[3] != len(pairs)):
        raise SparsedetError(f"{len(pairs)} level shapes {pairs} but locations and weights have {loc[3]} and "
                             f"{w[3]} levels (dimension 3); pass one (H, W) per level")
    tokens = sum(h * w_ for h, w_ in pairs)
    if _known(S) and tokens != S:
        raise SparsedetError(f"level shapes {pairs} hold {tokens} tokens but value has {S} "
                             f"(value is [B, S, M, D] with S = sum of H * W over the levels)")
    for name, got in (("batch", (B, loc[0], w[0])), ("head", (M, loc[2], w[2]))):
        if _known(*got) and len(set(got)) != 1:
            raise SparsedetError(f"value, locations and weights disagree on the {name} size: {got}")
    if _known(loc[1], w[1], loc[4], w[4]) and (loc[1] != w[1] or loc[4] != w[4]):
        raise SparsedetError(f"locations {loc} and weights {w} disagree on queries or points")


def check_grad(grad: Tensor, value: Tensor, locations: Tensor) -> None:
    """The backward's incoming gradient must hold [B, Q, M * D] (or [B, Q, M, D]) numbers."""
    B, _, M, D = value.shape
    Q = locations.shape[1]
    g = tuple(grad.shape)
    if _known(*g, B, Q, M, D) and (g[:2] != (B, Q) or grad.numel() != B * Q * M * D):
        raise SparsedetError(f"the output gradient has shape {g}; expected [{B}, {Q}, {M * D}]")
