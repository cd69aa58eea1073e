"""What the engine needs of a detection dataset (``DetectionDataset``): the trainer, the sampler, the
evaluator and the hooks are typed on it, not on one format's class. Every dataset format opens to
one (``data.formats``); the built-in ones open to ``coco.CocoDetection``."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

from torch import Tensor


class DetectionDataset(Protocol):
    """Images with boxes, and the ground truth they are scored against.

    ``dataset[i]`` is ``(image, target)`` or None when the image cannot be read: image float
    (3, H, W) in [0, 1] after the dataset's transforms; target ``labels`` long [n] (0..C-1 in
    ``category_ids`` order), ``boxes`` float [n, 4] cxcywh normalised to the transformed image,
    ``image_id``, ``orig_size`` and ``size`` long [2] (h, w) of the file and after transforms.
    """

    classes: list[str]                    # class names, in label order
    category_ids: list[int]               # the category id of each label
    image_sizes: list[tuple[int, int]]    # (height, width) of each image: aspect grouping, shape batches
    coco: dict                            # the ground truth as a COCO dict (evaluation, threshold choice)
    images_root: Path                     # the folder ``coco``'s file_name entries are relative to
    source: str                           # how messages name the data

    @property
    def num_boxes(self) -> int:
        """Boxes that train and score (crowd regions and degenerate boxes left out)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Tensor, dict] | None: ...

    def require_readable(self) -> None:
        """Return once some image reads; else raise a SparsedetError that says how to fix the paths."""
