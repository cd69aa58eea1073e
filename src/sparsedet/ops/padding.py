"""Which cells of a padded batch's feature maps hold image content, so that padding never reaches them.

Images are padded bottom/right to a common size. A convolution near an image's edge then reads
the padded border, and a norm with a bias (batch norm, frozen or not) has turned the padded zeros
into non-zero values: the image's features, and so its detections, depend on its batch-mates.
Zeroing every map's padded cells before each spatial convolution makes a padded batch compute
what each image computes alone, where the convolution's own zero padding stands at the edge: a
stride-s map of an image h pixels high has ceil(h / s) rows, both alone and padded.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def image_sizes(mask: Tensor) -> Tensor:
    """[B, H, W] padding mask (True on padding, images at the top left) -> [B, 2] each image's
    (height, width) in pixels."""
    return torch.stack([(~mask[:, :, 0]).sum(1), (~mask[:, 0, :]).sum(1)], -1)


def content_cells(sizes: Tensor, stride: int, shape: tuple[int, int]) -> Tensor:
    """bool [B, h, w]: True on the cells of a stride-``stride`` map of shape ``shape`` (h, w) that
    an image of ``sizes`` [B, 2] (height, width) computes alone: row i when i * stride < height."""
    h, w = shape
    rows = torch.arange(h, device=sizes.device) * stride < sizes[:, :1]
    cols = torch.arange(w, device=sizes.device) * stride < sizes[:, 1:]
    return rows[:, :, None] & cols[:, None, :]


def rank_padding_last(scores: Tensor, padding: Tensor) -> Tensor:
    """scores [B, S] with the padding tokens' below the smallest of the tensor, so they rank last.
    (The official code gives them that smallest score, which ties with the lowest image token:
    a quota that reaches down to it could keep a padding token instead.)"""
    return scores.masked_fill(padding, scores.min() - 1)


def has_padding(padding: Tensor | None) -> bool:
    """Whether ``padding`` [B, H, W] (or None) pads anything: not for one image alone or a batch of
    equal sizes. Always true while compiling or exporting: one graph serves padded batches too."""
    if padding is None:
        return False
    if torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export():  # is_compiling covers export
        return True
    return bool(padding.any())


def padding_zeroer(padding: Tensor | None) -> Callable[[Tensor, int], Tensor]:
    """``zero(x, stride)``: the map x [B, C, h, w] at ``stride`` with its padded cells set to 0
    (the identity where ``padding`` pads nothing, see ``has_padding``)."""
    if not has_padding(padding):
        return lambda x, stride: x
    sizes, cells = image_sizes(padding), {}

    def zero(x: Tensor, stride: int) -> Tensor:
        # One mask per stride: within a forward, every map at a stride has the same shape.
        if stride not in cells:
            cells[stride] = content_cells(sizes, stride, x.shape[-2:])[:, None]
        return x * cells[stride].to(x.dtype)

    return zero
