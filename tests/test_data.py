import json
import random
import warnings

import pytest
import torch
from PIL import Image

from sparsedet.data.batch import Batch, collate
from sparsedet.data.check import check_dataset, format_report
from sparsedet.data.coco import CocoDetection, load_image, open_detection_dataset
from sparsedet.data.synthetic import write_synthetic
from sparsedet.data.transforms import (RandomHorizontalFlip, RandomSizeCrop, build_transforms, crop_region,
                                       resized_shape)
from sparsedet.errors import SparsedetError

CATEGORIES = [{"id": 10, "name": "ten"}, {"id": 3, "name": "three"}]  # unsorted, non-contiguous


def write_dataset(root, annotations, images=None, categories=CATEGORIES):
    """Two 40x20 solid images (+ any extra entries) and the given annotations."""
    for name, colour in (("a.png", (255, 0, 128)), ("b.png", (0, 255, 0))):
        Image.new("RGB", (40, 20), colour).save(root / name)
    images = images or [{"id": 1, "file_name": "a.png", "width": 40, "height": 20},
                        {"id": 2, "file_name": "b.png", "width": 40, "height": 20}]
    path = root / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def ann(ann_id, image_id, category_id, bbox, **extra):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, **extra}


def sample(image, boxes, labels):
    return image, {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)}


# synthetic


def test_synthetic_is_deterministic_and_valid(tmp_path):
    first = write_synthetic(tmp_path / "a", n_train=6, n_val=2, size=96, seed=3)
    write_synthetic(tmp_path / "b", n_train=6, n_val=2, size=96, seed=3)
    write_synthetic(tmp_path / "c", n_train=6, n_val=2, size=96, seed=4)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 2 + 6 + 2
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert (tmp_path / "a" / "train.json").read_bytes() != (tmp_path / "c" / "train.json").read_bytes()

    data = json.loads((tmp_path / "a" / "train.json").read_text())
    assert [c["id"] for c in data["categories"]] == [1, 2, 3, 5, 7]
    sizes = {img["id"]: (img["width"], img["height"]) for img in data["images"]}
    assert first["num_annotations"]["train"] == len(data["annotations"]) >= 6
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        width, height = sizes[a["image_id"]]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= width and y + h <= height
        assert a["iscrowd"] == 0 and 0 < a["area"] <= w * h
    for img in data["images"]:
        assert Image.open(tmp_path / "a" / img["file_name"]).size == (img["width"], img["height"])
    assert check_dataset(first["train"]).problems == [] and check_dataset(first["val"]).problems == []

    ds = CocoDetection(first["train"])
    assert ds.category_ids == [1, 2, 3, 5, 7] and ds.classes == first["classes"]
    labels = torch.cat([ds[i][1]["labels"] for i in range(len(ds))])
    by_id = {c["id"]: i for i, c in enumerate(data["categories"])}
    assert labels.tolist() == [by_id[a["category_id"]] for a in data["annotations"]]


# CocoDetection


def test_coco_targets_are_exact(tmp_path):
    path = write_dataset(tmp_path, [
        ann(1, 1, 3, [4, 2, 10, 6]),
        ann(2, 1, 10, [30, 10, 20, 20]),  # overhangs: clipped to [30, 10, 40, 20]
        ann(3, 1, 3, [0, 0, 40, 20], iscrowd=1),  # crowd: not a training target
    ])
    ds = CocoDetection(path)
    assert ds.classes == ["three", "ten"] and ds.category_ids == [3, 10] and ds.image_ids == [1, 2]
    assert ds.num_crowd == 1 and ds.num_degenerate == 0 and len(ds) == 2
    image, target = ds[0]
    assert image.shape == (3, 20, 40) and image.dtype == torch.float32
    assert torch.allclose(image[:, 5, 5], torch.tensor([1.0, 0.0, 128 / 255]))
    assert target["labels"].tolist() == [0, 1]
    expected = [[9 / 40, 5 / 20, 10 / 40, 6 / 20], [35 / 40, 15 / 20, 10 / 40, 10 / 20]]
    assert torch.allclose(target["boxes"], torch.tensor(expected))
    assert target["image_id"] == 1
    assert target["orig_size"].tolist() == [20, 40] and target["size"].tolist() == [20, 40]
    _, empty = ds[1]  # no annotations is valid
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    assert empty["labels"].dtype == torch.long


def test_coco_resize_keeps_normalised_boxes(tmp_path):
    path = write_dataset(tmp_path, [ann(1, 1, 3, [4, 2, 10, 6])])
    ds = CocoDetection(path, transforms=build_transforms(False, scales=[10], max_size=100))
    image, target = ds[0]
    assert image.shape == (3, 10, 20) and target["size"].tolist() == [10, 20]
    assert target["orig_size"].tolist() == [20, 40]
    assert torch.allclose(target["boxes"], torch.tensor([[9 / 40, 5 / 20, 10 / 40, 6 / 20]]))


def test_degenerate_boxes_dropped_with_one_warning(tmp_path):
    path = write_dataset(tmp_path, [ann(1, 1, 3, [4, 2, 10, 6]), ann(7, 1, 3, [5, 5, 0, 4]),
                                    ann(8, 2, 10, [50, 5, 4, 4]), ann(9, 2, 10, [1, 1, float("nan"), 2])])
    with pytest.warns(UserWarning) as record:
        ds = CocoDetection(path)
    assert len(record) == 1
    assert "3 degenerate" in str(record[0].message) and "annotation id 7" in str(record[0].message)
    assert ds.num_degenerate == 3
    assert ds[0][1]["labels"].tolist() == [0] and len(ds[1][1]["labels"]) == 0


def test_unreadable_images_give_none_and_a_warning(tmp_path):
    path = write_dataset(tmp_path, [], images=[
        {"id": 1, "file_name": "a.png", "width": 40, "height": 20},
        {"id": 2, "file_name": "broken.png", "width": 40, "height": 20},
        {"id": 3, "file_name": "missing.png", "width": 40, "height": 20}])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    ds = CocoDetection(path)
    for index, name in ((1, "broken.png"), (2, "missing.png")):
        with pytest.warns(UserWarning, match=name):
            assert ds[index] is None
    with pytest.raises(SparsedetError, match="broken.png"):
        load_image(tmp_path / "broken.png")
    batch, targets, dropped = collate([ds[0], None])
    assert dropped == 1 and len(targets) == 1 and batch.images.shape == (1, 3, 20, 40)


@pytest.mark.parametrize("content, match", [
    (None, "annotation file .* not found"),
    ('{"images": [],\n "annotations": [,]}', "line 2, column 18"),
    ('{"images": [], "annotations": []}', "'categories'"),
    ('{"images": [], "annotations": [], "categories": []}', "contains no images"),
])
def test_bad_json_errors(tmp_path, content, match):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SparsedetError, match=match) as info:
        CocoDetection(path)
    assert str(path) in str(info.value)


def test_json_encodings_and_undecodable_bytes(tmp_path):
    path = write_dataset(tmp_path, [ann(5, 1, 3, [1, 1, 2, 2])])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # a BOM, as some Windows editors save
    assert CocoDetection(path).num_boxes == 1
    path.write_bytes(path.read_bytes().replace(b"ten", b"t\xe9n"))  # Latin-1, not UTF-8
    with pytest.raises(SparsedetError, match=r"ann\.json is not valid JSON text .*save it as UTF-8"):
        CocoDetection(path)


def test_a_bbox_that_is_not_four_numbers_names_the_annotation(tmp_path):
    for bbox in ([1, 2, 3], "1 2 3 4", [1, 2, "3", 4]):
        with pytest.raises(SparsedetError, match=r"annotation id 5 in .*ann\.json has bbox .*; a COCO bbox is four "
                                                 r"numbers \[x, y, width, height\]"):
            CocoDetection(write_dataset(tmp_path, [ann(5, 1, 3, bbox)]))


def test_unknown_ids_name_the_annotation(tmp_path):
    with pytest.raises(SparsedetError, match=r"annotation id 5 .* category id 4,"):
        CocoDetection(write_dataset(tmp_path, [ann(5, 1, 4, [1, 1, 2, 2])]))
    with pytest.raises(SparsedetError, match=r"annotation id 6 .* image id 9,"):
        CocoDetection(write_dataset(tmp_path, [ann(6, 9, 3, [1, 1, 2, 2])]))


# transforms


def test_flip_moves_boxes_and_pixels():
    image = Image.new("RGB", (40, 20))
    image.putpixel((0, 0), (255, 255, 255))
    out, target = RandomHorizontalFlip(p=1.0)(*sample(image, [[4, 2, 14, 8]], [1]))
    assert target["boxes"].tolist() == [[26, 2, 36, 8]] and target["labels"].tolist() == [1]
    assert out.getpixel((39, 0)) == (255, 255, 255) and out.getpixel((0, 0)) == (0, 0, 0)


def test_crop_clips_and_removes_vanished_boxes():
    image = Image.new("RGB", (40, 20))
    out, target = crop_region(*sample(image, [[0, 0, 5, 5], [20, 5, 30, 15]], [0, 1]),
                              top=4, left=10, height=10, width=20)
    assert out.size == (20, 10)
    assert target["boxes"].tolist() == [[10, 1, 20, 10]] and target["labels"].tolist() == [1]
    random.seed(0)
    for _ in range(20):
        out, target = RandomSizeCrop(8, 30)(*sample(image, [[0, 0, 5, 5], [20, 5, 30, 15]], [0, 1]))
        assert 8 <= out.width <= 30 and 8 <= out.height <= 20
        assert len(target["boxes"]) == len(target["labels"])
        assert (target["boxes"][:, 2:] <= torch.tensor([out.width, out.height])).all()


def test_resize_rule_and_seeded_train_transforms():
    assert resized_shape(480, 640, 800, 1333) == (800, 1066)
    assert resized_shape(100, 1000, 800, 1333) == (133, 1330)
    assert resized_shape(640, 480, 800, None) == (1066, 800)
    transforms = build_transforms(True, scales=[16, 24, 32], max_size=64, crop_scales=[20, 30],
                                  crop_range=(12, 24))
    image = Image.new("RGB", (40, 20), (10, 20, 30))

    def run(seed):
        random.seed(seed)
        return [transforms(*sample(image, [[4, 2, 14, 8], [20, 5, 30, 15]], [0, 1])) for _ in range(8)]

    first, second = run(0), run(0)
    for (img_a, tgt_a), (img_b, tgt_b) in zip(first, second):
        assert torch.equal(img_a, img_b) and torch.equal(tgt_a["boxes"], tgt_b["boxes"])
        assert img_a.min() >= 0 and img_a.max() <= 1
        assert ((tgt_a["boxes"] >= 0) & (tgt_a["boxes"] <= 1)).all()
    assert len({tuple(img.shape) for img, _ in first}) > 1  # scales really vary


# batch


def test_batch_pads_and_masks():
    a, b = torch.rand(3, 4, 5), torch.rand(3, 6, 3)
    batch = Batch.from_images([a, b], size_divisor=4).to("cpu")
    assert batch.images.shape == (2, 3, 8, 8) and batch.mask.shape == (2, 8, 8)
    assert torch.equal(batch.images[0, :, :4, :5], a) and torch.equal(batch.images[1, :, :6, :3], b)
    assert batch.images[0, :, 4:].abs().sum() == 0 and batch.images[0, :, :, 5:].abs().sum() == 0
    assert batch.mask.sum(dim=(1, 2)).tolist() == [64 - 20, 64 - 18]
    assert not batch.mask[0, :4, :5].any() and batch.mask[0, 4:].all() and batch.mask[0, :, 5:].all()
    assert Batch.from_images([a, b]).images.shape == (2, 3, 6, 5)


def test_collate_drops_none():
    targets = [{"image_id": 1}, {"image_id": 2}]
    samples = [(torch.zeros(3, 2, 2), targets[0]), None, (torch.ones(3, 3, 1), targets[1])]
    batch, out, dropped = collate(samples)
    assert dropped == 1 and out == targets and batch.images.shape == (2, 3, 3, 2)
    assert collate([None, None]) == (None, [], 2)


# check_dataset


def test_check_dataset_finds_planted_problems(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"garbage")
    images = [{"id": 1, "file_name": "a.png", "width": 40, "height": 20},
              {"id": 2, "file_name": "b.png", "width": 40, "height": 20},
              {"id": 3, "file_name": "missing.png", "width": 40, "height": 20},
              {"id": 4, "file_name": "broken.png", "width": 40, "height": 20},
              {"id": 5, "file_name": "a.png", "width": 50, "height": 20}]
    path = write_dataset(tmp_path, [
        ann(1, 1, 3, [1, 1, 5, 5]),
        ann(1, 1, 3, [2, 2, 5, 5]),  # duplicate id
        ann(2, 1, 3, [3, 3, 0, 5]),  # degenerate
        ann(3, 1, 10, [30, 10, 20, 5]),  # out of bounds
        ann(4, 1, 99, [1, 1, 5, 5]),  # unknown category
        ann(5, 42, 3, [1, 1, 5, 5]),  # unknown image
        ann(6, 3, 3, [1, 1, 5, 5]), ann(7, 4, 3, [1, 1, 5, 5]), ann(8, 5, 3, [1, 1, 5, 5]),
    ], images=images)
    report = check_dataset(path)
    problems = report.problems
    errors = [p.message for p in problems if p.severity == "error"]
    warnings_ = [p.message for p in problems if p.severity == "warning"]
    expected = ["annotation id 1 (image id 1, a.png): duplicate annotation id",
                "annotation id 2 (image id 1, a.png): degenerate bbox",
                "annotation id 3 (image id 1, a.png): bbox [30, 10, 20, 5] lies outside",
                "annotation id 4 (image id 1, a.png): unknown category id 99",
                "annotation id 5 (image id 42): image id not in 'images'",
                "image id 3 (missing.png): file", "image id 4 (broken.png): cannot read",
                "image id 5 (a.png): json says 50x20"]
    for start in expected:
        assert sum(m.startswith(start) for m in errors) == 1, (start, errors)
    assert len(errors) == len(expected)
    assert warnings_ == ["image id 2 (b.png): no annotations"]
    text = format_report(report, limit=3)  # each problem of its own kind: one line each
    assert text.splitlines()[0].startswith("error: ") and "... and 6 more kinds of problem" in text
    assert text.endswith("5 images, 5 boxes, 2 classes; 8 error(s), 1 warning(s)")
    with pytest.raises(SparsedetError, match="not found"):
        check_dataset(tmp_path / "nope.json")


def test_check_dataset_summarises_a_repeated_problem(tmp_path):
    images = [{"id": i, "file_name": f"gone{i}.png", "width": 40, "height": 20} for i in range(1, 9)]
    path = write_dataset(tmp_path, [ann(i, i, 3, [1, 1, 5, 5]) for i in range(1, 9)], images=images)
    lines = format_report(check_dataset(path)).splitlines()
    assert lines[0] == "error: 8 image files not found, e.g."
    assert lines[1:6] == [f"  image id {i} (gone{i}.png): file {tmp_path / f'gone{i}.png'} not found"
                          for i in range(1, 6)]
    assert lines[6:] == ["  ... and 3 more", "8 images, 8 boxes, 2 classes; 8 error(s), 0 warning(s)"]


def test_no_stray_warnings_on_clean_data(tmp_path):
    path = write_dataset(tmp_path, [ann(1, 1, 3, [4, 2, 10, 6])])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = CocoDetection(path)
        assert ds[0] is not None and ds[1] is not None


def test_check_dataset_decodes_a_truncated_jpeg(tmp_path):
    noise = (torch.rand(32, 48, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    Image.fromarray(noise).save(tmp_path / "whole.jpg", quality=90)
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:len(data) // 2])  # the header survives: it opens and verifies
    images = [{"id": 1, "file_name": "whole.jpg", "width": 48, "height": 32},
              {"id": 2, "file_name": "cut.jpg", "width": 48, "height": 32}]
    path = write_dataset(tmp_path, [ann(1, 1, 3, [1, 1, 5, 5]), ann(2, 2, 3, [1, 1, 5, 5])], images=images)
    problems = check_dataset(path).problems
    assert len(problems) == 1 and problems[0].severity == "error", problems
    assert problems[0].message.startswith(f"image id 2 (cut.jpg): cannot read {tmp_path / 'cut.jpg'}")
    assert "truncated" in problems[0].message


def test_a_coco_file_without_boxes_is_an_error(tmp_path):
    path = write_dataset(tmp_path, [])
    CocoDetection(path)  # as a plain reader it is fine; training and evaluation refuse it
    with pytest.raises(SparsedetError, match=r"ann\.json has no boxes: its 'annotations' list is empty\. "
                                             r"Training on it would learn only background"):
        open_detection_dataset(path, "train")
    problems = check_dataset(path).problems  # one error, not a warning per image
    assert [(p.severity, p.message.split(";")[0]) for p in problems] == [
        ("error", f"{path}: no boxes ('annotations' is empty)")]
    with pytest.raises(SparsedetError, match=r"its 1 annotation\(s\) are all crowd regions or degenerate"):
        open_detection_dataset(write_dataset(tmp_path, [ann(1, 1, 3, [1, 1, 5, 5], iscrowd=1)]), "val")
    assert open_detection_dataset(write_dataset(tmp_path, [ann(1, 2, 3, [1, 1, 5, 5])]), "train").num_boxes == 1


def test_a_size_mismatch_is_marked_in_the_words_of_check_data(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "width": 50, "height": 20},
              {"id": 2, "file_name": "b.png", "width": 40, "height": 20}]
    path = write_dataset(tmp_path, [ann(1, 1, 3, [42, 2, 6, 6]), ann(2, 2, 3, [1, 1, 5, 5])], images=images)
    ds = CocoDetection(path)
    mismatch = ds[0][1]["size_mismatch"]
    assert mismatch == f"image id 1 (a.png): json says 50x20 (w x h) but {tmp_path / 'a.png'} is 40x20"
    assert len(ds[0][1]["boxes"]) == 0 and "size_mismatch" not in ds[1][1]  # the box lay outside the file
    assert [p.message for p in check_dataset(path).problems if p.severity == "error"] == [mismatch]


def test_images_in_an_images_folder_beside_the_json_are_found(tmp_path):
    """supervision's COCO export: ``annotations.json`` with the files in ``images/`` beside it."""
    (tmp_path / "images").mkdir()
    path = write_dataset(tmp_path / "images", [ann(1, 1, 3, [1, 1, 5, 5]), ann(2, 2, 10, [2, 2, 5, 5])])
    path = path.rename(tmp_path / "annotations.json")
    ds = CocoDetection(path)
    assert ds.images_root == tmp_path / "images" and ds[0] is not None
    assert check_dataset(path).problems == []


def test_images_elsewhere_are_named_in_the_error(tmp_path):
    """A json in annotations/ with its images in a folder beside it (COCO's own layout)."""
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val").mkdir()
    path = write_dataset(tmp_path / "val", [ann(1, 1, 3, [1, 1, 5, 5])]).rename(tmp_path / "annotations" / "ann.json")
    with pytest.raises(SparsedetError, match=f"under {tmp_path / 'annotations'}: .*; a.png is in {tmp_path / 'val'}: "
                                             f"pass --images {tmp_path / 'val'}"):
        CocoDetection(path).require_readable()
    errors = [p.message for p in check_dataset(path).problems if p.severity == "error"]
    assert errors[-1] == (f"{path}: no image file is under {tmp_path / 'annotations'}; a.png is in "
                          f"{tmp_path / 'val'}: pass --images {tmp_path / 'val'}")


def test_require_readable_names_the_image_root(tmp_path):
    folder = tmp_path / "data"  # the search for the images also looks beside the json's folder
    folder.mkdir()
    path = write_dataset(folder, [ann(1, 1, 3, [1, 1, 5, 5])])
    CocoDetection(path).require_readable()
    with pytest.raises(SparsedetError, match=rf"no image of .*ann\.json can be read under .*elsewhere: all 2 "
                                             rf"failed .*; a.png is in {folder}: pass --images {folder}\.$"):
        CocoDetection(path, tmp_path / "elsewhere").require_readable()
    (folder / "a.png").unlink()  # found nowhere: the error says what --images is
    with pytest.raises(SparsedetError, match=r"pass the folder its file_name entries are relative to as --images"):
        CocoDetection(path, tmp_path / "elsewhere").require_readable()
