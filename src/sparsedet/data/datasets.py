"""The training and validation sets a run's config names, opened with the run's transforms."""
from __future__ import annotations

import copy

from ..config import Config
from ..errors import SparsedetError
from .formats import dataset_splits, open_detection_dataset
from .protocol import DetectionDataset
from .transforms import build_transforms


def make_datasets(config: Config) -> tuple[Config, DetectionDataset, DetectionDataset | None]:
    """Training and validation sets from ``config.data.train`` / ``val``, each in the format that
    claims its path (``data.formats``: a COCO json, a YOLO yaml, ...). A file's own ``val`` split
    (a YOLO yaml's) is used when ``data.val`` is empty. Returns a copy of
    ``config`` whose ``data.val`` names the validation data used, and the two sets; ``config``
    itself is left as it was."""
    resolved = copy.deepcopy(config)
    d, m = resolved.data, resolved.model
    if not d.train:
        raise SparsedetError("no training data: pass --train (a COCO json or a YOLO data.yaml)")
    train_tf = build_transforms(True, d.train_scales, d.max_size, d.crop, d.crop_scales, d.crop_range)
    eval_tf = build_transforms(False, [m.eval_size], m.eval_max_size)
    images = d.images or None
    if not d.val and "val" in dataset_splits(d.train):
        d.val = d.train  # the file's own val split
    train_set = open_detection_dataset(d.train, "train", images, train_tf)
    val_set = open_detection_dataset(d.val, "val", images, eval_tf) if d.val else None
    if val_set is not None and val_set.category_ids != train_set.category_ids:
        raise SparsedetError(f"{d.val} and {d.train} have different categories; use one category table")
    return resolved, train_set, val_set
