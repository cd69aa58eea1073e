"""`sparsedet eval --plots`: the confusion matrix and the precision-recall curves on hand-built
detections with known answers, and the figures the command writes."""
import json
import sys

import numpy as np
import pytest
from PIL import Image

from sparsedet import SparsedetError
from sparsedet.cli import main
from sparsedet.engine.confusion import confusion_from_coco
from sparsedet.engine.evaluator import evaluate_coco, precision_recall


def _ann(image_id, category_id, bbox, iscrowd=0):
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": iscrowd}


def _det(image_id, category_id, bbox, score):
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}


# Two classes, a (id 1) and b (id 2); boxes are [x, y, w, h] in pixels.
GT = {"images": [{"id": i, "width": 100, "height": 100} for i in (1, 2, 3)],
      "categories": [{"id": 2, "name": "b"}, {"id": 1, "name": "a"}],  # out of id order on purpose
      "annotations": [_ann(1, 1, [0, 0, 10, 10]), _ann(1, 2, [50, 50, 10, 10]),
                      _ann(2, 1, [0, 0, 10, 10]), _ann(2, 2, [0, 0, 10, 12]),
                      _ann(3, 1, [70, 70, 20, 20], iscrowd=1)]}
DETECTIONS = [
    _det(1, 1, [0, 0, 10, 10], 0.9),   # a on image 1's a: a correct detection
    _det(1, 2, [0, 0, 10, 10], 0.8),   # b on that same a box, already taken: a false positive
    _det(1, 1, [50, 50, 10, 10], 0.7),  # a on image 1's b: no a left for it, so a class confusion (a for b)
    _det(1, 2, [50, 50, 10, 10], 0.3),  # b on image 1's b, but scored below 0.5
    # a box overlapping image 2's a (IoU 100/110) and, more, its b (IoU 110/120): class-aware, it takes the a
    _det(2, 1, [0, 0, 10, 11], 0.95),
    _det(3, 2, [0, 0, 5, 5], 0.6),     # b where there is nothing (the crowd box is left out): a false positive
]


def test_confusion_matrix_of_a_hand_computed_case():
    matrix, classes = confusion_from_coco(GT, DETECTIONS, score_threshold=0.5)
    assert classes == ["a", "b"]  # categories in id order; row/column 2 is background
    # rows: predicted a, b, background; columns: true a, b, background
    np.testing.assert_array_equal(matrix, [[2, 1, 0],   # a: two correct, one on a true b
                                           [0, 0, 2],   # b: two false positives
                                           [0, 1, 0]])  # missed: image 2's b
    # At 0.2 the b on image 1's b counts. Same-class matches come first, so it takes that b although the
    # higher-scored a detection would have taken it as a confusion: that a becomes a false positive.
    matrix, _ = confusion_from_coco(GT, DETECTIONS, score_threshold=0.2)
    np.testing.assert_array_equal(matrix, [[2, 0, 1], [0, 1, 2], [0, 1, 0]])
    # Invariants: each true column sums to that class's (non-crowd) boxes, each predicted row to its detections.
    assert matrix[:, :2].sum(axis=0).tolist() == [2, 2]
    assert matrix[:2].sum(axis=1).tolist() == [3, 3]


def test_confusion_matrix_refuses_bad_input():
    with pytest.raises(SparsedetError, match=r"score threshold must lie in \[0, 1\], got 1.5"):
        confusion_from_coco(GT, DETECTIONS, score_threshold=1.5)
    with pytest.raises(SparsedetError, match="category_id 7 is not in the ground truth"):
        confusion_from_coco(GT, [_det(1, 7, [0, 0, 1, 1], 0.9)])


def test_precision_recall_curves_of_a_hand_computed_case():
    gt = {"images": [{"id": 1, "width": 100, "height": 100}],
          "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
          "annotations": [_ann(1, 1, [0, 0, 10, 10]), _ann(1, 1, [50, 50, 10, 10])]}
    # The first a exactly; the second at IoU 0.62: a match at IoU thresholds 0.50, 0.55, 0.60 only.
    detections = [_det(1, 1, [0, 0, 10, 10], 0.9), _det(1, 1, [50, 50, 10, 6.2], 0.8)]
    pr = precision_recall(gt, detections)
    assert pr.classes == ["a", "b"] and pr.precision.shape == (10, 101, 2)
    per_class, overall = pr.curves(0.5)
    np.testing.assert_allclose(per_class[0], np.ones(101))
    assert np.isnan(per_class[1]).all()  # b has no ground truth
    np.testing.assert_allclose(overall, per_class[0])
    per_class, overall = pr.curves(0.75)  # only the first matches: precision 1 up to recall 0.5, then 0
    np.testing.assert_allclose(per_class[0], (pr.recall <= 0.5).astype(float))
    # Averaged over the 10 thresholds: 1 up to recall 0.5, then 3/10; its mean is AP@[.50:.95].
    per_class, overall = pr.curves()
    np.testing.assert_allclose(per_class[0], np.where(pr.recall <= 0.5, 1.0, 0.3))
    assert per_class[0].mean() == pytest.approx((51 + 50 * 0.3) / 101)
    metrics = evaluate_coco(gt, detections)
    assert metrics["per_class"]["a"] == pytest.approx(per_class[0].mean())
    assert metrics["AP"] == pytest.approx(overall.mean())
    with pytest.raises(SparsedetError, match="IoU 0.52 is not one of the evaluated thresholds"):
        pr.curves(0.52)


def test_eval_plots_writes_curves_and_the_confusion_matrix(synth, tmp_path, capsys):
    gt = json.loads(open(synth["val"]).read())
    # Every ground-truth box found, plus one false positive of the first class on the first image.
    detections = [_det(a["image_id"], a["category_id"], a["bbox"], 0.9) for a in gt["annotations"]]
    first = min(gt["categories"], key=lambda c: c["id"])
    detections.append(_det(gt["images"][0]["id"], first["id"], [0, 0, 3, 3], 0.8))
    det = tmp_path / "det.json"
    det.write_text(json.dumps(detections))
    out = tmp_path / "eval"
    assert main(["eval", "--results", str(det), "--val", synth["val"], "--out", str(out), "--plots"]) == 0
    assert "confusion_matrix.png" in capsys.readouterr().out
    for name in ("pr_curve.png", "pr_curve_iou50.png", "confusion_matrix.png"):
        with Image.open(out / name) as image:
            assert image.width > 200 and image.height > 200
    counts = json.loads((out / "confusion_matrix.json").read_text())
    matrix = np.array(counts["matrix"])
    per_class = [sum(a["category_id"] == c["id"] for a in gt["annotations"])
                 for c in sorted(gt["categories"], key=lambda c: c["id"])]
    assert counts["classes"] == [*synth["classes"], "background"] and counts["rows"] == "predicted"
    np.testing.assert_array_equal(np.diag(matrix)[:-1], per_class)
    assert matrix[0, -1] == 1 and matrix.sum() == sum(per_class) + 1  # the false positive, nothing else


def test_eval_plots_with_a_model_and_without_matplotlib(synth, tiny_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "eval"
    assert main(["eval", "--weights", str(tiny_run), "--val", synth["val"], "--out", str(out), "--plots",
                 "--device", "cpu", "--batch-size", "3", "--confusion-threshold", "0.0"]) == 0
    matrix = np.array(json.loads((out / "confusion_matrix.json").read_text())["matrix"])
    gt = json.loads(open(synth["val"]).read())
    assert matrix[:, :-1].sum() == len(gt["annotations"])  # every box is matched or missed, once
    assert (out / "pr_curve.png").is_file() and (out / "metrics.json").is_file()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the [viz] extra were not installed
    assert main(["eval", "--weights", str(tiny_run), "--val", synth["val"], "--out", str(out), "--plots"]) == 2
    assert "plotting needs matplotlib: pip install 'sparsedet[viz]'" in capsys.readouterr().err
