"""Shape checks for ``ms_deform_attn``'s inputs, in Python ints before any backend runs.

The native kernel indexes raw pointers with these sizes, so a mismatch there reads or writes
outside the tensors; the PyTorch backends would fail later with a less helpful message. Under
``torch.export`` or dynamic ``torch.compile`` sizes may be symbolic: the check then skips what it
cannot compare as plain ints, so tracing adds no guards.
"""
from __future__ import annotations

from torch import Tensor

from ..errors import SparsedetError


def _ints(values) -> list[int] | None:
    values = list(values)
    return values if all(type(v) is int for v in values) else None


def check_inputs(value: Tensor, shapes: list[int], locations: Tensor, weights: Tensor) -> None:
    """Raise SparsedetError unless value [B, S, M, D], flat shapes (H_0, W_0, ...) with
    S = sum(H_l * W_l), locations [B, Q, M, L, P, 2] and weights [B, Q, M, L, P] agree."""
    if value.dim() != 4 or locations.dim() != 6 or weights.dim() != 5:
        raise SparsedetError(
            f"deformable attention expects value [B, S, M, D], locations [B, Q, M, L, P, 2] and weights "
            f"[B, Q, M, L, P]; got {value.dim()}, {locations.dim()} and {weights.dim()} dimensions")
    flat, v, loc, w = _ints(shapes), _ints(value.shape), _ints(locations.shape), _ints(weights.shape)
    if flat is None or v is None or loc is None or w is None:
        return  # symbolic sizes (tracing): nothing to compare as ints
    if len(flat) % 2:
        raise SparsedetError(f"level shapes must be (H, W) pairs; got {len(flat)} numbers: {flat}")
    pairs = list(zip(flat[0::2], flat[1::2]))
    if any(n < 0 for n in flat):
        raise SparsedetError(f"level shapes {pairs} hold a negative size")
    B, S, M, _ = v
    if loc[5] != 2:
        raise SparsedetError(f"locations must end in (x, y) pairs; got shape {tuple(loc)}")
    if len(pairs) != loc[3] or len(pairs) != w[3]:
        raise SparsedetError(f"{len(pairs)} level shapes {pairs} but locations and weights have {loc[3]} and "
                             f"{w[3]} levels (dimension 3); pass one (H, W) per level")
    tokens = sum(h * w_ for h, w_ in pairs)
    if tokens != S:
        raise SparsedetError(f"level shapes {pairs} hold {tokens} tokens but value has {S} "
                             f"(value is [B, S, M, D] with S = sum of H * W over the levels)")
    for name, got in (("batch", (B, loc[0], w[0])), ("head", (M, loc[2], w[2]))):
        if len(set(got)) != 1:
            raise SparsedetError(f"value, locations and weights disagree on the {name} size: {got}")
    if loc[1] != w[1] or loc[4] != w[4]:
        raise SparsedetError(f"locations {tuple(loc)} and weights {tuple(w)} disagree on queries or points")


def check_grad(grad: Tensor, value: Tensor, locations: Tensor) -> None:
    """The backward's incoming gradient must hold [B, Q, M * D] (or [B, Q, M, D]) numbers."""
    g, v, loc = _ints(grad.shape), _ints(value.shape), _ints(locations.shape)
    if g is None or v is None or loc is None or len(v) != 4 or len(loc) != 6:
        return
    B, _, M, D = v
    Q = loc[1]
    if g[:2] != [B, Q] or grad.numel() != B * Q * M * D:
        raise SparsedetError(f"the output gradient has shape {tuple(g)}; expected [{B}, {Q}, {M * D}]")
