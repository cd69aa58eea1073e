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
from .coco_json import is_box, read_coco_json
from .yolo import (YAML_NAMES, coordinate_problem, find_yolo_yaml, is_polygon, label_folder, label_path,
                   parse_label_line, split_images, yolo_splits)

# Boxes may overhang the image by this many pixels before they count as out of bounds
# (exported annotations often round up by a fraction of a pixel).
BOUNDS_TOLERANCE = 1.0


@dataclass
class Problem:
    severity: Literal["error", "warning"]
    message: str


def _image_problem(path: Path, width: object = None, height: object = None) -> str | None:
    """Why the file cannot serve as this image entry (unreadable, or not ``width`` x ``height`` when
    they are given), or None if it is fine."""
    if not path.is_file():
        return f"file {path} not found"
    try:
        with Image.open(path) as img:
            img.verify()  # the file structure (PNG checksums); it checks nothing in a JPEG
        with Image.open(path) as img:
            size = img.size
            img.load()  # decodes every pixel: a truncated JPEG fails here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return f"cannot read {path} ({err})"
    return None if width is None and height is None else size_mismatch(path, width, height, size)


def _bbox_problem(bbox: object, width: object, height: object) -> str | None:
    """What is wrong with a COCO [x, y, w, h] box in a (width x height) image, or None."""
    if not is_box(bbox) or not all(math.isfinite(v) for v in bbox):
        return f"bbox {bbox!r} is not four finite numbers [x, y, w, h]"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return f"degenerate bbox {list(bbox)} (width and height must be > 0)"
    if not isinstance(width, (int, float)) or not isinstance(height, (int, float)):
        return None  # the image entry's own problem is reported once, with the image
    tol = BOUNDS_TOLERANCE
    if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        return f"bbox {list(bbox)} lies outside the {width}x{height} image"
    return None


def check_dataset(ann_file: str | Path, images_root: str | Path | None = None) -> list[Problem]:
    """Check a COCO json and its images, or a YOLO dataset (its ``data.yaml`` or the folder holding
    it: see :func:`check_yolo`); returns every problem found (empty when clean).

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
    root = Path(images_root) if images_root is not None else path.parent
    problems: list[Problem] = []

    def error(message: str) -> None:
        problems.append(Problem("error", message))

    if not data["images"]:
        error(f"{path}: no images; add entries to 'images'")
    category_ids = Counter(c["id"] for c in data["categories"] if isinstance(c, dict) and "id" in c)
    if sum(category_ids.values()) < len(data["categories"]):
        error(f"{path}: every category must be an object with an 'id'")
    for cid, n in category_ids.items():
        if n > 1:
            error(f"{path}: category id {cid} is used by {n} categories")

    images: dict[object, dict] = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            error(f"{path}: image #{i} needs an 'id' and a 'file_name'")
            continue
        where = f"image id {img['id']} ({img['file_name']})"
        if img["id"] in images:
            error(f"{where}: duplicate image id")
            continue
        images[img["id"]] = img
        if "width" not in img or "height" not in img:
            error(f"{where}: missing 'width'/'height'")
        found = _image_problem(root / img["file_name"], img.get("width"), img.get("height"))
        if found:
            error(f"{where}: {found}")

    annotated: set[object] = set()
    seen_ids: set[object] = set()
    boxes = 0  # valid, non-crowd boxes of known images
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            error(f"{path}: annotation #{i} is not a JSON object")
            continue
        img = images.get(ann.get("image_id"))
        where = f"annotation id {ann.get('id', f'#{i}')} (image id {ann.get('image_id')}" + (
            f", {img['file_name']})" if img else ")")
        if "id" not in ann:
            error(f"{where}: missing 'id'")
        elif ann["id"] in seen_ids:
            error(f"{where}: duplicate annotation id")
        seen_ids.add(ann.get("id"))
        if img is None:
            error(f"{where}: image id not in 'images'")
        else:
            annotated.add(ann["image_id"])
        if ann.get("category_id") not in category_ids:
            error(f"{where}: unknown category id {ann.get('category_id')}")
        size = (img.get("width"), img.get("height")) if img else (None, None)
        found = _bbox_problem(ann.get("bbox"), *size)
        if found:
            error(f"{where}: {found}")
        elif img is not None and not ann.get("iscrowd", 0):
            boxes += 1

    if images and not boxes:  # training refuses it: one error, not a warning per image
        why = "its annotations are all crowd or invalid" if data["annotations"] else "'annotations' is empty"
        error(f"{path}: no boxes ({why}); training on it would learn only background and every metric on it "
              "would be n/a")
        return problems
    for img_id, img in images.items():
        if img_id not in annotated:
            problems.append(Problem("warning", f"image id {img_id} ({img['file_name']}): no annotations"))
    return problems


def check_yolo(yaml_path: str | Path) -> list[Problem]:
    """Check every split (train, val, test) of a YOLO dataset; returns every problem found.

    Errors: a split entry without images, unreadable (fully decoded) images, label lines that are
    not numbers, name no class of 'names', have coordinates outside [0, 1] or an empty box; a train
    or val split without a single box (naming the folder where its labels were looked for).
    Warnings: images without a label file (one counted line per split), a test split without boxes.
    A missing or malformed yaml raises SparsedetError.
    """
    yaml_path = Path(yaml_path)
    problems: list[Problem] = []
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
                problems.append(Problem("error", f"{where}: {found}"))
            label = label_path(path)
            if not label.is_file():
                unlabelled.append(path)
                continue
            lines, count = _label_problems(label, classes)
            problems += [Problem("error", line) for line in lines]
            boxes += count
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
    return problems


def _label_problems(path: Path, classes: dict[int, str]) -> tuple[list[str], int]:
    """What is wrong with the lines of a YOLO label file, and how many boxes of known classes it holds."""
    problems, boxes = [], 0
    text = path.read_bytes().decode("utf-8", errors="replace")  # odd bytes fail as a non-numeric line
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        values = parse_label_line(line)
        if values is None:
            problems.append(f"{where}: not `class cx cy w h` (finite numbers, optionally followed by polygon "
                            f"points): {line.strip()[:80]!r}")
            continue
        if values[0] != int(values[0]) or int(values[0]) not in classes:
            problems.append(f"{where}: class {line.split()[0]} is not a class index in 'names' "
                            f"(0..{max(classes)})")
            continue
        boxes += 1
        found = coordinate_problem(values)
        if found is None and is_polygon(values):
            xs, ys = values[1::2], values[2::2]
            found = "degenerate polygon (no width or height)" if max(xs) <= min(xs) or max(ys) <= min(ys) else None
        elif found is None and (values[3] <= 0 or values[4] <= 0):
            found = f"degenerate box w={values[3]:g} h={values[4]:g} (both must be > 0)"
        if found:
            problems.append(f"{where}: {found}")
    return problems, boxes


def format_problems(problems: list[Problem], limit: int | None = 100) -> str:
    """One line per problem (errors first, at most ``limit`` lines), then a count line."""
    ordered = sorted(problems, key=lambda p: p.severity != "error")
    shown = ordered if limit is None else ordered[:limit]
    lines = [f"{p.severity}: {p.message}" for p in shown]
    if len(shown) < len(ordered):
        lines.append(f"... and {len(ordered) - len(shown)} more")
    errors = sum(p.severity == "error" for p in problems)
    lines.append(f"{errors} error(s), {len(problems) - errors} warning(s)")
    return "\n".join(lines)
