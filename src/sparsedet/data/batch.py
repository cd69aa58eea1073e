"""Padding a list of images into one batch with a padding mask."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Batch:
    """Images padded bottom/right to a common size.

    images: float [B, 3, H, W] in [0, 1], zero on padding.
    mask: bool [B, H, W], True on padding pixels, False on real image pixels.
    """

    images: Tensor
    mask: Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(self.images.to(device, non_blocking=non_blocking),
                     self.mask.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        # DataLoader(pin_memory=True) calls this on custom batch types.
        return Batch(self.images.pin_memory(), self.mask.pin_memory())

    @classmethod
    def from_images(cls, images: list[Tensor], size_divisor: int = 1) -> Batch:
        """Pad images (each float (3, h, w)) to the largest h and w in the list.

        With ``size_divisor`` > 1 the padded size is rounded up to a multiple of it
        (useful for backbones whose strides must divide the input).
        """
        if not images:
            raise ValueError("Batch.from_images needs at least one image")
        for img in images:
            if img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(f"expected images of shape (3, h, w), got {tuple(img.shape)}")
        height = max(int(img.shape[1]) for img in images)
        width = max(int(img.shape[2]) for img in images)
        if size_divisor > 1:
            height = -(-height // size_divisor) * size_divisor
            width = -(-width // size_divisor) * size_divisor
        first = images[0]
        padded = first.new_zeros((len(images), 3, height, width))
        mask = torch.ones((len(images), height, width), dtype=torch.bool, device=first.device)
        for i, img in enumerate(images):
            h, w = img.shape[1:]
            padded[i, :, :h, :w] = img
            mask[i, :h, :w] = False
        return cls(padded, mask)


def collate(samples: list[tuple[Tensor, dict] | None],
            size_divisor: int = 1) -> tuple[Batch | None, list[dict], int]:
    """DataLoader collate_fn: returns (batch, targets, number of dropped samples).

    ``None`` samples (images that could not be read) are dropped so that one bad
    file never stops training. If every sample is ``None`` the batch is ``None``.
    """
    kept = [s for s in samples if s is not None]
    dropped = len(samples) - len(kept)
    if not kept:
        return None, [], dropped
    batch = Batch.from_images([img for img, _ in kept], size_divisor=size_divisor)
    return batch, [target for _, target in kept], dropped
