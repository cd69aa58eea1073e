"""COCO-json detection dataset with category-id mapping and clear validation errors, and the COCO
dataset format (``CocoFormat``: opening and ``sparsedet check-data``).

Category ids (any integers) map to contiguous labels 0..C-1 in increasing id order.
Boxes in the json are COCO ``[x, y, w, h]`` pixels; targets hold cxcywh normalised to
the transformed image size. Other formats (``yolo.py``) read their data into the same COCO
dict form and open it as a :class:`CocoDetection` too.
"""
from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import SparsedetError
from .check import image_problem
from .coco_json import (IMAGE_FOLDER, annotation_name, clipped_xyxy, default_image_root, find_image_root, is_box,
                        read_coco_json, size_mismatch, validate_coco)
from .formats import DataReport, DatasetFormat, Problem, register_format
from .formats import open_detection_dataset  # noqa: F401 (re-exported: its former home)
from .transforms import ToTensorAndNormaliseBoxes

# Boxes may overhang the image by this many pixels before they count as out of bounds
# (exported annotations often round up by a fraction of a pixel).
BOUNDS_TOLERANCE = 1.0


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB (pixels as stored; no EXIF rotation). SparsedetError if unreadable."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise SparsedetError(f"image not found: {path}. Check the images folder and the file_name "
                             "entries of the annotation file.") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise SparsedetError(f"cannot read image {path} ({err}). Replace the file or remove "
                             "its entry.") from None


class CocoDetection(Dataset):
    """Detection samples from a COCO json file or an already-parsed COCO dict.

    ``ann_file`` is a json path (``images_root`` defaults to its folder) or a dict as
    :func:`read_coco_json` returns (then ``images_root`` is required). ``source`` names
    the data in error messages in place of the path (e.g. ``"data.yaml (split 'val')"``).

    ``dataset[i]`` is ``(image, target)`` or ``None`` when the image cannot be read (a
    warning names the file). image: float (3, H, W) in [0, 1] RGB after ``transforms``.
    target: ``labels`` long [n] (contiguous), ``boxes`` float [n, 4] cxcywh normalised to
    the transformed image, ``image_id`` int, ``orig_size`` long [2] (h, w) of the file,
    ``size`` long [2] (h, w) after transforms.

    ``transforms`` takes and returns ``(image, target)`` with boxes in absolute xyxy
    pixels, and must end with :class:`ToTensorAndNormaliseBoxes` (as
    ``build_transforms`` does); by default only that step is applied.
    """

    def __init__(self, ann_file: str | Path | dict, images_root: str | Path | None = None,
                 transforms: Callable | None = None, *, source: str | None = None):
        if isinstance(ann_file, dict):
            if images_root is None:
                raise ValueError("CocoDetection needs images_root when given a parsed COCO dict")
            self.ann_file: Path | None = None
            path: str | Path = source if source is not None else "COCO dict"
            coco: object = ann_file
        else:
            self.ann_file = Path(ann_file)
            path = source if source is not None else self.ann_file
            coco = read_coco_json(self.ann_file)
        self.coco = validate_coco(coco, path, image_keys=("id", "file_name", "width", "height"),
                                  category_keys=("id", "name"))
        self.source = str(path)
        self.images_root = Path(images_root) if images_root is not None else default_image_root(ann_file, self.coco)
        self.transforms = transforms if transforms is not None else ToTensorAndNormaliseBoxes()
        if not self.coco["images"]:
            raise SparsedetError(f"{path} contains no images; add entries to 'images' or pick "
                                 "another annotation file.")
        if not self.coco["categories"]:
            raise SparsedetError(f"{path} defines no categories; add entries to 'categories'.")
        categories = sorted(self.coco["categories"], key=lambda c: c["id"])
        self.category_ids: list[int] = [c["id"] for c in categories]
        self.classes: list[str] = [str(c["name"]) for c in categories]
        label_of = {cid: label for label, cid in enumerate(self.category_ids)}

        self._images = self.coco["images"]
        self.image_ids: list[int] = [img["id"] for img in self._images]
        # (height, width) per image as the annotations state it (aspect-ratio grouping reads it).
        self.image_sizes: list[tuple[int, int]] = [(img["height"], img["width"]) for img in self._images]
        index_of = {img_id: i for i, img_id in enumerate(self.image_ids)}

        boxes: list[list[list[float]]] = [[] for _ in self._images]
        labels: list[list[int]] = [[] for _ in self._images]
        self.num_degenerate = 0
        self.num_crowd = 0
        degenerate_example = None
        for i, ann in enumerate(self.coco["annotations"]):
            if ann.get("iscrowd", 0):
                self.num_crowd += 1  # crowd regions are ignored for training, as in DETR
                continue
            index = index_of[ann["image_id"]]
            box = clipped_xyxy(ann["bbox"], self._images[index]["width"], self._images[index]["height"])
            if box is None:
                self.num_degenerate += 1
                degenerate_example = degenerate_example or annotation_name(ann, i)
                continue
            boxes[index].append(box)
            labels[index].append(label_of[ann["category_id"]])
        self._boxes = [np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in boxes]
        self._labels = [np.asarray(lab, dtype=np.int64) for lab in labels]
        if self.num_degenerate:
            warnings.warn(f"{path}: dropped {self.num_degenerate} degenerate box(es) (no area inside "
                          f"the image, or non-finite), e.g. {degenerate_example}. "
                          "Run `sparsedet check-data` to list them.", stacklevel=2)

    def __len__(self) -> int:
        return len(self._images)

    @property
    def num_boxes(self) -> int:
        """Boxes kept for training and evaluation (crowd regions and degenerate boxes are not counted)."""
        return sum(len(b) for b in self._boxes)

    def require_readable(self) -> None:
        """Return once some image file reads; else raise SparsedetError naming the image root (a wrong
        root, or a json moved away from its images, leaves every sample None)."""
        example = None
        for info in self._images:
            path = self.images_root / info["file_name"]
            try:
                load_image(path)
                return
            except SparsedetError as err:
                example = example or (f"{path} does not exist" if not path.exists() else str(err))
        name = self._images[0]["file_name"]
        missing = self.ann_file is not None and not (self.images_root / name).exists()
        found = find_image_root(self.ann_file, name) if missing else None
        if found is not None:
            fix = f"{name} is in {found}: pass --images {found}"
        elif self.ann_file is not None:
            fix = ("pass the folder its file_name entries are relative to as --images (default: the json's "
                   f"folder, or its {IMAGE_FOLDER}/ folder when the files are there)")
        else:
            fix = "check the image files"
        raise SparsedetError(f"no image of {self.source} can be read under {self.images_root}: all {len(self)} "
                             f"failed (e.g. {example}). Training cannot fill a batch; {fix}.")

    def __getitem__(self, index: int) -> tuple[Tensor, dict] | None:
        info = self._images[index]
        try:
            image = load_image(self.images_root / info["file_name"])
        except SparsedetError as err:
            warnings.warn(f"skipping image id {info['id']}: {err}", stacklevel=2)
            return None
        width, height = image.size
        boxes = torch.from_numpy(self._boxes[index].copy())
        labels = torch.from_numpy(self._labels[index].copy())
        # The json's width/height may disagree with the file: keep boxes inside the real image.
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        target = {"boxes": boxes[keep], "labels": labels[keep], "image_id": info["id"],
                  "orig_size": torch.tensor([height, width])}
        mismatch = size_mismatch(self.images_root / info["file_name"], info["width"], info["height"], image.size)
        if mismatch:  # the trainer counts these images in one warning
            target["size_mismatch"] = f"image id {info['id']} ({info['file_name']}): {mismatch}"
        image, target = self.transforms(image, target)
        target["size"] = torch.tensor([image.shape[-2], image.shape[-1]])
        return image, target


@register_format("coco")
class CocoFormat(DatasetFormat):
    """A COCO json file: any file that no other format claims (reading it says what is wrong)."""

    noun = "a COCO json file"
    fallback = True

    def find(self, path: Path) -> Path | None:
        return None if path.is_dir() else path

    def open(self, file: Path, split: str, images_root: Path | None, transforms: Callable | None) -> CocoDetection:
        return CocoDetection(file, images_root, transforms)

    def why_no_boxes(self, dataset: CocoDetection) -> str:
        annotations = dataset.coco["annotations"]
        if not annotations:
            return "its 'annotations' list is empty"
        return f"its {len(annotations)} annotation(s) are all crowd regions or degenerate boxes"

    def check(self, file: Path, images_root: Path | None) -> DataReport:
        return check_coco(file, images_root)


def _bbox_problem(bbox: object, width: object, height: object) -> tuple[str, str] | None:
    """What is wrong with a COCO [x, y, w, h] box in a (width x height) image, as (kind, message), or None."""
    if not is_box(bbox) or not all(math.isfinite(v) for v in bbox):
        return "malformed bboxes", f"bbox {bbox!r} is not four finite numbers [x, y, w, h]"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return "degenerate bboxes", f"degenerate bbox {list(bbox)} (width and height must be > 0)"
    if not isinstance(width, (int, float)) or not isinstance(height, (int, float)):
        return None  # the image entry's own problem is reported once, with the image
    tol = BOUNDS_TOLERANCE
    if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        return "bboxes outside their image", f"bbox {list(bbox)} lies outside the {width}x{height} image"
    return None


def check_coco(path: Path, images_root: Path | None = None) -> DataReport:
    """Check a COCO json and its images; reports every problem found and what the dataset holds.

    Errors: unreadable (fully decoded) or missing images and size mismatches, malformed entries,
    duplicate ids, annotations with unknown image or category ids, degenerate or out-of-bounds
    boxes, no boxes at all. Warnings: images without annotations. A missing file or malformed json
    raises SparsedetError. ``images_root`` defaults to the json's folder.
    """
    data = read_coco_json(path)
    root = Path(images_root) if images_root is not None else default_image_root(path, data)
    problems: list[Problem] = []

    def error(message: str, kind: str = "") -> None:
        problems.append(Problem("error", message, kind))

    if not data["images"]:
        error(f"{path}: no images; add entries to 'images'")
    category_ids = Counter(c["id"] for c in data["categories"] if isinstance(c, dict) and "id" in c)
    if sum(category_ids.values()) < len(data["categories"]):
        error(f"{path}: every category must be an object with an 'id'")
    for cid, n in category_ids.items():
        if n > 1:
            error(f"{path}: category id {cid} is used by {n} categories", "duplicate category ids")

    images: dict[object, dict] = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            error(f"{path}: image #{i} needs an 'id' and a 'file_name'", "image entries without 'id' or 'file_name'")
            continue
        where = f"image id {img['id']} ({img['file_name']})"
        if img["id"] in images:
            error(f"{where}: duplicate image id", "duplicate image ids")
            continue
        images[img["id"]] = img
        if "width" not in img or "height" not in img:
            error(f"{where}: missing 'width'/'height'", "image entries without 'width'/'height'")
        found = image_problem(root / img["file_name"], img.get("width"), img.get("height"))
        if found:
            error(f"{where}: {found[1]}", found[0])

    first = next(iter(images.values()), None)
    if first is not None and not any((root / img["file_name"]).is_file() for img in images.values()):
        found = find_image_root(path, first["file_name"])
        if found is not None:
            error(f"{path}: no image file is under {root}; {first['file_name']} is in {found}: pass --images {found}")

    annotated: set[object] = set()
    seen_ids: set[object] = set()
    boxes = 0  # valid, non-crowd boxes of known images and categories
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            error(f"{path}: annotation #{i} is not a JSON object", "annotations that are not JSON objects")
            continue
        img = images.get(ann.get("image_id"))
        where = f"annotation id {ann.get('id', f'#{i}')} (image id {ann.get('image_id')}" + (
            f", {img['file_name']})" if img else ")")
        if "id" not in ann:
            error(f"{where}: missing 'id'", "annotations without 'id'")
        elif ann["id"] in seen_ids:
            error(f"{where}: duplicate annotation id", "duplicate annotation ids")
        seen_ids.add(ann.get("id"))
        if img is None:
            error(f"{where}: image id not in 'images'", "annotations of image ids not in 'images'")
        else:
            annotated.add(ann["image_id"])
        if ann.get("category_id") not in category_ids:
            error(f"{where}: unknown category id {ann.get('category_id')}",
                  "annotations of category ids not in 'categories'")
        size = (img.get("width"), img.get("height")) if img else (None, None)
        found = _bbox_problem(ann.get("bbox"), *size)
        if found:
            error(f"{where}: {found[1]}", found[0])
        elif img is not None and ann.get("category_id") in category_ids and not ann.get("iscrowd", 0):
            boxes += 1

    if images and not boxes:  # training refuses it: one error, not a warning per image
        why = "its annotations are all crowd or invalid" if data["annotations"] else "'annotations' is empty"
        error(f"{path}: no boxes ({why}); training on it would learn only background and every metric on it "
              "would be n/a")
        return DataReport(problems, len(images), boxes, len(category_ids))
    for img_id, img in images.items():
        if img_id not in annotated:
            problems.append(Problem("warning", f"image id {img_id} ({img['file_name']}): no annotations",
                                    "images without annotations"))
    return DataReport(problems, len(images), boxes, len(category_ids))
