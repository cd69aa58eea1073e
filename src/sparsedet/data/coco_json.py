"""The COCO detection json structure, checked in one place for everything that reads it: the
dataset, the evaluator's ground truth and the YOLO export (``check-data`` lists problems instead of
stopping at the first, with the same rules).

A COCO dict holds ``images`` (``id``, ``file_name``, ``width``, ``height``), ``categories``
(``id``, ``name``) and ``annotations`` (``image_id``, ``category_id``, ``bbox`` = [x, y, w, h] in
pixels, optional ``id`` and ``iscrowd``).
"""
from __future__ import annotations

import math
from pathlib import Path

from ..errors import SparsedetError
from ..jsonfile import read_json

REQUIRED_KEYS = ("images", "annotations", "categories")
ANNOTATION_KEYS = ("image_id", "category_id", "bbox")
# The images' folder beside the json when they are not in its own folder, as supervision's COCO
# export (and many tools after it) writes a dataset.
IMAGE_FOLDER = "images"
PROBED_IMAGES = 5  # image entries looked for on disk to choose the default root


def read_coco_json(ann_file: str | Path) -> dict:
    """Parse a COCO json and check its top-level shape; SparsedetError on any problem."""
    return check_coco_dict(read_json(ann_file, "COCO annotation"), ann_file)


def default_image_root(ann_file: str | Path, coco: dict) -> Path:
    """The folder the ``file_name`` entries of ``coco`` (read from ``ann_file``) are relative to when
    no root is given: the json's folder, or its ``images/`` subfolder when the files are there instead."""
    folder = Path(ann_file).parent
    names = [img["file_name"] for img in coco["images"][:PROBED_IMAGES]
             if isinstance(img, dict) and isinstance(img.get("file_name"), str)]
    for root in (folder, folder / IMAGE_FOLDER):
        if any((root / name).is_file() for name in names):
            return root
    return folder


def find_image_root(ann_file: str | Path, file_name: str) -> Path | None:
    """A folder near ``ann_file`` that holds ``file_name``: one or two levels below the json's folder,
    or beside it (``annotations/x.json`` with ``val2017/``); None when there is none. For the error
    that says where the images are, so it searches only when they are not where expected."""
    folder = Path(ann_file).parent
    for root in [*sorted(folder.glob("*/")), *sorted(folder.glob("*/*/")), *sorted(folder.parent.glob("*/"))]:
        if (root / file_name).is_file():
            return root
    return None


def check_coco_dict(data: object, source: str | Path) -> dict:
    """Return ``data`` if it has the COCO top-level lists, else raise naming ``source``."""
    if not isinstance(data, dict):
        raise SparsedetError(f"{source} holds a JSON {type(data).__name__}, not a COCO object with "
                             "'images', 'annotations' and 'categories'.")
    missing = [key for key in REQUIRED_KEYS if not isinstance(data.get(key), list)]
    if missing:
        raise SparsedetError(f"{source} lacks the list(s) {', '.join(repr(k) for k in missing)}. A COCO "
                             "detection file needs top-level 'images', 'annotations' and 'categories' lists.")
    return data


def require(entry: object, keys: tuple[str, ...], what: str, path: str | Path) -> dict:
    """Return ``entry`` if it is a dict holding ``keys``, else raise naming ``what`` in ``path``."""
    if not isinstance(entry, dict):
        raise SparsedetError(f"{what} in {path} is not a JSON object.")
    missing = [key for key in keys if key not in entry]
    if missing:
        raise SparsedetError(f"{what} in {path} lacks {', '.join(repr(k) for k in missing)}; "
                             f"add {'it' if len(missing) == 1 else 'them'} or remove the entry.")
    return entry


def is_box(bbox: object) -> bool:
    """Whether ``bbox`` has the form of a COCO box: four numbers (their values are not checked)."""
    return isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)


def clipped_xyxy(bbox: list[float], width: float, height: float) -> list[float] | None:
    """COCO ``[x, y, w, h]`` (four numbers: see ``is_box``) -> xyxy clipped to the image,
    or None if degenerate or non-finite."""
    if not all(math.isfinite(v) for v in bbox):
        return None
    x, y, w, h = bbox
    x1, y1 = max(x, 0.0), max(y, 0.0)
    x2, y2 = min(x + w, width), min(y + h, height)
    if x2 <= x1 or y2 <= y1:
        return None
    return [x1, y1, x2, y2]


def annotation_name(ann: object, index: int) -> str:
    """How messages name an annotation: by its id when it has one, else by its position."""
    return f"annotation id {ann['id']}" if isinstance(ann, dict) and "id" in ann else f"annotation #{index}"


def validate_coco(data: object, source: str | Path, image_keys: tuple[str, ...] = ("id",),
                  category_keys: tuple[str, ...] = ("id",)) -> dict:
    """Return ``data`` if it is a COCO dict whose entries fit together, else raise one error naming
    ``source`` (a file, or e.g. "ground truth") and the entry.

    Checked: the top-level lists; every category and image is an object with ``category_keys`` /
    ``image_keys`` and its own id; every annotation is an object with ``image_id``, ``category_id``
    and a ``bbox`` of four numbers, naming a listed image and category. Box values (degenerate,
    non-finite, outside the image) are left to the reader: training drops such boxes, check-data
    lists them.
    """
    data = check_coco_dict(data, source)
    categories = [require(c, category_keys, f"category #{i}", source) for i, c in enumerate(data["categories"])]
    category_ids = {c["id"] for c in categories}
    if len(category_ids) != len(categories):
        raise SparsedetError(f"{source} repeats a category id; each category needs its own id.")
    images = [require(img, image_keys, f"image #{i}", source) for i, img in enumerate(data["images"])]
    image_ids = {img["id"] for img in images}
    if len(image_ids) != len(images):
        raise SparsedetError(f"{source} repeats an image id; each image needs its own id.")
    for i, ann in enumerate(data["annotations"]):
        name = annotation_name(ann, i)
        ann = require(ann, ANNOTATION_KEYS, name, source)
        if ann["image_id"] not in image_ids:
            raise SparsedetError(f"{name} in {source} refers to image id {ann['image_id']}, which is not in "
                                 "'images'. Add the image or remove the annotation.")
        if ann["category_id"] not in category_ids:
            raise SparsedetError(f"{name} in {source} has category id {ann['category_id']}, which is not in "
                                 f"'categories' (known: {sorted(category_ids)}). Add the category or fix the "
                                 "annotation.")
        if not is_box(ann["bbox"]):
            raise SparsedetError(f"{name} in {source} has bbox {ann['bbox']!r}; a COCO bbox is four numbers "
                                 "[x, y, width, height] in pixels. Fix or remove the annotation.")
    return data


def size_mismatch(path: str | Path, width: object, height: object, size: tuple[int, int]) -> str | None:
    """How an image entry's ``width``/``height`` disagree with the file's ``size`` (w, h), or None."""
    if (width, height) == tuple(size):
        return None
    return f"json says {width}x{height} (w x h) but {path} is {size[0]}x{size[1]}"
