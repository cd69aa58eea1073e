"""YOLO-format (Ultralytics-style ``data.yaml``) datasets, read as COCO dicts, and COCO -> YOLO
export; the YOLO dataset format (``YoloFormat``: opening and ``sparsedet check-data``).

A YOLO label file holds one object per line: ``class cx cy w h`` with the box centre and
size normalised to [0, 1] by the image width/height, or ``class x1 y1 x2 y2 ...`` (a
normalised polygon, whose bounding box is used). :func:`read_yolo` returns COCO boxes
``[x, y, w, h]`` in pixels with category ids equal to the YOLO class indices (0-based).
"""
from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import yaml
from PIL import Image

from ..errors import SparsedetError
from .check import image_problem
from .coco import CocoDetection
from .coco_json import clipped_xyxy, read_coco_json, validate_coco
from .formats import DataReport, DatasetFormat, Problem, register_format

IMAGE_SUFFIXES = {".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"}
YAML_NAMES = ("data.yaml", "data.yml")
SPLIT_KEYS = ("train", "val", "test")


def find_yolo_yaml(path: str | Path) -> Path | None:
    """The dataset yaml of ``path`` (a ``.yaml``/``.yml`` file, or a folder holding ``data.yaml``
    or ``data.yml``), or None if ``path`` is not a YOLO dataset. A yaml path is returned even if
    missing, so that :func:`read_yolo` reports it."""
    path = Path(path)
    if path.suffix.lower() in (".yaml", ".yml") and not path.is_dir():
        return path
    if path.is_dir():
        return next((path / name for name in YAML_NAMES if (path / name).is_file()), None)
    return None


def yolo_splits(path: str | Path) -> list[str]:
    """The split keys (train, val, test) a YOLO dataset's yaml defines; [] if ``path`` is not one."""
    yaml_path = find_yolo_yaml(path)
    if yaml_path is None:
        return []
    data = _load_yaml(yaml_path)
    return [key for key in SPLIT_KEYS if data.get(key)]


def _load_yaml(yaml_path: Path) -> dict:
    if not yaml_path.is_file():
        raise SparsedetError(f"dataset yaml not found: {yaml_path}. Pass an existing YOLO data.yaml "
                             "(or the folder holding it).")
    try:
        data = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise SparsedetError(f"{yaml_path} is not valid YAML{at}: {getattr(err, 'problem', None) or err}. "
                             "Fix the file there.") from None
    except UnicodeDecodeError as err:
        raise SparsedetError(f"{yaml_path} is not UTF-8 text ({err.reason}); save it as UTF-8.") from None
    if not isinstance(data, dict):
        raise SparsedetError(f"{yaml_path} must hold a YAML mapping with 'names' and split keys "
                             f"('train', 'val', ...), not a {type(data).__name__}.")
    return data


def _names(data: dict, yaml_path: Path) -> dict[int, str]:
    """Class index -> name from ``names`` (list or {index: name}); checks ``nc`` if present."""
    names = data.get("names")
    if names is None:
        raise SparsedetError(f"{yaml_path} lacks 'names'; add the class names, e.g. "
                             "`names: [cat, dog]` or `names: {0: cat, 1: dog}`.")
    if isinstance(names, list):
        names = dict(enumerate(names))
    if not isinstance(names, dict) or not names or not all(
            isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in names):
        raise SparsedetError(f"'names' in {yaml_path} must be a non-empty list of class names or a "
                             "mapping {class index (integer >= 0): name}.")
    nc = data.get("nc")
    if nc is not None and nc != len(names):
        raise SparsedetError(f"{yaml_path} says nc: {nc} but 'names' lists {len(names)} classes; "
                             "make them agree (or drop 'nc').")
    return {k: str(v) for k, v in sorted(names.items())}


def _split_images(entry: object, root: Path, yaml_path: Path, split: str) -> list[Path]:
    """Image paths of one split entry: a folder (searched recursively), a .txt list of image paths
    (relative lines are relative to the .txt's folder), or a list of those."""
    entries = entry if isinstance(entry, list) else [entry]
    found: list[Path] = []
    for item in entries:
        if not isinstance(item, str):
            raise SparsedetError(f"'{split}' in {yaml_path} must be a folder, a .txt file or a list "
                                 f"of those, not {item!r}.")
        place = root / item
        if place.is_dir():
            found += [p for p in place.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        elif place.is_file() and place.suffix.lower() == ".txt":
            lines = [line.strip() for line in place.read_text(encoding="utf-8").splitlines()]
            found += [place.parent / line for line in lines if line]
        else:
            raise SparsedetError(f"'{split}: {item}' in {yaml_path} points to {place}, which is not an "
                                 "existing folder or .txt list of images. Fix the entry or its 'path' "
                                 f"(the dataset root, now {root}).")
    return sorted({Path(os.path.normpath(p.absolute())) for p in found})


def label_path(image_path: Path) -> Path:
    """Label file of an image: the last ``images`` path component becomes ``labels``, suffix ``.txt``
    (next to the image if the path has no ``images`` component)."""
    parts = list(image_path.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def label_folder(image_paths: list[Path]) -> Path:
    """The folder where the label files of ``image_paths`` are looked for (their common parent)."""
    return Path(os.path.commonpath([label_path(p).parent for p in image_paths]))


def parse_label_line(line: str) -> list[float] | None:
    """The numbers of a label line, or None unless it is `class cx cy w h` (finite numbers,
    optionally followed by more polygon points)."""
    try:
        values = [float(v) for v in line.split()]
    except ValueError:
        return None
    return values if len(values) >= 5 and all(abs(v) < float("inf") for v in values) else None


def is_polygon(values: list[float]) -> bool:
    """Whether a parsed label line is ``class x1 y1 x2 y2 ...`` (at least three points)."""
    return len(values) >= 7 and len(values) % 2 == 1


def coordinate_problem(values: list[float]) -> str | None:
    """Why a parsed label line's coordinates are not fractions in [0, 1] (``"w=1.4 is outside
    [0, 1]"``), or None."""
    if is_polygon(values):
        named = [(f"{'xy'[k % 2]}{k // 2 + 1}", v) for k, v in enumerate(values[1:])]
    else:
        named = list(zip(("cx", "cy", "w", "h"), values[1:5]))
    bad = [f"{name}={v:g}" for name, v in named if not 0.0 <= v <= 1.0]
    if not bad:
        return None
    return (f"{', '.join(bad[:3])} {'is' if len(bad) == 1 else 'are'} outside [0, 1] (coordinates are "
            "fractions of the image width and height)")


def _read_labels(path: Path, classes: dict[int, str], width: int, height: int
                 ) -> tuple[list[tuple[int, list[float], float]], list[str]]:
    """(class, COCO [x, y, w, h] pixels clipped to the image, area) per line of a label file, and
    one ``"FILE line N: ..."`` per line whose coordinates lie outside [0, 1]."""
    if not path.is_file():
        return [], []
    objects, outside = [], []
    text = path.read_bytes().decode("utf-8", errors="replace")  # odd bytes fail as a non-numeric line
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        values = parse_label_line(line)
        if values is None:
            raise SparsedetError(f"{path} line {number} is not `class cx cy w h` (finite numbers, "
                                 f"optionally followed by polygon points): {line.strip()[:80]!r}. "
                                 "Fix or delete the line.")
        cls = values[0]
        if cls != int(cls) or int(cls) not in classes:
            raise SparsedetError(f"{path} line {number} has class {line.split()[0]}, which is not a class "
                                 f"index in 'names' (0..{max(classes)}). Fix the label or add the class.")
        problem = coordinate_problem(values)
        if problem:
            outside.append(f"{path} line {number}: {problem}")
        if is_polygon(values):  # polygon x1 y1 x2 y2 ...
            xs, ys = values[1::2], values[2::2]
            x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
            area = 0.5 * abs(sum(xs[i - 1] * ys[i] - xs[i] * ys[i - 1] for i in range(len(xs))))
        else:  # cx cy w h, any extra columns ignored
            cx, cy, w, h = values[1:5]
            x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
            area = None
        x1, x2 = (min(max(v * width, 0.0), width) for v in (x1, x2))
        y1, y2 = (min(max(v * height, 0.0), height) for v in (y1, y2))
        box = [x1, y1, max(x2 - x1, 0.0), max(y2 - y1, 0.0)]
        box_area = box[2] * box[3]
        objects.append((int(cls), box, box_area if area is None else min(area * width * height, box_area)))
    return objects, outside


def split_images(yaml_path: str | Path, split: str) -> tuple[dict[int, str], Path, list[Path]]:
    """Class index -> name, the dataset root and the sorted image paths of one split of a YOLO dataset."""
    yaml_path = Path(yaml_path)
    data = _load_yaml(yaml_path)
    classes = _names(data, yaml_path)
    root = Path(data["path"]) if isinstance(data.get("path"), str) else Path()
    root = Path(os.path.normpath((yaml_path.parent / root).absolute()))
    if data.get(split) is None:
        present = [k for k in SPLIT_KEYS if data.get(k) is not None]
        raise SparsedetError(f"{yaml_path} has no '{split}' entry (it has: {', '.join(present) or 'none'}). "
                             f"Add `{split}: images/{split}` or pick another split.")
    paths = _split_images(data[split], root, yaml_path, split)
    if not paths:
        raise SparsedetError(f"no images found for '{split}: {data[split]}' of {yaml_path}; expected "
                             f"files with suffix {', '.join(sorted(IMAGE_SUFFIXES))}.")
    return classes, root, paths


def read_yolo(yaml_path: str | Path, split: str) -> tuple[dict, Path]:
    """One split of a YOLO dataset as a COCO dict, and the root its ``file_name`` entries are relative to.

    Images are sorted by path with ids 1..N; sizes come from the image headers (images that
    cannot be opened are skipped with one warning). Boxes are COCO ``[x, y, w, h]`` pixels,
    clipped to the image (one counted warning for coordinates outside [0, 1]); category ids are
    the YOLO class indices. When most but not all images have no label file, one warning counts them.
    """
    yaml_path = Path(yaml_path)
    classes, root, paths = split_images(yaml_path, split)
    if not all(p.is_relative_to(root) for p in paths):
        root = Path(os.path.commonpath([root, *paths]))
    images, annotations, unreadable, outside, unlabelled = [], [], [], [], []
    for path in paths:
        try:
            with Image.open(path) as img:
                width, height = img.size
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            unreadable.append(path)
            continue
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": path.relative_to(root).as_posix(),
                       "width": width, "height": height})
        label = label_path(path)
        if not label.is_file():
            unlabelled.append(path)
        objects, problems = _read_labels(label, classes, width, height)
        outside += problems
        for cls, bbox, area in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cls,
                                "bbox": bbox, "area": area, "iscrowd": 0})
    if unreadable:
        shown = ", ".join(str(p) for p in unreadable[:3]) + (", ..." if len(unreadable) > 3 else "")
        warnings.warn(f"{yaml_path} ({split}): skipped {len(unreadable)} image(s) that cannot be opened: "
                      f"{shown}", stacklevel=2)
    if outside:
        warnings.warn(f"{yaml_path} ({split}): {len(outside)} label line(s) have coordinates outside [0, 1], e.g. "
                      f"{outside[0]}; their boxes were clipped to the image. `sparsedet check-data --ann "
                      f"{yaml_path}` lists them.", stacklevel=2)
    if len(images) < 2 * len(unlabelled) < 2 * len(images):  # all of them: no boxes, an error for training
        warnings.warn(f"{len(unlabelled)} of {len(images)} images have no label file in {label_folder(unlabelled)} "
                      f"({yaml_path}, {split}); they train as background. Labels belong in a 'labels' folder "
                      "beside 'images' (an image without objects gets an empty .txt).", stacklevel=2)
    categories = [{"id": i, "name": name} for i, name in classes.items()]
    return {"images": images, "annotations": annotations, "categories": categories}, root


def write_yolo(coco_json_path: str | Path, out_dir: str | Path) -> Path:
    """Export a COCO json (file names relative to its folder) as split ``<json stem>`` of a YOLO
    dataset in ``out_dir``: images copied to ``images/<split>/``, ``labels/<split>/*.txt`` with
    ``class cx cy w h`` normalised to [0, 1] (classes = categories in increasing id order), and
    ``data.yaml`` merged with any existing one. Crowd and degenerate boxes are left out (one warning);
    a json whose entries do not fit together (``validate_coco``) is refused. Returns the yaml path."""
    json_path, out_dir = Path(coco_json_path), Path(out_dir)
    coco = validate_coco(read_coco_json(json_path), json_path, image_keys=("id", "file_name"),
                         category_keys=("id", "name"))
    split = json_path.stem
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    names = [str(c["name"]) for c in categories]
    label_of = {c["id"]: i for i, c in enumerate(categories)}
    image_dir, label_dir = out_dir / "images" / split, out_dir / "labels" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    lines: dict[object, list[str]] = {img["id"]: [] for img in coco["images"]}
    sizes: dict[object, tuple[int, int]] = {}
    targets: dict[object, Path] = {}
    stems: set[str] = set()
    for img in coco["images"]:
        source = json_path.parent / img["file_name"]
        target = image_dir / Path(img["file_name"]).name
        if target.stem in stems:  # same base name from another folder: labels would clash
            target = image_dir / f"{img['id']}_{target.name}"
        stems.add(target.stem)
        try:
            with Image.open(source) as opened:
                sizes[img["id"]] = opened.size
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise SparsedetError(f"cannot read image {source} listed in {json_path} ({err}). "
                                 "Fix the file or its entry.") from None
        shutil.copyfile(source, target)
        targets[img["id"]] = target
    skipped = 0
    for ann in coco["annotations"]:
        size = sizes[ann["image_id"]]
        box = None if ann.get("iscrowd", 0) else clipped_xyxy(ann["bbox"], *size)
        if box is None:
            skipped += 1
            continue
        (w, h), (x1, y1, x2, y2) = size, box
        lines[ann["image_id"]].append(f"{label_of[ann['category_id']]} {(x1 + x2) / 2 / w:.6f} "
                                      f"{(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}")
    for image_id, target in targets.items():
        text = "".join(line + "\n" for line in lines[image_id])
        (label_dir / target.name).with_suffix(".txt").write_text(text)
    if skipped:
        warnings.warn(f"{json_path}: left out {skipped} crowd or degenerate annotation(s) "
                      "in the YOLO export.", stacklevel=2)

    yaml_path = out_dir / "data.yaml"
    data = _load_yaml(yaml_path) if yaml_path.is_file() else {}
    if "names" in data and list(_names(data, yaml_path).values()) != names:
        raise SparsedetError(f"{yaml_path} already lists names {list(_names(data, yaml_path).values())}, "
                             f"but {json_path} has {names}; export splits with one category table "
                             "into one folder.")
    data.pop("nc", None)
    splits = {k: v for k, v in data.items() if k not in ("path", "names")}
    splits[split] = f"images/{split}"
    yaml_path.write_text(yaml.safe_dump({"path": ".", **splits, "names": names}, sort_keys=False))
    return yaml_path


@register_format("yolo")
class YoloFormat(DatasetFormat):
    """A YOLO dataset: its data.yaml (any .yaml or .yml file) or the folder holding one, with
    ``images/<split>/`` beside ``labels/<split>/``."""

    noun = "a YOLO dataset yaml (or its folder)"
    folder_files = YAML_NAMES

    def find(self, path: Path) -> Path | None:
        return find_yolo_yaml(path)

    def splits(self, file: Path) -> list[str]:
        return yolo_splits(file)

    def open(self, file: Path, split: str, images_root: Path | None, transforms: Callable | None) -> CocoDetection:
        if images_root is not None:  # stacklevel: the caller of open_detection_dataset
            warnings.warn(f"images_root {images_root} is ignored for the YOLO dataset {file}", stacklevel=3)
        coco, root = read_yolo(file, split)
        return CocoDetection(coco, root, transforms, source=f"{file} ({split})")

    def why_no_boxes(self, dataset: CocoDetection) -> str:
        images = [dataset.images_root / img["file_name"] for img in dataset.coco["images"]]
        labelled = sum(label_path(p).is_file() for p in images)
        where = label_folder(images)
        if not labelled:
            return (f"none of its {len(images)} images has a label file in {where} (images/<split>/a.jpg is "
                    "labelled by labels/<split>/a.txt: is the labels folder misnamed or elsewhere?)")
        annotations = dataset.coco["annotations"]
        return (f"its {labelled} label file(s) in {where} hold " +
                (f"only degenerate boxes ({len(annotations)})" if annotations else "no lines"))

    def check(self, file: Path, images_root: Path | None) -> DataReport:
        if images_root is not None:
            raise SparsedetError(f"--images does not apply to the YOLO dataset {file}: its yaml locates "
                                 "the images. Leave it out.")
        return check_yolo(file)


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
            found = image_problem(path)
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
