"""The DETR augmentation recipe on (PIL image, target) pairs.

Targets entering a transform hold ``"boxes"``: float [n, 4] absolute xyxy pixels and
``"labels"``: long [n]; other keys pass through untouched. The last step,
:class:`ToTensorAndNormaliseBoxes`, returns a float (3, H, W) tensor in [0, 1] and boxes
as cxcywh normalised by the final image width/height. There is no mean/std
normalisation here: the model normalises internally.

Randomness comes from Python's ``random`` module only, so ``random.seed(s)`` makes a
run reproducible. DataLoader workers re-seed ``random`` per worker from the loader's
base seed, so seeded multi-worker runs are reproducible too.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..ops.boxes import xyxy_to_cxcywh

Sample = tuple[Image.Image, dict]
# Keys indexed per box: filtered together when a crop removes boxes.
PER_BOX_KEYS = ("boxes", "labels")


class Compose:
    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image, target: dict):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: Image.Image, target: dict) -> Sample:
        if random.random() >= self.p:
            return image, target
        width = image.width
        boxes = target["boxes"]
        # x1' = W - x2, x2' = W - x1; y unchanged.
        flipped = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=-1)
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), {**target, "boxes": flipped}


def resized_shape(height: int, width: int, shorter: int, max_size: int | None) -> tuple[int, int]:
    """(height, width) with the shorter side at ``shorter``, the longer side at most ``max_size``."""
    lo, hi = min(height, width), max(height, width)
    if max_size is not None and hi / lo * shorter > max_size:
        shorter = int(round(max_size * lo / hi))
    if width < height:
        return int(shorter * height / width), shorter
    return shorter, int(shorter * width / height)


def resize(image: Image.Image, target: dict, shorter: int, max_size: int | None) -> Sample:
    """Bilinear resize so the shorter side is ``shorter`` (capped by ``max_size``); scales boxes."""
    new_h, new_w = resized_shape(image.height, image.width, shorter, max_size)
    if (new_h, new_w) == (image.height, image.width):
        return image, target
    scale = torch.tensor([new_w / image.width, new_h / image.height] * 2)
    resized = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    return resized, {**target, "boxes": target["boxes"] * scale}


class RandomResize:
    """Resize the shorter side to a size drawn from ``scales`` (longer side capped by ``max_size``)."""

    def __init__(self, scales: Sequence[int], max_size: int | None = None):
        self.scales = list(scales)
        self.max_size = max_size

    def __call__(self, image: Image.Image, target: dict) -> Sample:
        return resize(image, target, random.choice(self.scales), self.max_size)


def crop_region(image: Image.Image, target: dict, top: int, left: int, height: int, width: int) -> Sample:
    """Crop a region; boxes are shifted and clipped, boxes left with no area are removed."""
    boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=target["boxes"].dtype)
    boxes = torch.minimum(boxes.clamp(min=0), torch.tensor([width, height, width, height], dtype=boxes.dtype))
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    out = {**target, "boxes": boxes}
    for key in PER_BOX_KEYS:
        out[key] = out[key][keep]
    return image.crop((left, top, left + width, top + height)), out


class RandomSizeCrop:
    """Crop a random region with width and height drawn from [min_size, max_size] (within the image)."""

    def __init__(self, min_size: int, max_size: int):
        self.min_size = min_size
        self.max_size = max_size

    def __call__(self, image: Image.Image, target: dict) -> Sample:
        # An image smaller than min_size is cropped to its own size along that side.
        w = random.randint(min(self.min_size, image.width), min(image.width, self.max_size))
        h = random.randint(min(self.min_size, image.height), min(image.height, self.max_size))
        top = random.randint(0, image.height - h)
        left = random.randint(0, image.width - w)
        return crop_region(image, target, top, left, h, w)


class RandomSelect:
    """Apply ``a`` with probability ``p``, otherwise ``b``."""

    def __init__(self, a: Callable, b: Callable, p: float = 0.5):
        self.a, self.b, self.p = a, b, p

    def __call__(self, image, target: dict):
        return self.a(image, target) if random.random() < self.p else self.b(image, target)


class ToTensorAndNormaliseBoxes:
    """PIL RGB -> float (3, H, W) in [0, 1]; boxes xyxy pixels -> cxcywh in [0, 1]."""

    def __call__(self, image: Image.Image, target: dict) -> tuple[Tensor, dict]:
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
        scale = torch.tensor([image.width, image.height] * 2, dtype=torch.float32)
        boxes = xyxy_to_cxcywh(target["boxes"].float() / scale)
        return tensor, {**target, "boxes": boxes}


def build_transforms(train: bool, scales: Sequence[int], max_size: int, crop: bool = True,
                     crop_scales: Sequence[int] = (400, 500, 600),
                     crop_range: tuple[int, int] = (384, 600)) -> Compose:
    """The DETR recipe.

    train: random flip, then with probability 0.5 either resize the shorter side to a
    random ``scales`` entry, or resize to a random ``crop_scales`` entry, crop a random
    region with sides in ``crop_range``, and resize to a random ``scales`` entry
    (``crop=False`` keeps only the first branch). The longer side never exceeds ``max_size``.
    eval: resize the shorter side to ``max(scales)``, longer side capped by ``max_size``.
    """
    final = ToTensorAndNormaliseBoxes()
    if not train:
        return Compose([RandomResize([max(scales)], max_size), final])
    plain = RandomResize(scales, max_size)
    if not crop:
        return Compose([RandomHorizontalFlip(), plain, final])
    cropped = Compose([RandomResize(crop_scales), RandomSizeCrop(*crop_range),
                       RandomResize(scales, max_size)])
    return Compose([RandomHorizontalFlip(), RandomSelect(plain, cropped), final])
