"""Dataset checks behind ``sparsedet check-data``: list every problem instead of stopping at the first."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image

from .coco import read_coco_json

# Boxes may overhang the image by this many pixels before they count as out of bounds
# (exported annotations often round up by a fraction of a pixel).
BOUNDS_TOLERANCE = 1.0


@dataclass
class Problem:
    severity: Literal["error", "warning"]
    message: str


def _image_problem(path: Path, width: object, height: object) -> str | None:
    """Why the file cannot serve as this image entry, or None if it is fine."""
    if not path.is_file():
        return f"file {path} not found"
    try:
        with Image.open(path) as img:
            size = img.size
            img.verify()  # checks the file structure without decoding all pixels
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return f"cannot read {path} ({err})"
    if (width, height) != size:
        return f"json says {width}x{height} (w x h) but {path} is {size[0]}x{size[1]}"
    return None


def _bbox_problem(bbox: object, width: object, height: object) -> str | None:
    """What is wrong with a COCO [x, y, w, h] box in a (width x height) image, or None."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(
            isinstance(v, (int, float)) and math.isfinite(v) for v in bbox):
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
    """Check a COCO json and its images; returns every problem found (empty when clean).

    Errors: unreadable/missing images or size mismatches, malformed entries, duplicate
    ids, annotations with unknown image or category ids, degenerate or out-of-bounds
    boxes. Warnings: images without annotations. A missing file or malformed json
    raises SparsedetError. ``images_root`` defaults to the json's folder.
    """
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

    for img_id, img in images.items():
        if img_id not in annotated:
            problems.append(Problem("warning", f"image id {img_id} ({img['file_name']}): no annotations"))
    return problems


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
