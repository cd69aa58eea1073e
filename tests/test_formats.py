"""Dataset formats are one registered class each (data/formats.py): a made-up CSV format, declared
here alone, is opened, checked and trained from like the built-in COCO and YOLO ones, and a
plug-in's format is found once the plug-ins load."""
from pathlib import Path

import pytest
from PIL import Image

from sparsedet.config import Config
from sparsedet.data import formats
from sparsedet.data.check import check_dataset
from sparsedet.data.coco import CocoDetection
from sparsedet.data.datasets import make_datasets
from sparsedet.data.formats import DataReport, DatasetFormat, Problem, open_detection_dataset, register_format
from sparsedet.errors import SparsedetError


class CsvFormat(DatasetFormat):
    """A folder with boxes.csv: one ``file,x,y,w,h,class`` line per box, images beside it."""

    noun = "a boxes.csv folder"
    folder_files = ("boxes.csv",)

    def find(self, path: Path) -> Path | None:
        return path / "boxes.csv" if (path / "boxes.csv").is_file() else None

    def open(self, file, split, images_root, transforms):
        rows = [line.split(",") for line in file.read_text().split()]
        names = sorted({r[0] for r in rows})
        classes = sorted({r[5] for r in rows})
        coco = {"images": [{"id": i + 1, "file_name": n, "width": 32, "height": 32} for i, n in enumerate(names)],
                "annotations": [{"id": k + 1, "image_id": names.index(r[0]) + 1, "category_id": classes.index(r[5]),
                                 "bbox": [float(v) for v in r[1:5]]} for k, r in enumerate(rows)],
                "categories": [{"id": i, "name": c} for i, c in enumerate(classes)]}
        return CocoDetection(coco, file.parent, transforms, source=str(file))

    def why_no_boxes(self, dataset) -> str:
        return "boxes.csv lists none"

    def check(self, file, images_root) -> DataReport:
        return DataReport([Problem("warning", f"{file}: not checked")], 1, 1, 1)


@pytest.fixture
def csv_folder(tmp_path) -> Path:
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    (tmp_path / "boxes.csv").write_text("a.png,4,4,10,12,cat\na.png,20,2,8,8,dog\n")
    return tmp_path


def test_a_format_is_one_registered_class(csv_folder, monkeypatch):
    with pytest.raises(SparsedetError, match="is a folder without data.yaml or data.yml; pass a COCO json file or "
                                             r"a YOLO dataset yaml \(or its folder\); a kind from a third-party"):
        open_detection_dataset(csv_folder, "train")
    monkeypatch.setattr(formats, "FORMATS", dict(formats.FORMATS))
    register_format("csv")(CsvFormat)
    dataset = open_detection_dataset(csv_folder, "train")
    assert (len(dataset), dataset.num_boxes, dataset.classes) == (1, 2, ["cat", "dog"])
    assert check_dataset(csv_folder).problems[0].message.endswith("boxes.csv: not checked")
    config = Config()
    config.data.train = str(csv_folder)
    _, train_set, val_set = make_datasets(config)
    assert train_set.source == str(csv_folder / "boxes.csv") and val_set is None
    (csv_folder / "boxes.csv").write_text("a.png,4,4,0,0,cat\n")  # no area: dropped
    with pytest.warns(UserWarning, match="degenerate"), pytest.raises(SparsedetError, match="boxes.csv has no "
                                                                     "boxes: boxes.csv lists none. Training on it"):
        open_detection_dataset(csv_folder, "train")
    with pytest.raises(SparsedetError, match="already CsvFormat"):
        register_format("csv")(type("Other", (CsvFormat,), {}))


def test_a_plugins_format_is_found_when_no_built_in_one_claims_a_path(csv_folder, monkeypatch):
    monkeypatch.setattr(formats, "FORMATS", dict(formats.FORMATS))
    loaded = []

    def load_plugins():  # what importing an installed plug-in's module does
        loaded.append(True)
        register_format("csv")(CsvFormat)

    monkeypatch.setattr(formats, "load_plugins", load_plugins)
    assert formats.find_format(csv_folder) == (formats.FORMATS["csv"], csv_folder / "boxes.csv") and loaded
