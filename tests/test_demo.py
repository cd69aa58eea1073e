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
