"""What a run holds after `sparsedet train`, as a YOLO user expects: numbered run folders when --out
is left out, results.csv, every step's lr and loss, the curves and val predictions beside the truth."""
import csv
import json
import sys

import pytest
from PIL import Image

from sparsedet.cli import main
from sparsedet.tools.report import results_rows
from tiny import TINY


def _csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_results_rows_merge_a_steps_log_line_and_evaluation():
    records = [{"step": 1, "epoch": 0, "lr": 1e-4, "loss": 3.0},
               {"step": 2, "epoch": 0, "lr": 2e-4, "loss": 2.0},
               {"step": 2, "epoch": 0, "eval": {"AP": 0.1, "AP50": 0.3, "per_class": {"a": 0.1}},
                "eval_ema": {"AP": 0.2}}]
    assert results_rows(records) == [{"step": 1, "epoch": 0, "lr": 1e-4, "loss": 3.0},
                                     {"step": 2, "epoch": 0, "lr": 2e-4, "loss": 2.0, "AP": 0.1, "AP50": 0.3,
                                      "ema_AP": 0.2}]


def test_train_without_out_numbers_its_run_folders_and_leaves_results_curves_and_val_predictions(
        synth, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train = ["train", "--preset", "dino_tiny", "--train", synth["train"], "--no-progress", *TINY,
             "train.max_steps=3", "train.log_every=2"]
    assert main([*train, "--val", synth["val"]]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "train"
    assert "writes   runs/train: evaluation at the end" in out and out.endswith("saved runs/train\n")
    assert "wrote results.csv, loss.png, lr.png, ap.png, val_predictions.png in runs/train" in out

    # results.csv: a row per log line (steps 1, 2) and the final evaluation (step 3).
    rows = _csv(run / "results.csv")
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert {"epoch", "lr", "loss", "loss_cls", "AP", "AP50", "AP75"} <= set(rows[0])
    assert rows[0]["AP"] == "" and float(rows[0]["loss"]) > 0 and 0 <= float(rows[2]["AP"]) <= 1
    # steps.csv: every step, the logged ones as the log has them.
    steps = _csv(run / "steps.csv")
    assert [r["step"] for r in steps] == ["1", "2", "3"] and list(steps[0]) == [
        "step", "lr", "loss", "loss_cls", "loss_bbox", "loss_giou"]
    log = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
    assert float(steps[1]["loss"]) == pytest.approx(log[2]["loss"], rel=1e-5)
    assert float(steps[1]["lr"]) == pytest.approx(log[2]["lr"], rel=1e-5)
    for name in ("loss.png", "lr.png", "ap.png"):
        assert (run / name).stat().st_size > 5000
    with Image.open(run / "val_predictions.png") as picture:
        assert picture.size == (4 * 256, 2 * 256)  # 4 val images: (truth, predictions) pairs, 4 cells a row

    # The next run takes runs/train2; without matplotlib it still ends well, with results.csv.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main([*train, "train.max_steps=1"]) == 0
    out = capsys.readouterr().out
    assert "no loss/lr/AP plots: plotting needs matplotlib: pip install 'sparsedet[viz]'" in out
    assert "wrote results.csv in runs/train2" in out and out.endswith("saved runs/train2\n")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["train", "train2"]
    assert not (tmp_path / "runs" / "train2" / "loss.png").exists()


def test_a_full_disk_while_writing_the_report_warns_and_keeps_the_finished_run(tmp_path, monkeypatch):
    """The report comes after the final weights: a full disk there costs a warning, never the run."""
    import errno
    import os
    from pathlib import Path
    from types import SimpleNamespace

    from sparsedet.tools.report import RESULTS, RunReport

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    said = []
    trainer = SimpleNamespace(stop_signal=None, ctx=SimpleNamespace(is_main=True), out_dir=tmp_path, val_set=None,
                              log=SimpleNamespace(history=[{"step": 1, "loss": 1.0}], say=said.append))
    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.warns(UserWarning, match=f"the run in {tmp_path} is complete, but its report is not: could not "
                                         f"write the {RESULTS} .*No space left on device"):
        RunReport().after_train(trainer)
    assert list(tmp_path.iterdir()) == [] and said == []  # no temporary file left, nothing claimed written
