"""Images as users give them (paths, PIL images, arrays, tensors) -> the padded batch every
prediction starts from: what ``Detector.predict`` and an exported model's ``OnnxDetector.predict``
share (``api.py`` re-exports these names)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import SparsedetError
from .batch import Batch
from .coco import load_image
from .sampler import shape_batches
from .transforms import resize

# An image: a path, a PIL image, an RGB (H, W, 3) array (uint8 0..255 or float in [0, 1]; OpenCV's
# BGR arrays need image[..., ::-1] first) or an RGB (3, H, W) float tensor in [0, 1].
ImageLike = Any


def predict_in_shape_batches(images: list[ImageLike], batch_size: int, preprocess, detect) -> list[dict]:
    """``detect(batch, sizes)`` over ``images`` in batches of like shapes (less padding to compute;
    the detections do not depend on it), returned in the images' order. ``preprocess`` as
    ``Detector.preprocess``."""
    pictures = [_to_pil(image) for image in images]
    results: list[dict] = [{}] * len(pictures)
    for indices in shape_batches([(p.height, p.width) for p in pictures], range(len(pictures)), batch_size):
        batch, sizes, _ = preprocess([pictures[i] for i in indices])
        for i, detections in zip(indices, detect(batch, sizes)):
            results[i] = detections
    return results


def preprocess_images(images: list[ImageLike], eval_size: int, eval_max_size: int
                      ) -> tuple[Batch, torch.Tensor, list[Image.Image]]:
    """What every prediction does first (``Detector``, an exported model in ``OnnxDetector``): each
    image resized so its short side is ``eval_size`` and its long side at most ``eval_max_size``,
    then padded into one batch. Returns (batch, original (height, width) [B, 2], the resized images)."""
    tensors, sizes, resized_images = [], [], []
    for im in map(_to_pil, images):
        resized, _ = resize(im, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
                            eval_size, eval_max_size)
        tensors.append(torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1))
        sizes.append((im.height, im.width))
        resized_images.append(resized)
    return Batch.from_images(tensors), torch.tensor(sizes), resized_images


def _to_pil(image: ImageLike) -> Image.Image:
    if isinstance(image, (str, Path)):
        path = Path(image)
        if path.is_dir():
            raise SparsedetError(f"{path} is a folder; pass the paths of its image files (`sparsedet predict` "
                                 "takes folders)")
        if not path.is_file():
            raise SparsedetError(f"image not found: {path}; pass the path of an existing image file (or a PIL "
                                 "image, array or tensor)")
        return load_image(path)
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise SparsedetError(f"image tensors must be RGB (3, H, W) in [0, 1], got shape {tuple(image.shape)}")
        image = image.detach().cpu()
        image = (image if image.dtype == torch.uint8 else image.float()).permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise SparsedetError(f"image arrays must be RGB (H, W, 3), got shape {image.shape}")
        return Image.fromarray(_to_uint8(image))
    raise SparsedetError(f"cannot read an image from {type(image).__name__}; pass a path, PIL image, array or tensor")


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """uint8 as it is; other integers in 0..255; floats in [0, 1] (a float array in 0..255, OpenCV
    style, or a normalised one is refused, not silently clipped)."""
    if image.dtype == np.uint8:
        return image
    if np.issubdtype(image.dtype, np.integer):
        if image.size and (image.min() < 0 or image.max() > 255):
            raise SparsedetError(f"integer image arrays must hold 0..255, got {image.min()}..{image.max()}")
        return image.astype(np.uint8)
    if not np.issubdtype(image.dtype, np.floating):
        raise SparsedetError(f"image arrays must be uint8 or float, got {image.dtype}")
    if image.size:
        low, high = float(np.min(image)), float(np.max(image))
        if not (np.isfinite(low) and np.isfinite(high)):
            raise SparsedetError("the image array holds NaN or infinite values")
        if high > 1.0 + 1e-3 or low < -1e-3:
            hint = ("it looks like 0..255 pixels (OpenCV style): divide it by 255 or pass uint8" if low >= -1e-3
                    else "pass the image before normalisation (the model normalises internally)")
            raise SparsedetError(f"float images must be RGB in [0, 1], got values {low:g}..{high:g}; {hint}")
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
