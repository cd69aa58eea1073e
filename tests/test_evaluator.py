import contextlib
import copy
import io
import json

import numpy as np
import pytest
import torch

from sparsedet.engine.evaluator import (
    STAT_NAMES,
    Evaluator,
    evaluate_coco,
    format_metrics,
    load_results,
    save_results,
)
from sparsedet.errors import SparsedetError

CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 12, "name": "bird"},
              {"id": 20, "name": "never_annotated"}]
SIDE_RANGES = ((6, 30), (34, 94), (100, 300))  # small (< 32^2), medium, large


def random_case(seed: int = 0) -> tuple[dict, list[dict]]:
    """Ground truth over 20 images with every area range, and noisy detections for it."""
    rng = np.random.default_rng(seed)
    images = [{"id": 100 + i, "file_name": f"{i}.jpg", "height": 480, "width": 640} for i in range(20)]
    annotations, detections = [], []
    for img in images[:-1]:  # the last image has no objects
        for _ in range(rng.integers(0, 7)):
            lo, hi = SIDE_RANGES[rng.integers(0, 3)]
            w, h = rng.uniform(lo, hi, size=2)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            cat = int(rng.choice([3, 7, 12], p=[0.5, 0.3, 0.2]))
            annotations.append({"id": len(annotations) + 1, "image_id": img["id"], "category_id": cat,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    annotations[5]["iscrowd"] = 1  # one crowd region: matched detections on it are ignored
    no_detections = {images[3]["id"], images[8]["id"]}
    for ann in annotations:
        if ann["image_id"] in no_detections or rng.random() < 0.15:  # missed objects
            continue
        x, y, w, h = ann["bbox"]
        for _ in range(1 + int(rng.random() < 0.2)):  # some duplicates
            jx, jy, jw, jh = rng.normal(0, 0.08, size=4) * [w, h, w, h]
            cat = ann["category_id"] if rng.random() < 0.9 else 7
            detections.append({"image_id": ann["image_id"], "category_id": cat, "file_name": "extra key",
                               "bbox": [x + jx, y + jy, max(w + jw, 1.0), max(h + jh, 1.0)],
                               "score": float(rng.random())})
    for _ in range(40):  # false positives, some on the category without ground truth
        img = images[rng.integers(0, len(images))]
        if img["id"] in no_detections:
            continue
        w, h = rng.uniform(8, 200, size=2)
        detections.append({"image_id": img["id"], "category_id": int(rng.choice([3, 7, 12, 20])),
                           "bbox": [rng.uniform(0, 400), rng.uniform(0, 250), w, h],
                           "score": float(rng.random() * 0.6)})
    return {"images": images, "annotations": annotations, "categories": CATEGORIES}, detections


def pycocotools_stats(gt: dict, detections: list[dict], cat_ids: list[int] | None = None) -> np.ndarray:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        evaluation = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(detections)), "bbox")
        if cat_ids is not None:
            evaluation.params.catIds = cat_ids
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation.stats


def test_matches_pycocotools_and_leaves_inputs_alone(capsys):
    pytest.importorskip("pycocotools")
    gt, detections = random_case()
    gt_before, dets_before = copy.deepcopy(gt), copy.deepcopy(detections)

    metrics = evaluate_coco(gt, detections)

    assert capsys.readouterr().out == ""
    assert gt == gt_before and detections == dets_before
    reference = pycocotools_stats(gt, detections)
    ours = np.array([metrics[name] for name in STAT_NAMES])
    np.testing.assert_allclose(ours, reference, atol=1e-6, rtol=0)
    assert 0.2 < metrics["AP"] < 0.95 and min(ours) >= 0  # a realistic, fully defined case
    for cat in CATEGORIES:
        assert metrics["per_class"][cat["name"]] == pytest.approx(
            pycocotools_stats(gt, detections, [cat["id"]])[0], abs=1e-6)
    assert metrics["per_class"]["never_annotated"] == -1


def test_ground_truth_from_path_with_zero_based_annotation_ids(tmp_path):
    gt, detections = random_case(seed=1)
    expected = evaluate_coco(gt, detections)
    for ann in gt["annotations"]:
        ann["id"] -= 1  # id 0 means "unmatched" inside COCO evaluators; must not change the numbers
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    assert evaluate_coco(path, detections) == expected


def test_perfect_and_hand_computed_cases():
    gt = {"images": [{"id": 1, "height": 100, "width": 100}, {"id": 2, "height": 100, "width": 100}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400,
                           "iscrowd": 0},
                          {"id": 2, "image_id": 2, "category_id": 2, "bbox": [0, 0, 50, 60], "area": 3000,
                           "iscrowd": 0}],
          "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in gt["annotations"]]
    metrics = evaluate_coco(gt, perfect)
    for name in ("AP", "AP50", "AP75", "APs", "APm", "AR1", "AR10", "AR100", "ARs", "ARm"):
        assert metrics[name] == pytest.approx(1.0)
    assert metrics["APl"] == -1 and metrics["ARl"] == -1  # no large objects: undefined, not 0
    assert metrics["per_class"] == {"a": pytest.approx(1.0), "b": pytest.approx(1.0)}

    # Class a: a higher-scored false positive before the hit gives precision 1/2 at every recall
    # level (AP 0.5), and its top-1 detection is the miss (AR1 0). Class b is not detected (AP 0).
    wrong_place = {"image_id": 1, "category_id": 1, "bbox": [60, 60, 20, 20], "score": 0.95}
    metrics = evaluate_coco(gt, [wrong_place, perfect[0]])
    assert metrics["per_class"] == {"a": pytest.approx(0.5), "b": 0}
    assert metrics["AP"] == pytest.approx(0.25) and metrics["AR100"] == pytest.approx(0.5)
    assert metrics["AR1"] == 0
    assert "per_class" not in evaluate_coco(gt, perfect, per_class=False)


def test_evaluator_maps_labels_and_boxes():
    gt = {"images": [{"id": 4, "height": 100, "width": 200}],
          "annotations": [{"id": 1, "image_id": 4, "category_id": 9, "bbox": [10, 20, 40, 60], "area": 2400,
                           "iscrowd": 0},
                          {"id": 2, "image_id": 4, "category_id": 5, "bbox": [100, 0, 50, 25], "area": 1250,
                           "iscrowd": 0}],
          "categories": [{"id": 5, "name": "five"}, {"id": 9, "name": "nine"}]}
    evaluator = Evaluator(gt, category_ids=[5, 9])
    detections = {"boxes": torch.tensor([[10.0, 20.0, 50.0, 80.0], [100.0, 0.0, 150.0, 25.0]]),
                  "scores": torch.tensor([0.75, 0.5]), "labels": torch.tensor([1, 0])}
    evaluator.update([4], [{"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.zeros(1).long()}])
    evaluator.update([4], [detections])  # the same image again replaces, never doubles
    assert evaluator.results() == [
        {"image_id": 4, "category_id": 9, "bbox": [10.0, 20.0, 40.0, 60.0], "score": 0.75},
        {"image_id": 4, "category_id": 5, "bbox": [100.0, 0.0, 50.0, 25.0], "score": 0.5},
    ]
    assert evaluator.compute()["AP"] == pytest.approx(1.0)

    with pytest.raises(SparsedetError, match="label 2 .* outside the model's 2 classes"):
        evaluator.update([4], [{**detections, "labels": torch.tensor([2, 0])}])
    with pytest.raises(SparsedetError, match="image_id 5 is not in the ground truth"):
        evaluator.update([5], [detections])
    with pytest.raises(SparsedetError, match=r"category ids \[6\] are not in the ground truth"):
        Evaluator(gt, category_ids=[5, 6])


@pytest.mark.parametrize("change, words", [
    ({"category_id": 99}, r"category_id 99 \(in 1 detection\) is not in the ground truth \(known ids: \[3, 7, 12, "
                          r"20\]\); the model's classes must match the dataset's"),
    ({"image_id": 5}, "image_id 5, which is not in the ground truth"),
    ({"bbox": [1.0, 2.0, float("nan"), 4.0]}, "non-finite"),
    ({"score": float("inf")}, "non-finite"),
    ({"bbox": [1.0, 2.0, 3.0]}, r"must be \[x, y, width, height\]"),
    ({"bbox": [10.0, 10.0, 5.0, -1.0]}, "width, height >= 0"),
])
def test_bad_detections(change, words):
    gt, detections = random_case()
    detections[3] = {**detections[3], **change}
    with pytest.raises(SparsedetError, match=words):
        evaluate_coco(gt, detections)


def test_missing_key_and_results_files(tmp_path):
    gt, detections = random_case()
    del detections[2]["score"]
    with pytest.raises(SparsedetError, match="detection 2 is missing 'score'"):
        evaluate_coco(gt, detections)
    with pytest.raises(SparsedetError, match="results file .*nope.json not found"):
        load_results(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("[{'image_id': 1")
    with pytest.raises(SparsedetError, match="bad.json is not valid JSON"):
        load_results(tmp_path / "bad.json")
    (tmp_path / "dict.json").write_text('{"annotations": []}')
    with pytest.raises(SparsedetError, match="must hold a JSON list of detections"):
        load_results(tmp_path / "dict.json")
    with pytest.raises(SparsedetError, match="ground-truth file .*missing.json not found"):
        evaluate_coco(tmp_path / "missing.json", [])
    del gt["annotations"][4]["bbox"]
    with pytest.raises(SparsedetError, match="annotation id 5 in ground truth lacks 'bbox'"):
        evaluate_coco(gt, [])

    gt, _ = random_case()
    gt["annotations"][4]["image_id"] = 999
    with pytest.raises(SparsedetError, match=r"annotation id 5 in ground truth refers to image id 999, which is not "
                                             r"in 'images'"):
        evaluate_coco(gt, [])
    gt, _ = random_case()
    gt["annotations"][4]["bbox"] = [1, 2, 3]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    with pytest.raises(SparsedetError, match=r"annotation id 5 in ground-truth file .*gt\.json has bbox \[1, 2, 3\]"):
        evaluate_coco(tmp_path / "gt.json", [])

    _, detections = random_case()
    save_results(detections, tmp_path / "out" / "results.json")
    assert load_results(tmp_path / "out" / "results.json") == detections
    bom = tmp_path / "bom.json"  # a BOM, as some Windows tools write
    bom.write_bytes(b"\xef\xbb\xbf" + (tmp_path / "out" / "results.json").read_bytes())
    assert load_results(bom) == detections


def test_empty_detections_and_table():
    gt, _ = random_case()
    metrics = evaluate_coco(gt, [])
    assert all(metrics[name] == 0 for name in STAT_NAMES)
    assert metrics["per_class"] == {"cat": 0, "dog": 0, "bird": 0, "never_annotated": -1}

    table = format_metrics(metrics).splitlines()
    assert table[1].split()[:2] == ["AP", "0.000"] and table[12].split()[0] == "ARl"
    assert table[-1].split() == ["never_annotated", "n/a"]
    assert all(row[8:13] == "0.000" for row in table[1:13])  # one aligned value column
