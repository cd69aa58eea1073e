"""The two-stage token projection and class head: one part that the query selection and the
token-sparse encoders share (the encoders score tokens with it, the proposals are ranked by it;
weights shared as in the official models)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..nn.init import keep_own_init


def encoder_proposals(memory: Tensor, padding: Tensor, shapes: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
    """One anchor per token: its cell centre in the valid image, size 0.05 * 2**level.

    Returns (memory with padding/invalid tokens zeroed [B, S, C], proposals in logit space
    [B, S, 4] with +inf where padded or too close to the border).
    """
    B = memory.shape[0]
    proposals, start = [], 0
    for lvl, (h, w) in enumerate(shapes):
        pad = padding[:, start:start + h * w].view(B, h, w)
        valid_h = (~pad[:, :, 0]).sum(1)
        valid_w = (~pad[:, 0, :]).sum(1)
        ys, xs = torch.meshgrid(torch.arange(h, device=memory.device, dtype=memory.dtype),
                                torch.arange(w, device=memory.device, dtype=memory.dtype), indexing="ij")
        grid = torch.stack([xs, ys], -1)[None] + 0.5
        scale = torch.stack([valid_w, valid_h], -1).to(memory.dtype).view(B, 1, 1, 2)
        centre = grid / scale
        size = torch.full_like(centre, 0.05 * 2.0 ** lvl)
        proposals.append(torch.cat([centre, size], -1).view(B, -1, 4))
        start += h * w
    props = torch.cat(proposals, 1)
    valid = ((props > 0.01) & (props < 0.99)).all(-1, keepdim=True)
    logits = torch.log(props / (1 - props))
    invalid = padding[..., None] | ~valid
    logits = logits.masked_fill(invalid, float("inf"))
    return memory.masked_fill(invalid, 0.0), logits


class TokenProjection:
    """``enc_output`` + ``enc_output_norm`` (the projection) and ``class_head`` over every token: one
    part, built once by the detector and handed to the query selection (which ranks proposals by
    it) and to the encoder (which may score tokens with it). It is no module of its own: the query
    selection registers its layers under these names, so that checkpoints keep their keys
    (``queries.enc_output.*``, ``queries.class_head.*``)."""

    def __init__(self, dim: int, num_classes: int):
        """Create the projection and the class head (prior 0.01 on every class, as the official code)."""
        self.enc_output = nn.Linear(dim, dim)
        self.enc_output_norm = nn.LayerNorm(dim)
        self.class_head = nn.Linear(dim, num_classes)
        nn.init.constant_(self.class_head.bias, -math.log((1 - 0.01) / 0.01))
        keep_own_init(self.class_head)

    def layers(self) -> dict[str, nn.Module]:
        """The layers by the names their owner registers them under."""
        return {"enc_output": self.enc_output, "enc_output_norm": self.enc_output_norm, "class_head": self.class_head}

    def project(self, tokens: Tensor, padding: Tensor, shapes: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        """LayerNorm(Linear(tokens)) with padded and border tokens zeroed first, and each token's
        proposal in logit space: ([B, S, C], [B, S, 4])."""
        masked, proposals = encoder_proposals(tokens, padding, shapes)
        return self.enc_output_norm(self.enc_output(masked)), proposals
