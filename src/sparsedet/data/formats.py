"""Dataset formats: which format a path names, and what opens and checks a dataset of it.

A format is one module: a :class:`DatasetFormat` subclass registered with ``@register_format(name)``
that says how to recognise its paths (``find``), open one split as a ``DetectionDataset``
(``open``), explain a split without boxes (``why_no_boxes``) and list every problem for
``sparsedet check-data`` (``check``). ``coco.py`` and ``yolo.py`` are the built-in ones (imported
by the package's ``__init__``); a third-party package registers its own in the module its
``sparsedet.plugins`` entry point names, loaded when no built-in format claims a path.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import SparsedetError
from ..plugins import load_plugins, not_found_hint
from .protocol import DetectionDataset


@dataclass
class Problem:
    severity: Literal["error", "warning"]
    message: str
    kind: str = ""  # what every problem of this sort shares, the summary of repeated ones ("" = one of a kind)


@dataclass
class DataReport:
    """What a format's ``check`` found: the problems and what the dataset holds (images checked,
    valid non-crowd boxes, classes)."""

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


class DatasetFormat:
    """One dataset format. ``find`` gets every path a user gives as data (``--train``, ``--val``,
    ``check-data --ann``) and claims the ones of this format."""

    noun = ""                           # how messages name a dataset of this format: "a COCO json file"
    folder_files: tuple[str, ...] = ()  # the files that make a folder a dataset of this format
    fallback = False                    # claims what no other format claims (asked last)

    def find(self, path: Path) -> Path | None:
        """The file that holds the dataset ``path`` names (a folder's data.yaml, or ``path`` itself),
        or None when ``path`` is not of this format."""
        raise NotImplementedError

    def splits(self, file: Path) -> list[str]:
        """The splits ``file`` defines itself (a YOLO yaml: train, val, test); [] for one set."""
        return []

    def open(self, file: Path, split: str, images_root: Path | None,
             transforms: Callable | None) -> DetectionDataset:
        """One split of the dataset in ``file``, its images under ``images_root`` where the format
        does not locate them itself, each sample through ``transforms``."""
        raise NotImplementedError

    def why_no_boxes(self, dataset: DetectionDataset) -> str:
        """Why ``dataset`` (opened by this format) holds no box: the likely mistake, in a few words."""
        raise NotImplementedError

    def check(self, file: Path, images_root: Path | None) -> DataReport:
        """Every problem of the dataset in ``file`` (``sparsedet check-data``); a missing or unreadable
        file raises SparsedetError."""
        raise NotImplementedError


FORMATS: dict[str, DatasetFormat] = {}


def register_format(name: str):
    """Class decorator: the dataset format ``name`` is (an instance of) the decorated class."""
    def add(cls: type[DatasetFormat]) -> type[DatasetFormat]:
        if name in FORMATS and type(FORMATS[name]) is not cls:
            raise SparsedetError(f"dataset format {name!r} is already {type(FORMATS[name]).__name__}")
        FORMATS[name] = cls()
        return cls
    return add


def find_format(path: str | Path) -> tuple[DatasetFormat, Path]:
    """The format of the dataset ``path`` names and the file that holds it. The installed plugins
    load when no format but the fallback (a COCO json) claims it; a folder that no format claims
    is a SparsedetError that says what to pass."""
    path = Path(path)
    found = _claim(path, fallback=False)
    if found is None:
        load_plugins()  # a third-party format registers when its plugin module is imported
        found = _claim(path, fallback=False) or _claim(path, fallback=True)
    if found is None:
        marks = [name for fmt in FORMATS.values() for name in fmt.folder_files]
        nouns = [fmt.noun for fmt in FORMATS.values()]
        raise SparsedetError(f"{path} is a folder without {' or '.join(marks)}; pass {' or '.join(nouns)}"
                             f"{not_found_hint()}.")
    return found


def _claim(path: Path, fallback: bool) -> tuple[DatasetFormat, Path] | None:
    for fmt in FORMATS.values():
        if fmt.fallback == fallback and (file := fmt.find(path)) is not None:
            return fmt, file
    return None


def dataset_splits(path: str | Path) -> list[str]:
    """The splits the file ``path`` names defines itself (a YOLO yaml's train, val, test); [] for one set."""
    fmt, file = find_format(path)
    return fmt.splits(file)


def open_detection_dataset(path: str | Path, split: str, images_root: str | Path | None = None,
                           transforms: Callable | None = None) -> DetectionDataset:
    """Split ``split`` of the dataset ``path`` names (a COCO json holds one set: ``split`` unused),
    in the format that claims it. ``images_root`` applies to COCO only: a YOLO yaml locates its
    images. A split without a single box is a SparsedetError: training on it learns only
    background and evaluating on it defines no metric."""
    fmt, file = find_format(path)
    dataset = fmt.open(file, split, None if images_root is None else Path(images_root), transforms)
    if dataset.num_boxes == 0:
        raise SparsedetError(f"{dataset.source} has no boxes: {fmt.why_no_boxes(dataset)}. "
                             "Training on it would learn only background, and every metric on it would be n/a.")
    return dataset


def check_dataset(path: str | Path, images_root: str | Path | None = None) -> DataReport:
    """Every problem of the dataset ``path`` names, in the format that claims it (``sparsedet
    check-data``), and what it holds; a missing file or malformed json or yaml raises SparsedetError.
    ``images_root``: where a COCO json's images are (default its folder); a YOLO yaml refuses it."""
    fmt, file = find_format(path)
    return fmt.check(file, None if images_root is None else Path(images_root))
