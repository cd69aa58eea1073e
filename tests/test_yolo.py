import warnings

import pytest
import torch
import yaml
from PIL import Image

from sparsedet.cli import main
from sparsedet.data.check import check_dataset
from sparsedet.data.coco import CocoDetection, open_detection_dataset
from sparsedet.data.synthetic import write_synthetic
from sparsedet.data.transforms import build_transforms
from sparsedet.data.yolo import find_yolo_yaml, label_path, read_yolo
from sparsedet.errors import SparsedetError


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return root, write_synthetic(root, n_train=6, n_val=3, size=64, seed=1, format="yolo")


def test_yolo_export_gives_the_same_targets_as_coco(synthetic):
    root, summary = synthetic
    assert summary["yolo"] == str(root / "yolo" / "data.yaml")
    data = yaml.safe_load((root / "yolo" / "data.yaml").read_text())
    assert data == {"path": ".", "train": "images/train", "val": "images/val", "names": summary["classes"]}
    tf = build_transforms(False, [48], 80)
    for split in ("train", "val"):
        coco = CocoDetection(summary[split], transforms=tf)
        yolo = open_detection_dataset(summary["yolo"], split, transforms=tf)
        assert len(yolo) == len(coco) == summary["num_images"][split]
        assert yolo.classes == coco.classes == summary["classes"]
        for i in range(len(coco)):
            (image_c, target_c), (image_y, target_y) = coco[i], yolo[i]
            assert torch.equal(image_c, image_y)
            assert torch.equal(target_c["labels"], target_y["labels"])
            assert torch.allclose(target_c["boxes"], target_y["boxes"], atol=1e-5, rtol=0)
            assert torch.equal(target_c["orig_size"], target_y["orig_size"])
            assert torch.equal(target_c["size"], target_y["size"])


def test_default_synthetic_output_is_unchanged_by_the_yolo_copy(synthetic, tmp_path):
    root, _ = synthetic
    plain = write_synthetic(tmp_path, n_train=6, n_val=3, size=64, seed=1)
    assert "yolo" not in plain and not (tmp_path / "yolo").exists()
    files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for rel in files:
        assert (root / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel


def write_hand_dataset(tmp_path):
    """Two images under a root that itself sits below an ``images`` folder, plus one broken file."""
    root = tmp_path / "images" / "ds"  # only the LAST `images` component maps to `labels`
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    Image.new("RGB", (40, 20), (255, 0, 0)).save(root / "images" / "train" / "a.png")
    Image.new("RGB", (30, 50), (0, 0, 255)).save(root / "images" / "train" / "b.png")  # no label file
    (root / "images" / "train" / "c.png").write_bytes(b"not a png")
    (root / "labels" / "train" / "a.txt").write_text(
        "1 0.5 0.5 0.5 0.5\n"
        "\n"
        "0 0.1 0.2 0.2 0.4\n"
        "0 0.95 0.5 0.2 0.2\n"  # overhangs the right edge: clipped
        "1 0.1 0.1 0.5 0.1 0.3 0.6\n")  # triangle polygon
    (root / "data.yaml").write_text("train: images/train\ntest: lists/test.txt\nnames:\n  0: cat\n  1: dog\n")
    (root / "lists").mkdir()
    (root / "lists" / "test.txt").write_text("../images/train/b.png\n\n../images/train/a.png\n")
    return root


def test_read_yolo_hand_computed(tmp_path):
    root = write_hand_dataset(tmp_path)
    with pytest.warns(UserWarning, match=r"skipped 1 image.*c\.png"):
        coco, images_root = read_yolo(root / "data.yaml", "train")
    assert images_root == root
    assert coco["categories"] == [{"id": 0, "name": "cat"}, {"id": 1, "name": "dog"}]
    assert coco["images"] == [{"id": 1, "file_name": "images/train/a.png", "width": 40, "height": 20},
                              {"id": 2, "file_name": "images/train/b.png", "width": 30, "height": 50}]
    got = [(a["id"], a["image_id"], a["category_id"], a["iscrowd"]) for a in coco["annotations"]]
    assert got == [(1, 1, 1, 0), (2, 1, 0, 0), (3, 1, 0, 0), (4, 1, 1, 0)]
    expected = [([10, 5, 20, 10], 200), ([0, 0, 8, 8], 64), ([34, 8, 6, 4], 24), ([4, 2, 16, 10], 80)]
    for a, (bbox, area) in zip(coco["annotations"], expected):
        assert a["bbox"] == pytest.approx(bbox) and a["area"] == pytest.approx(area)

    # A .txt list (lines relative to its folder) and a yaml elsewhere with a relative `path`.
    (root / "cfg").mkdir()
    (root / "cfg" / "other.yml").write_text("path: ..\ntest: [lists/test.txt]\nnames: [cat, dog]\nnc: 2\n")
    for yaml_path in (root / "data.yaml", root / "cfg" / "other.yml"):
        test, test_root = read_yolo(yaml_path, "test")
        assert test_root == root and test["images"] == coco["images"]
        assert test["annotations"] == coco["annotations"]

    with pytest.warns(UserWarning, match="c.png"):
        ds = open_detection_dataset(root, "train")
    assert ds.classes == ["cat", "dog"] and len(ds) == 2
    image, target = ds[0]
    assert target["labels"].tolist() == [1, 0, 0, 1] and target["orig_size"].tolist() == [20, 40]
    assert ds[1][1]["boxes"].shape == (0, 4)


def test_label_path_replaces_the_last_images_component(tmp_path):
    assert label_path(tmp_path / "images" / "x" / "images" / "val" / "a.jpg") == \
        tmp_path / "images" / "x" / "labels" / "val" / "a.txt"
    assert label_path(tmp_path / "pics" / "a.jpg") == tmp_path / "pics" / "a.txt"


@pytest.mark.parametrize("case", ["missing yaml", "malformed yaml", "missing names", "missing split",
                                  "missing folder", "class out of range", "non-numeric", "nc mismatch"])
def test_yolo_errors_name_the_file(tmp_path, case):
    root = write_hand_dataset(tmp_path)
    yaml_path, split, culprit = root / "data.yaml", "train", "data.yaml"
    label = root / "labels" / "train" / "a.txt"
    if case == "missing yaml":
        yaml_path, culprit = root / "nope.yaml", "nope.yaml"
    elif case == "malformed yaml":
        yaml_path.write_text("names: [cat, dog\ntrain: images/train\n")
    elif case == "missing names":
        yaml_path.write_text("train: images/train\n")
    elif case == "missing split":
        split = "val"
    elif case == "missing folder":
        yaml_path.write_text("train: images/missing\nnames: [cat, dog]\n")
    elif case == "class out of range":
        label.write_text("0 0.5 0.5 0.1 0.1\n2 0.5 0.5 0.1 0.1\n")
        culprit = "a.txt line 2"
    elif case == "non-numeric":
        label.write_text("0 0.5 0.5 0.1 0.1\n\n0 0.5 abc 0.1 0.1\n")
        culprit = "a.txt line 3"
    elif case == "nc mismatch":
        yaml_path.write_text("train: images/train\nnc: 3\nnames: [cat, dog]\n")
    with warnings.catch_warnings(), pytest.raises(SparsedetError, match=culprit.replace(".", r"\.")) as err:
        warnings.simplefilter("ignore")
        read_yolo(yaml_path, split)
    if case == "missing folder":
        assert "images/missing" in str(err.value)


def test_open_detection_dataset_picks_the_format(synthetic):
    root, summary = synthetic
    coco = open_detection_dataset(summary["val"], "ignored")
    assert coco.ann_file == root / "val.json"
    assert find_yolo_yaml(root / "val.json") is None and find_yolo_yaml(root) is None
    for path in (root / "yolo", summary["yolo"]):
        assert find_yolo_yaml(path) == root / "yolo" / "data.yaml"
        yolo = open_detection_dataset(path, "val")
        assert yolo.ann_file is None and "data.yaml" in yolo.source and len(yolo) == len(coco)
    with pytest.raises(SparsedetError, match="without data.yaml"):
        open_detection_dataset(root / "images", "val")


def test_coco_dataset_from_a_dict_names_its_source(tmp_path):
    empty = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}
    with pytest.raises(SparsedetError, match="my-source contains no images"):
        CocoDetection(empty, tmp_path, source="my-source")
    with pytest.raises(ValueError, match="images_root"):
        CocoDetection(empty)


def write_split(root, split, labels):
    """A 40x20 PNG per entry of ``labels`` (file name -> label text, None: no label file) in images/<split>."""
    (root / "images" / split).mkdir(parents=True)
    (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    for name, text in labels.items():
        Image.new("RGB", (40, 20), (200, 40, 40)).save(root / "images" / split / name)
        if text is not None:
            (root / "labels" / split / name).with_suffix(".txt").write_text(text)


def test_check_data_reports_yolo_problems(tmp_path, capsys):
    write_split(tmp_path, "train", {"a.png": "0 0.5 0.5 0.2 0.2\n1 0.5 0.5 1.4 0.2\n7 0.5 0.5 0.1 0.1\n"
                                             "0 0.5 x 0.1 0.1\n1 0.5 0.5 0 0.2\n",
                                    "b.png": None, "c.jpg": "0 0.5 0.5 0.2 0.2\n", "d.png": None})
    noise = (torch.rand(32, 48, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    Image.fromarray(noise).save(tmp_path / "images" / "train" / "c.jpg")
    data = (tmp_path / "images" / "train" / "c.jpg").read_bytes()
    (tmp_path / "images" / "train" / "c.jpg").write_bytes(data[:len(data) // 2])  # a truncated JPEG
    write_split(tmp_path, "val", {"e.png": "1 0.5 0.5 0.5 0.5\n"})
    (tmp_path / "data.yaml").write_text("train: images/train\nval: images/val\nnames: [cat, dog]\n")
    a = tmp_path / "labels" / "train" / "a.txt"
    problems = check_dataset(tmp_path).problems
    errors = [p.message for p in problems if p.severity == "error"]
    assert errors[:4] == [
        f"{a} line 2: w=1.4 is outside [0, 1] (coordinates are fractions of the image width and height)",
        f"{a} line 3: class 7 is not a class index in 'names' (0..1)",
        f"{a} line 4: not `class cx cy w h` (finite numbers, optionally followed by polygon points): '0 0.5 x 0.1 0.1'",
        f"{a} line 5: degenerate box w=0 h=0.2 (both must be > 0)"]
    assert len(errors) == 5 and "truncated" in errors[4]
    jpeg = tmp_path / "images" / "train" / "c.jpg"
    assert errors[4].startswith(f"{tmp_path / 'data.yaml'} (train): cannot read {jpeg}")
    assert [p.message for p in problems if p.severity == "warning"] == [
        f"{tmp_path / 'data.yaml'} (train): 2 of 4 images have no label file in {tmp_path / 'labels' / 'train'} "
        "(e.g. b.txt); they count as background (an image without objects gets an empty .txt)"]
    assert main(["check-data", "--ann", str(tmp_path / "data.yaml")]) == 1
    assert "w=1.4 is outside [0, 1]" in capsys.readouterr().out
    (tmp_path / "labels" / "val" / "e.txt").unlink()  # val without a single box: an error
    assert f"(val): no boxes: none of its 1 images has a label file in {tmp_path / 'labels' / 'val'}" in \
        [p.message for p in check_dataset(tmp_path).problems if p.severity == "error"][-1]


def test_training_reads_of_yolo_labels_name_their_problems(tmp_path):
    write_split(tmp_path, "train", {"a.png": "0 0.5 0.5 1.4 0.2\n0 0.5 0.5 0.2 0.2\n", "b.png": None, "c.png": None})
    (tmp_path / "data.yaml").write_text("train: images/train\nnames: [cat]\n")
    with pytest.warns(UserWarning) as record:
        ds = open_detection_dataset(tmp_path, "train")
    assert ds.num_boxes == 2
    messages = [str(w.message) for w in record]
    labels = tmp_path / "labels" / "train"
    assert len(messages) == 2, messages
    assert messages[0].startswith(f"{tmp_path / 'data.yaml'} (train): 1 label line(s) have coordinates outside "
                                  f"[0, 1], e.g. {labels / 'a.txt'} line 1: w=1.4 is outside [0, 1]")
    assert messages[1].startswith(f"2 of 3 images have no label file in {labels} ")

    (tmp_path / "labels").rename(tmp_path / "label")  # a misnamed folder: no boxes at all
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one error, no warnings before it
        with pytest.raises(SparsedetError, match=f"has no boxes: none of its 3 images has a label file in "
                                                 f"{labels}".replace(".", r"\.")):
            open_detection_dataset(tmp_path, "train")
    assert [p.message for p in check_dataset(tmp_path).problems if "no boxes" in p.message] == [
        f"{tmp_path / 'data.yaml'} (train): no boxes: none of its 3 images has a label file in {labels} (is the "
        "labels folder misnamed or elsewhere?)"]


def test_check_data_summarises_repeated_problems_and_counts_a_clean_dataset(tmp_path, capsys):
    # Seven lines of class 2 where 'names' lists two classes: one summary line and five examples.
    write_split(tmp_path, "train", {f"{i}.png": f"0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2 0.2\n2 0.5 0.5 0.1 0.1\n"
                                    for i in range(7)})
    (tmp_path / "data.yaml").write_text("train: images/train\nnames: [cat, dog]\n")
    assert main(["check-data", "--ann", str(tmp_path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("error: 7 label lines of a class not in 'names' (labels use 3 classes: 0, 1, 2; "
                        "'names' lists 2), e.g.")
    label = tmp_path / "labels" / "train" / "0.txt"
    assert lines[1] == f"  {label} line 3: class 2 is not a class index in 'names' (0..1)"
    assert lines[6:] == ["  ... and 2 more", "7 images, 14 boxes, 2 classes; 7 error(s), 0 warning(s)"]

    (tmp_path / "data.yaml").write_text("train: images/train\nnames: [cat, dog, bird]\n")
    assert main(["check-data", "--ann", str(tmp_path / "data.yaml")]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'data.yaml'}: no problems found: 7 images, 21 boxes, 3 classes\n"
