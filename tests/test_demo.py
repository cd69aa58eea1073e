"""The demo's drawing never looks broken: labelled ground truth beside predictions, at most 10 boxes
per image, the run's recorded threshold, or one that is lowered, saying so, when a short run's
scores are low."""
import json
from pathlib import Path

import torch
from PIL import Image

from sparsedet import Detector
from sparsedet.tools.demo import DRAWN_PER_IMAGE, THRESHOLDS, ground_truth, pick_threshold, show_predictions


def test_pick_threshold_takes_the_highest_that_gives_enough_detections():
    scores = [torch.tensor([0.9, 0.25, 0.15]), torch.tensor([0.12, 0.01])]
    assert pick_threshold(scores, wanted=1) == 0.3
    assert pick_threshold(scores, wanted=2) == 0.2   # 0.9 and 0.25
    assert pick_threshold(scores, wanted=4) == 0.1   # + 0.15 and 0.12
    assert pick_threshold(scores, wanted=9) == THRESHOLDS[-1]


def test_ground_truth_boxes_are_xyxy_in_model_columns():
    coco = {"annotations": [{"image_id": 1, "bbox": [10, 20, 30, 40], "category_id": 7},
                            {"image_id": 2, "bbox": [0, 0, 5, 5], "category_id": 3},
                            {"image_id": 1, "bbox": [1, 1, 2, 2], "category_id": 3, "iscrowd": 1}]}
    truth = ground_truth(coco, 1, [3, 7])
    assert truth["boxes"].tolist() == [[10, 20, 40, 60]] and truth["labels"].tolist() == [1]


def test_an_untrained_model_is_drawn_at_a_lowered_threshold_beside_the_truth(synth, tmp_path):
    torch.manual_seed(0)
    categories = json.loads(Path(synth["val"]).read_text())["categories"]
    model = Detector.from_preset("dino_tiny", num_classes=len(categories), classes=[c["name"] for c in categories],
                                 category_ids=[c["id"] for c in categories])
    message = show_predictions(model, Path(synth["val"]), Path(synth["root"]), tmp_path, count=3)
    assert f"on 3 val images, each beside its ground truth: {tmp_path / 'predictions.png'}" in message
    assert f"so the drawing uses {THRESHOLDS[-1]:g}" in message  # random weights score about 0.01
    assert Image.open(tmp_path / "predictions.png").size == (4 * 256, 2 * 256)  # 3 pairs, 4 per row
    assert len(list((tmp_path / "predictions").glob("*_pred.png"))) == 3


def test_a_recorded_threshold_is_used_and_the_drawing_keeps_ten_boxes_per_image_with_labelled_panels(synth, tmp_path):
    torch.manual_seed(0)
    categories = json.loads(Path(synth["val"]).read_text())["categories"]
    model = Detector.from_preset("dino_tiny", num_classes=len(categories), classes=[c["name"] for c in categories],
                                 category_ids=[c["id"] for c in categories], score_threshold=0.001)
    message = show_predictions(model, Path(synth["val"]), Path(synth["root"]), tmp_path, count=2)
    assert "score > 0.001: the run's, chosen on its val split" in message and "lowered" not in message
    shown = int(message.split()[1])
    assert 0 < shown <= 2 * DRAWN_PER_IMAGE
    # Display only: the results keep every detection above the threshold (100 per image here).
    assert len(json.loads((tmp_path / "predictions" / "predictions.json").read_text())) > 2 * DRAWN_PER_IMAGE
    picture = Image.open(tmp_path / "predictions.png").convert("RGB")
    assert picture.getpixel((1, 6)) == picture.getpixel((256 + 1, 6)) == (0, 0, 0)  # the captions' black strip


def test_the_demo_command_trains_its_steps_evaluates_and_draws(tmp_path, monkeypatch, capsys):
    """`sparsedet demo` end to end on a small dataset: the step plan inside the minutes budget,
    the AP line, metrics.json, the drawing and its threshold (the run's, recorded at the end)."""
    from sparsedet.cli import main
    from sparsedet.data import synthetic
    from tiny import TINY
    small = synthetic.write_synthetic
    monkeypatch.setattr(synthetic, "write_synthetic",
                        lambda out, **kw: small(out, n_train=6, n_val=4, size=96, seed=kw.get("seed", 0)))
    overrides = [o for o in TINY if not o.startswith("train.max_steps")]
    assert main(["demo", "--steps", "3", "--minutes", "5", "--out", str(tmp_path), *overrides]) == 0
    out = capsys.readouterr().out
    assert "training dino_tiny for 3 steps or 5 min, whichever ends first" in out
    assert "after 3 steps" in out and "the machine was busy" not in out
    assert json.loads((tmp_path / "metrics.json").read_text())["step"] == 3
    assert Image.open(tmp_path / "predictions.png").size[0] > 0
