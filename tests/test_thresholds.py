"""Score thresholds: the F1 rule by hand, which threshold a verb uses, the hint when nothing passes,
and a short training run that records its threshold for predict and eval --plots."""
import json
from pathlib import Path

import pytest
import torch

from sparsedet import Detector
from sparsedet.cli import main
from sparsedet.config import ModelConfig
from sparsedet.engine.evaluator import Evaluator
from sparsedet.engine.thresholds import MAX_SCORE, Threshold, choose_threshold, keep_above, nothing_shown
from sparsedet.errors import SparsedetError
from tiny import TINY

GT = {"images": [{"id": 1}, {"id": 2}], "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
      "annotations": [{"id": 1, "image_id": 1, "bbox": [0, 0, 10, 10], "category_id": 1},
                      {"id": 2, "image_id": 1, "bbox": [20, 20, 10, 10], "category_id": 2},
                      {"id": 3, "image_id": 2, "bbox": [0, 0, 10, 10], "category_id": 1}]}


def _det(image_id, category_id, bbox, score):
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}


def test_the_threshold_maximises_f1_over_all_classes_halfway_to_the_next_score():
    detections = [_det(1, 1, [0, 0, 10, 10], 0.9),    # hit
                  _det(1, 1, [50, 50, 5, 5], 0.8),    # nothing there
                  _det(1, 2, [20, 20, 10, 10], 0.6),  # hit
                  _det(2, 2, [0, 0, 10, 10], 0.5),    # the wrong class
                  _det(2, 1, [1, 0, 10, 10], 0.3),    # hit (IoU 0.82)
                  _det(2, 1, [0, 0, 10, 10], 0.2),    # the box is taken
                  _det(2, 1, [0, 0, 10, 10], 0.01)]   # below MIN_SCORE: not counted
    # Cuts after each score: hits 1,1,2,2,3,3 of 1..6 detections, 3 boxes: F1 = 2 hits / (kept + 3)
    # = .5, .4, .667, .571, .75, .667: the best keeps 5, halfway between 0.3 and 0.2.
    choice = choose_threshold(GT, detections)
    assert choice.threshold == pytest.approx(0.25)
    assert (choice.f1, choice.precision, choice.recall) == pytest.approx((0.75, 0.6, 1.0))
    assert "score threshold 0.250" in choice.describe()
    # The last cut: halfway to MIN_SCORE (0.05).
    assert choose_threshold(GT, detections[:5]).threshold == pytest.approx((0.3 + 0.05) / 2)
    # Equal scores are never split: a false positive scored 0.3 like the third hit makes the cut after
    # 0.3 keep 6 (F1 .667, a tie with the cut after 0.6, the higher one wins), not 5 (.75).
    choice = choose_threshold(GT, detections[:5] + [_det(1, 2, [70, 70, 5, 5], 0.3)])
    assert choice.threshold == pytest.approx(0.55) and choice.f1 == pytest.approx(2 / 3)


def test_the_threshold_is_bounded_and_absent_without_a_hit():
    sure = [_det(1, 1, [0, 0, 10, 10], 0.99), _det(1, 1, [50, 50, 5, 5], 0.97)]
    assert choose_threshold(GT, sure).threshold == MAX_SCORE  # halfway would be 0.98
    assert choose_threshold(GT, [_det(1, 1, [50, 50, 5, 5], 0.9)]) is None
    assert choose_threshold(GT, [_det(1, 1, [0, 0, 10, 10], 0.04)]) is None
    assert choose_threshold(GT, []) is None


def test_given_then_recorded_then_the_default():
    recorded, bare = ModelConfig(score_threshold=0.27), ModelConfig()
    assert Threshold.of(0.6, recorded, 0.5) == Threshold(0.6, "given")
    assert Threshold.of(None, recorded, 0.5) == Threshold(0.27, "the run's, chosen on its val split")
    assert Threshold.of(None, bare, 0.3) == Threshold(0.3, "the default: none recorded")
    assert Threshold.of(None, None, 0.5) == Threshold(0.5, "the default")  # a results file: no run
    with pytest.raises(SparsedetError, match="threshold must be a score in"):
        Threshold.of(1.5, bare, 0.5)
    det = {"boxes": torch.zeros(3, 4), "scores": torch.tensor([0.9, 0.27, 0.1]), "labels": torch.tensor([0, 1, 2]),
           "names": ["a", "b", "c"]}
    kept = keep_above(det, 0.27)  # strictly above, as predict keeps them
    assert kept["scores"].tolist() == [pytest.approx(0.9)] and kept["names"] == ["a"] and kept["boxes"].shape == (1, 4)


def test_the_empty_result_hint_names_the_best_score_and_a_threshold_below_it():
    threshold = Threshold(0.5, "the default: none recorded")
    hint = nothing_shown(threshold, 0.2137, "4 images", "--threshold")
    assert hint == ("no detection passed the score threshold 0.5 (the default: none recorded) on 4 images; the best "
                    "score was 0.214, so --threshold 0.21 would show some")
    assert "--threshold 0.2 would" in nothing_shown(threshold, 0.21, "4 images", "--threshold")  # strictly below
    assert "--threshold 0 would" in nothing_shown(threshold, 0.004, "4 images", "--threshold")
    assert "returned none" in nothing_shown(threshold, None, "4 images", "--threshold")


def _ground_truth_detections(monkeypatch):
    """Evaluation sees each val box found (score 0.8) plus a false positive of another class on it
    (0.3) instead of the barely trained model's detections: the best F1 keeps the 0.8s, so the run
    records 0.55."""
    update = Evaluator.update

    def found(self, image_ids, detections):
        made = []
        for image_id in image_ids:
            anns = [a for a in self.gt["annotations"] if a["image_id"] == int(image_id)]
            boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]).reshape(-1, 4)
            labels = torch.tensor([self.category_ids.index(a["category_id"]) for a in anns], dtype=torch.long)
            made.append({"boxes": torch.cat([boxes, boxes]), "labels": torch.cat([labels, (labels + 1) % 5]),
                         "scores": torch.tensor([0.8] * len(anns) + [0.3] * len(anns))})
        update(self, image_ids, made)

    monkeypatch.setattr(Evaluator, "update", found)


def test_training_records_its_threshold_and_predict_and_eval_use_it(synth, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    _ground_truth_detections(monkeypatch)
    assert main(["train", "--preset", "dino_tiny", "--train", synth["train"], "--val", synth["val"], "--no-progress",
                 "--out", str(run), *TINY]) == 0
    assert "recorded the score threshold 0.550 (model.score_threshold): the best F1 (1.000" in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["model"]["score_threshold"] == pytest.approx(0.55)
    monkeypatch.undo()  # from here on, the model's own detections (all scored far below 0.55)

    images = [str(p) for p in sorted((Path(synth["root"]) / "images" / "val").glob("*.png"))]
    model = Detector.from_pretrained(run)
    assert all(len(d["scores"]) == 0 for d in model.predict(images))  # threshold None: the run's 0.55
    assert all(len(d["scores"]) > 0 for d in model.predict(images, threshold=0.0))
    with pytest.warns(UserWarning, match=r"no detection passed the score threshold 0.55 \(the run's, chosen on its "
                      r"val split\) on 4 images; the best score was (\S+), so --threshold (\S+) would show some"
                      ) as caught:
        assert main(["predict", "--weights", str(run), *images, "--out", str(tmp_path / "p")]) == 0
    assert "0 detections scored above 0.55 (the run's, chosen on its val split)" in capsys.readouterr().out
    suggested = str(caught[0].message).split("--threshold ")[1].split()[0]
    assert main(["predict", "--weights", str(run), *images, "--out", str(tmp_path / "q"),
                 "--threshold", suggested]) == 0
    assert "0 detections" not in capsys.readouterr().out  # the hint's threshold shows some

    with pytest.warns(UserWarning, match="--confusion-threshold"):
        assert main(["eval", "--weights", str(run), "--val", synth["val"], "--out", str(tmp_path / "e"),
                     "--plots"]) == 0
    assert json.loads((tmp_path / "e" / "confusion_matrix.json").read_text())["score_threshold"] == pytest.approx(0.55)
