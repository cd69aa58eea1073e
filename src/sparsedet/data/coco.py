"""COCO-json detection dataset with category-id mapping and clear validation errors.

Category ids (any integers) map to contiguous labels 0..C-1 in increasing id order.
Boxes in the json are COCO ``[x, y, w, h]`` pixels; targets hold cxcywh normalised to
the transformed image size. :func:`open_detection_dataset` also opens YOLO datasets
(read into the same COCO dict form by ``yolo.py``).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import SparsedetError
from .coco_json import (IMAGE_FOLDER, annotation_name, clipped_xyxy, default_image_root, find_image_root,
                        read_coco_json, validate_coco)
from .transforms import ToTensorAndNormaliseBoxes
from .yolo import YAML_NAMES, find_yolo_yaml, label_folder, label_path, read_yolo

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


def open_detection_dataset(path: str | Path, split: str, images_root: str | Path | None = None,
                           transforms: Callable | None = None) -> CocoDetection:
    """A :class:`CocoDetection` from a YOLO ``data.yaml`` (or its folder) and ``split``, or from a
    COCO json (``split`` unused). ``images_root`` applies to COCO only: the yaml locates YOLO images.
    A split without a single box is a SparsedetError: training on it learns only background and
    evaluating on it defines no metric."""
    yaml_path = find_yolo_yaml(path)
    if yaml_path is None:
        if Path(path).is_dir():
            raise SparsedetError(f"{path} is a folder without {' or '.join(YAML_NAMES)}; pass a COCO "
                                 "json file or a YOLO dataset yaml (or its folder).")
        dataset = CocoDetection(path, images_root, transforms)
    else:
        if images_root is not None:
            warnings.warn(f"images_root {images_root} is ignored for the YOLO dataset {yaml_path}", stacklevel=2)
        coco, root = read_yolo(yaml_path, split)
        dataset = CocoDetection(coco, root, transforms, source=f"{yaml_path} ({split})")
    if dataset.num_boxes == 0:
        raise SparsedetError(f"{dataset.source} has no boxes: {_why_no_boxes(dataset, yaml_path is not None)}. "
                             "Training on it would learn only background, and every metric on it would be n/a.")
    return dataset


def _why_no_boxes(dataset: CocoDetection, yolo: bool) -> str:
    annotations = dataset.coco["annotations"]
    if yolo:
        images = [dataset.images_root / img["file_name"] for img in dataset.coco["images"]]
        labelled = sum(label_path(p).is_file() for p in images)
        where = label_folder(images)
        if not labelled:
            return (f"none of its {len(images)} images has a label file in {where} (images/<split>/a.jpg is "
                    "labelled by labels/<split>/a.txt: is the labels folder misnamed or elsewhere?)")
        return (f"its {labelled} label file(s) in {where} hold " +
                (f"only degenerate boxes ({len(annotations)})" if annotations else "no lines"))
    if not annotations:
        return "its 'annotations' list is empty"
    return f"its {len(annotations)} annotation(s) are all crowd regions or degenerate boxes"


def size_mismatch(path: str | Path, width: object, height: object, size: tuple[int, int]) -> str | None:
    """How an image entry's ``width``/``height`` disagree with the file's ``size`` (w, h), or None."""
    if (width, height) == tuple(size):
        return None
    return f"json says {width}x{height} (w x h) but {path} is {size[0]}x{size[1]}"
