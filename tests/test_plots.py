"""`sparsedet plot RUN`: training curves from metrics.jsonl, without TensorBoard."""
import json
import sys

import numpy as np
import pytest
from PIL import Image

from sparsedet import SparsedetError
from sparsedet.cli import main
from sparsedet.tools import plots
from sparsedet.tools.plots import loss_groups, read_training_log


def _write_log(run, records):
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _step(step):
    terms = {"loss_cls": 1.0 / step, "loss_cls_0": 1.2 / step, "loss_cls_enc": 1.5 / step, "loss_cls_dn": 0.9 / step,
             "loss_cls_dn_0": 1.1 / step, "loss_bbox": 0.5 / step, "loss_giou": 0.7 / step}
    return {"step": step, "epoch": 0, "time_s": 0.1 * step, "lr": 1e-4 * min(1, step / 3), "loss": sum(terms.values()),
            **terms}


def _evaluation(step, ap):
    stats = {"AP": ap, "AP50": min(1.0, 2 * ap), "AP75": ap / 2}
    return {"step": step, "time_s": 0.1 * step, "eval": stats, "eval_ema": {k: v + 0.01 for k, v in stats.items()}}


def test_loss_terms_are_grouped_by_their_base_name():
    keys = ["loss", "loss_cls", "loss_bbox", "loss_cls_0", "loss_cls_enc", "loss_cls_dn", "loss_cls_dn_0",
            "loss_bbox_1", "loss_select"]
    assert loss_groups(keys) == {"loss": ["loss"], "loss_cls": ["loss_cls", "loss_cls_0", "loss_cls_enc", "loss_cls_dn",
                                                                "loss_cls_dn_0"],
                                 "loss_bbox": ["loss_bbox", "loss_bbox_1"], "loss_select": ["loss_select"]}


def test_plot_draws_loss_lr_and_ap_into_the_run_folder(tmp_path, capsys):
    run = tmp_path / "run"
    _write_log(run, [_step(s) for s in (1, 2, 3)] + [_evaluation(3, 0.1)] + [_step(s) for s in (4, 5)]
               + [_evaluation(5, 0.2)])
    assert main(["plot", str(run)]) == 0
    out = capsys.readouterr().out
    for name in ("loss.png", "lr.png", "ap.png"):
        assert str(run / name) in out
        with Image.open(run / name) as image:
            pixels = np.asarray(image.convert("L"))
        assert pixels.shape[0] > 200 and pixels.std() > 5  # a figure, not a blank canvas
    # Four panels (total, cls, bbox, giou): a 3-column grid of two rows.
    with Image.open(run / "loss.png") as loss, Image.open(run / "lr.png") as lr:
        assert loss.height > 1.5 * lr.height


def test_plot_without_evaluations_draws_no_ap_and_honours_out(tmp_path, capsys):
    run = tmp_path / "run"
    _write_log(run, [_step(1), _step(2)])
    assert main(["plot", str(run), "--out", str(tmp_path / "figs")]) == 0
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["loss.png", "lr.png"]


def test_plot_draws_lr_and_loss_from_every_step_when_the_run_recorded_them(tmp_path, monkeypatch):
    drawn = []  # (value, steps) of every line drawn
    series = plots._series

    def spy(records, key):
        steps, values = series(records, key)
        drawn.append((key, steps))
        return steps, values

    monkeypatch.setattr(plots, "_series", spy)
    run = tmp_path / "run"
    _write_log(run, [_step(1), _step(3)])  # log lines every other step
    plots.plot_training(run)
    assert ("lr", [1, 3]) in drawn and ("loss", [1, 3]) in drawn  # an older run: the log lines
    (run / "steps.csv").write_text("step,lr,loss,loss_cls\n1,1e-05,3,1\n2,2e-05,2.5,0.9\n3,3e-05,2,0.8\n")
    drawn.clear()
    plots.plot_training(run)
    assert ("lr", [1, 2, 3]) in drawn and ("loss", [1, 2, 3]) in drawn and ("loss_cls", [1, 2, 3]) in drawn


def test_plot_errors_name_the_file_and_the_fix(tmp_path, capsys, monkeypatch):
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert "metrics.jsonl not found; `sparsedet plot` takes a run folder written by `sparsedet train`" in \
        capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps(_step(1)) + "\n{\"step\": 2, \"loss\": \n")
    with pytest.raises(SparsedetError, match="line 2 is not valid JSON"):
        read_training_log(run / "metrics.jsonl")
    (run / "metrics.jsonl").write_text("")
    assert main(["plot", str(run)]) == 2
    assert "holds no training or evaluation records yet" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the [viz] extra were not installed
    _write_log(run, [_step(1)])
    assert main(["plot", str(run)]) == 2
    assert capsys.readouterr().err == "error: plotting needs matplotlib: pip install 'sparsedet[viz]'\n"
