"""Dataset checks behind ``sparsedet check-data``: list every problem instead of stopping at the first."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image

from ..errors import SparsedetError
from .coco import size_mismatch
from .coco_json import default_image_root, find_image_root, is_box, read_coco_json
from .yolo import (YAML_NAMES, coordinate_problem, find_yolo_yaml, is_polygon, label_folder, label_path,
                   parse_label_line, split_images, yolo_splits)

# Boxes may overhang the image by this many pixels before they count as out of bounds
# (exported annotations often round up by a fraction of a pixel).
BOUNDS_TOLERANCE = 1.0


# A kind of problem met more often than this prints one summary line and this many examples.
EXAMPLES = 5


@dataclass
class Problem:
    severity: Literal["error", "warning"]
    message: str
    kind: str = ""  # what every problem of this sort shares, the summary of repeated ones ("" = one of a kind)


@dataclass
class DataReport:
    """What ``check_dataset`` found: the problems and what the dataset holds (images checked, valid
    non-crowd boxes, classes)."""

    problems: list[Problem]
    images: int
    boxes: int
    classes: int

    @property
    def clean(self) -> bool:
        return not any(p.severity == "error" for p in self.problems)

    @property
    def counts(self) -> str:
        return f"{self.images} images, {self.boxes} boxes, {self.classes} classes"


def _image_problem(path: Path, width: object = None, height: object = None) -> tuple[str, str] | None:
    """Why the file cannot serve as this image entry (unreadable, or not ``width`` x ``height`` when
    they are given), as (kind, message), or None if it is fine."""
    if not path.is_file():
        return "image files not found", f"file {path} not found"
    try:
        with Image.open(path) as img:
            img.verify()  # the file structure (PNG checksums); it checks nothing in a JPEG
        with Image.open(path) as img:
            size = img.size
            img.load()  # decodes every pixel: a truncated JPEG fails here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return "unreadable images", f"cannot read {path} ({err})"
    mismatch = None if width is None and height is None else size_mismatch(path, width, height, size)
    return ("json sizes that differ from their image file", mismatch) if mismatch else None


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


def check_dataset(ann_file: str | Path, images_root: str | Path | None = None) -> DataReport:
    """Check a COCO json and its images, or a YOLO dataset (its ``data.yaml`` or the folder holding
    it: see :func:`check_yolo`); reports every problem found and what the dataset holds.

    COCO errors: unreadable (fully decoded) or missing images and size mismatches, malformed
    entries, duplicate ids, annotations with unknown image or category ids, degenerate or
    out-of-bounds boxes, no boxes at all. Warnings: images without annotations. A missing file or
    malformed json raises SparsedetError. ``images_root`` defaults to the json's folder.
    """
    yaml_path = find_yolo_yaml(ann_file)
    if yaml_path is not None:
        if images_root is not None:
            raise SparsedetError(f"--images does not apply to the YOLO dataset {yaml_path}: its yaml locates "
                                 "the images. Leave it out.")
        return check_yolo(yaml_path)
    if Path(ann_file).is_dir():
        raise SparsedetError(f"{ann_file} is a folder without {' or '.join(YAML_NAMES)}; pass a COCO json file "
                             "or a YOLO dataset yaml (or its folder).")
    path = Path(ann_file)
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
        found = _image_problem(root / img["file_name"], img.get("width"), img.get("height"))
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


def check_yolo(yaml_path: str | Path) -> DataReport:
    """Check every split (train, val, test) of a YOLO dataset; reports every problem found and what
    the dataset holds (its splits' images and boxes together).

    Errors: a split entry without images, unreadable (fully decoded) images, label lines that are
    not numbers, name no class of 'names', have coordinates outside [0, 1] or an empty box; a train
    or val split without a single box (naming the folder where its labels were looked for).
    Warnings: images without a label file (one counted line per split), a test split without boxes.
    A missing or malformed yaml raises SparsedetError.
    """
    yaml_path = Path(yaml_path)
    problems: list[Problem] = []
    unknown_class: list[Problem] = []  # their kind, the classes all labels use, is known at the end
    used: set[int] = set()
    classes: dict[int, str] = {}
    images = all_boxes = 0
    splits = yolo_splits(yaml_path)
    if not splits:
        problems.append(Problem("error", f"{yaml_path}: no split entry; add e.g. `train: images/train`"))
    for split in splits:
        where = f"{yaml_path} ({split})"
        try:
            classes, _, paths = split_images(yaml_path, split)
        except SparsedetError as err:  # a bad 'names' is the same error for every split: report it once
            if all(p.message != str(err) for p in problems):
                problems.append(Problem("error", str(err)))
            continue
        unlabelled, boxes = [], 0
        for path in paths:
            found = _image_problem(path)
            if found:
                problems.append(Problem("error", f"{where}: {found[1]}", found[0]))
            label = label_path(path)
            if not label.is_file():
                unlabelled.append(path)
                continue
            lines, count, label_classes = _label_problems(label, classes)
            in_file = [Problem("error", line, kind) for kind, line in lines]
            problems += in_file
            unknown_class += [p for p in in_file if not p.kind]
            used |= label_classes
            boxes += count
        images, all_boxes = images + len(paths), all_boxes + boxes
        if not boxes:
            labelled = len(paths) - len(unlabelled)
            why = (f"none of its {len(paths)} images has a label file in {label_folder(paths)} (is the labels "
                   "folder misnamed or elsewhere?)" if not labelled else
                   f"its {labelled} label file(s) in {label_folder(paths)} hold no boxes")
            problems.append(Problem("warning" if split == "test" else "error", f"{where}: no boxes: {why}"))
        elif unlabelled:
            problems.append(Problem("warning", f"{where}: {len(unlabelled)} of {len(paths)} images have no label "
                                    f"file in {label_folder(unlabelled)} (e.g. {label_path(unlabelled[0]).name}); "
                                    "they count as background (an image without objects gets an empty .txt)"))
    summary = (f"label lines of a class not in 'names' (labels use {len(used)} classes: "
               f"{', '.join(map(str, sorted(used)[:10]))}{', ...' if len(used) > 10 else ''}; 'names' lists "
               f"{len(classes)})")
    for p in unknown_class:
        p.kind = summary
    return DataReport(problems, images, all_boxes, len(classes))


def _label_problems(path: Path, classes: dict[int, str]) -> tuple[list[tuple[str, str]], int, set[int]]:
    """What is wrong with the lines of a YOLO label file as (kind, message) (kind "" for a class not in
    ``classes``: the caller summarises those), how many boxes of known classes it holds, and the
    class indices its lines use."""
    problems, boxes, used = [], 0, set()
    text = path.read_bytes().decode("utf-8", errors="replace")  # odd bytes fail as a non-numeric line
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        values = parse_label_line(line)
        if values is None:
            problems.append(("label lines that are not `class cx cy w h`", f"{where}: not `class cx cy w h` (finite "
                             f"numbers, optionally followed by polygon points): {line.strip()[:80]!r}"))
            continue
        if values[0] == int(values[0]):
            used.add(int(values[0]))
        if values[0] != int(values[0]) or int(values[0]) not in classes:
            problems.append(("", f"{where}: class {line.split()[0]} is not a class index in 'names' "
                                 f"(0..{max(classes)})"))
            continue
        boxes += 1
        found = coordinate_problem(values)
        if found is None and is_polygon(values):
            xs, ys = values[1::2], values[2::2]
            found = "degenerate polygon (no width or height)" if max(xs) <= min(xs) or max(ys) <= min(ys) else None
        elif found is None and (values[3] <= 0 or values[4] <= 0):
            found = f"degenerate box w={values[3]:g} h={values[4]:g} (both must be > 0)"
        if found:
            problems.append(("label lines with coordinates outside [0, 1] or an empty box", f"{where}: {found}"))
    return problems, boxes, used


def format_report(report: DataReport, limit: int = 100) -> str:
    """Errors first: a problem of its own kind is one line, a kind met several times one summary line
    and at most ``EXAMPLES`` examples (at most ``limit`` of these groups); then what the dataset
    holds and the counts of errors and warnings."""
    groups: dict[tuple[str, object], list[Problem]] = {}
    for p in sorted(report.problems, key=lambda p: p.severity != "error"):
        groups.setdefault((p.severity, p.kind or id(p)), []).append(p)
    lines = []
    for (severity, _), group in list(groups.items())[:limit]:
        if len(group) == 1:
            lines.append(f"{severity}: {group[0].message}")
            continue
        lines.append(f"{severity}: {len(group)} {group[0].kind}, e.g.")
        lines += [f"  {p.message}" for p in group[:EXAMPLES]]
        if len(group) > EXAMPLES:
            lines.append(f"  ... and {len(group) - EXAMPLES} more")
    if len(groups) > limit:
        lines.append(f"... and {len(groups) - limit} more kinds of problem")
    errors = sum(p.severity == "error" for p in report.problems)
    lines.append(f"{report.counts}; {errors} error(s), {len(report.problems) - errors} warning(s)")
    return "\n".join(lines)
