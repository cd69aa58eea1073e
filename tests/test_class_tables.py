"""Class tables: the COCO tables converters write, unused logit columns never predicted or scored."""
import json
from pathlib import Path

import pytest
import torch

from sparsedet import Detector
from sparsedet.data.batch import Batch
from sparsedet.data.categories import COCO_CATEGORIES, UNUSED, coco_class_table, column_categories
from sparsedet.engine.evaluator import Evaluator


def test_coco_tables():
    names, ids = coco_class_table(80)
    assert len(set(ids)) == len(set(names)) == 80 and ids == sorted(ids) and ids[-1] == 90
    assert (names[0], names[79], ids[11], names[11]) == ("person", "toothbrush", 13, "stop sign")
    raw_names, raw_ids = coco_class_table(91)
    assert raw_ids == list(range(91))
    assert [i for i, n in enumerate(raw_names) if n == UNUSED] == [0, 12, 26, 29, 30, 45, 66, 68, 69, 71, 83]
    assert all(raw_names[i] == name for i, name in COCO_CATEGORIES)
    assert coco_class_table(20) is None
    assert column_categories(["N/A", "cat"], [0, 1]) == [None, 1]


def test_unused_columns_are_never_detected():
    torch.manual_seed(0)
    model = Detector.from_preset("deformable_detr_tiny", classes=["N/A", "cat", "N/A", "dog"], category_ids=[0, 1, 2, 3])
    model.eval()
    with torch.no_grad():
        model.heads.class_embed[-1].bias[[0, 2]] = 10.0  # the unused columns would win every top-k slot
    batch = Batch(torch.rand(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
    q = model(batch).logits.shape[1]  # every (query, class) pair
    det = model.detect(batch, torch.tensor([[64, 64]]), top_k=4 * q)[0]
    assert len(det["labels"]) == 2 * q and set(det["labels"].tolist()) == {1, 3}


def test_evaluator_drops_unused_columns_and_still_refuses_unknown_ids():
    gt = {"images": [{"id": 1, "height": 100, "width": 100}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900,
                           "iscrowd": 0}],
          "categories": [{"id": 1, "name": "person"}]}
    evaluator = Evaluator(gt, column_categories(["N/A", "person"], [0, 1]))
    evaluator.update([1], [{"boxes": torch.tensor([[10.0, 10.0, 40.0, 40.0]] * 2),
                            "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 1])}])
    assert [d["category_id"] for d in evaluator.results()] == [1]
    assert evaluator.compute()["AP"] == pytest.approx(1.0)
    with pytest.raises(Exception, match=r"category ids \[0\] are not in the ground truth"):
        Evaluator(gt, column_categories(["background", "person"], [0, 1]))


def test_a_converted_coco_model_evaluates_and_predicts_on_coco_ids(synth, tmp_path):
    from released import SMALL_DEFORMABLE, deformable_detr_layout, save_deformable_detr

    from sparsedet.cli import main
    ours = Detector.from_preset("deformable_detr_r50", **SMALL_DEFORMABLE).state_dict()
    path = save_deformable_detr(tmp_path, deformable_detr_layout(ours, 2, False, False), num_queries=30)
    assert main(["convert", "--from", "official-deformable-detr", str(path), "--out", str(tmp_path / "run"),
                 "eval_size=128", "eval_max_size=128"]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["eval_size"] == 128
    val = Path(synth["val"])
    gt = json.loads(val.read_text())  # the synthetic images, relabelled as COCO's person/bicycle/car
    gt["categories"] = [{"id": i, "name": n} for i, n in COCO_CATEGORIES]
    for a in gt["annotations"]:
        a["category_id"] = 1 + a["category_id"] % 3
    for image in gt["images"]:
        image["file_name"] = str(val.parent / image["file_name"])
    (tmp_path / "coco.json").write_text(json.dumps(gt))
    assert main(["eval", "--weights", str(tmp_path / "run"), "--val", str(tmp_path / "coco.json")]) == 0
    metrics = json.loads((tmp_path / "run" / "eval" / "coco" / "metrics.json").read_text())  # named after coco.json
    assert 0 <= metrics["AP"] <= 1 and len(metrics["per_class"]) == 80
    image = gt["images"][0]["file_name"]
    assert main(["predict", "--weights", str(tmp_path / "run"), str(image), "--out", str(tmp_path / "pred"),
                 "--threshold", "0"]) == 0
    predicted = {d["category_id"] for d in json.loads((tmp_path / "pred" / "predictions.json").read_text())}
    assert predicted and predicted <= {i for i, _ in COCO_CATEGORIES}
