"""The trainer's seams: hooks see the events in order, the plan and the time budget stop training
and say why, checkpoints keep the last step and the best, and the training state is its parts'
(an older checkpoint's flat layout still resumes exactly)."""
import copy
import json
import os
import re
import shutil
import warnings

import pytest
import torch

from sparsedet import Detector
from sparsedet.cli import _prepare_training
from sparsedet.config import apply_overrides
from sparsedet.engine import hooks
from sparsedet.engine.build import build_trainer
from sparsedet.engine.checkpoint import TRAIN_STATE, load_run, load_train_state
from sparsedet.engine.hooks import Hook
from sparsedet.engine.runlog import RunLog, read_steps
from sparsedet.errors import SparsedetError
from sparsedet.presets import get_preset
from tiny import TINY


def _trainer(synth, tmp_path, overrides: list[str], val: bool = False, progress: bool = False, run: str = "run"):
    data = {"train": synth["train"], "val": synth["val"] if val else None}
    config, model, train_set, val_set = _prepare_training("dino_tiny", None, TINY + overrides, data)
    return build_trainer(model, config, train_set, val_set, tmp_path / run, progress=progress)


class Recorder(Hook):
    """Writes down each event with the step the trainer was at."""

    def __init__(self):
        self.events = []

    def before_train(self, trainer):
        self.events.append(("before_train", trainer.step))

    def after_step(self, trainer):
        self.events.append(("after_step", trainer.step, sorted(trainer.losses)))

    def after_train(self, trainer):
        self.events.append(("after_train", trainer.step, trainer.stop_reason))

    def close(self, trainer):
        self.events.append(("close", trainer.step))


def test_a_custom_hook_gets_every_event_in_order(synth, tmp_path):
    trainer = _trainer(synth, tmp_path, ["train.max_steps=2"])
    recorder = Recorder()
    trainer.hooks.append(recorder)
    trainer.fit()
    terms = ["loss", "loss_bbox", "loss_cls", "loss_giou"]
    assert recorder.events == [("before_train", 0), ("after_step", 1, terms), ("after_step", 2, terms),
                               ("after_train", 2, "stopped at step 2: 2 steps done (train.max_steps)"), ("close", 2)]


def test_close_follows_an_error_and_after_train_does_not(synth, tmp_path, monkeypatch):
    trainer = _trainer(synth, tmp_path, ["train.max_steps=3", "train.max_nonfinite=1"])
    recorder = Recorder()
    trainer.hooks.append(recorder)
    monkeypatch.setattr(trainer.criterion, "total", lambda terms: sum(terms.values()) * float("nan"))
    with pytest.warns(UserWarning, match="non-finite"), pytest.raises(SparsedetError, match="1 non-finite losses"):
        trainer.fit()
    assert recorder.events == [("before_train", 0), ("close", 0)]


def test_the_time_budget_stops_training_and_says_why(synth, tmp_path, capsys):
    trainer = _trainer(synth, tmp_path, ["train.max_steps=50", "train.minutes=0.000001"], progress=True)
    trainer.fit()
    assert trainer.step == 1  # any step takes longer than 60 microseconds
    captured = capsys.readouterr()
    assert "stopped at step 1 of 50: the 1e-06 min budget (train.minutes) ran out\n" in captured.out
    bar = captured.err.split("\r")[-1]  # the bar's last state: steps (no total under a budget), loss, steps/s, budget
    assert bar.startswith("train: 1 steps [")
    assert "loss=" in bar and "steps/s=" in bar and re.search(r"budget=\d+\.\d min used, 0\.0 left", bar)
    assert load_train_state(tmp_path / "run" / "checkpoints" / "step_00000001")["trainer"]["step"] == 1


def test_the_epoch_plan_stops_training_and_says_why(synth, tmp_path, capsys):
    # 8 images in batches of 4: 2 steps per epoch.
    trainer = _trainer(synth, tmp_path, ["train.max_steps=0", "train.epochs=1", "train.batch_size=4",
                                         "train.minutes=5"])
    trainer.fit()
    assert trainer.step == 2 and trainer.epoch == 0 and trainer.batch_in_epoch == 2
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("stopped")]
    assert len(lines) == 1 and re.fullmatch(r"stopped at step 2: 1 epoch done \(train\.epochs\) after \d+\.\d of 5 min",
                                            lines[0]), lines


def test_checkpoints_keep_the_last_step_and_the_best(synth, tmp_path, monkeypatch):
    """Evaluations after steps 1 and 2 and at the end (step 3) score AP 0.3, 0.1 and 0.5. By default
    the newest step checkpoint and the best stay; a best at a saved step shares that step's files."""
    aps = iter([0.3, 0.1, 0.5])
    evaluate = hooks.evaluate

    def scripted(model, dataset, *args):
        metrics, results = evaluate(model, dataset, *args)
        return {**metrics, "AP": next(aps)}, results

    monkeypatch.setattr(hooks, "evaluate", scripted)

    class Listing(Hook):  # after the Checkpoints hook: what each step left on disk
        def __init__(self):
            self.seen = []

        def after_step(self, trainer):
            self.seen.append(sorted(p.name for p in checkpoints.iterdir()))

    checkpoints = tmp_path / "run" / "checkpoints"
    trainer = _trainer(synth, tmp_path, ["train.max_steps=3", "train.eval_every=1"], val=True)
    assert trainer.config.train.keep_checkpoints == 1  # the default
    listing = Listing()
    trainer.hooks.append(listing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit()
    assert listing.seen[:2] == [["best_step_00000001", "step_00000001"], ["best_step_00000001", "step_00000002"]]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best_step_00000003", "step_00000003"]
    best, last = checkpoints / "best_step_00000003", checkpoints / "step_00000003"
    assert sorted(p.name for p in best.iterdir()) == sorted(p.name for p in last.iterdir())
    assert all(os.path.samefile(p, last / p.name) for p in best.iterdir())  # no second copy on disk
    assert load_train_state(best)["checkpoints"]["best"] == {"AP": 0.5, "step": 3}
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["AP"] == 0.5


def test_every_step_reaches_steps_csv_at_log_time_and_a_resume_cuts_it_back(tmp_path):
    log = RunLog(tmp_path, is_main=True, progress=False, tensorboard=False)
    log.start(0, resumed=False)
    for step in (1, 2, 3):
        log.record_step({"step": step, "lr": 1e-4 * step, "loss": 10.0 / step})
    assert not log.steps_path.exists()  # the step loop writes no file
    log.write({"step": 3, "loss": 10.0 / 3})
    assert [r["step"] for r in read_steps(log.steps_path)] == [1, 2, 3]
    log.record_step({"step": 4, "lr": 4e-4, "loss": 2.5})
    log.close()
    assert read_steps(log.steps_path)[-1] == {"step": 4, "lr": 4e-4, "loss": 2.5}
    assert log.steps_path.read_text().splitlines()[:2] == ["step,lr,loss", "1,0.0001,10"]

    with open(log.steps_path, "a") as f:
        f.write("5,0.0005")  # killed while appending
    resumed = RunLog(tmp_path, is_main=True, progress=False, tensorboard=False)
    resumed.start(2, resumed=True)  # the checkpoint was at step 2: what came after it goes
    resumed.record_step({"step": 3, "lr": 3e-4, "loss": 3.0})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_steps(log.steps_path)] == [(1, 10.0), (2, 5.0), (3, 3.0)]
    RunLog(tmp_path, is_main=True, progress=False, tensorboard=False).start(0, resumed=False)
    assert not log.steps_path.exists()  # a new run starts a new record


def test_speed_watch_says_once_when_training_slows_to_a_third():
    """Steps and training seconds set by hand: 10 steps/s in the first minute, then 5 (fine), then
    3 (under a third: one warning), then 1 (no second warning)."""
    class Log:
        said: list[str] = []

        def say(self, text):
            self.said.append(text)

    class Clock:
        step, trained_seconds, log = 0, 0.0, Log()

    trainer, watch = Clock(), hooks.SpeedWatch()
    watch.before_train(trainer)

    def run(rate, seconds):
        for _ in range(int(seconds)):
            trainer.step += rate
            trainer.trained_seconds += 1.0
            watch.after_step(trainer)

    run(10, 60)
    run(5, 30)
    assert watch.slowdown is None and not trainer.log.said
    run(3, 30)
    assert watch.slowdown == (pytest.approx(10.0), pytest.approx(3.0))
    run(1, 60)
    assert len(trainer.log.said) == 1 and "machine is busy" in trainer.log.said[0]


class Counter(Hook):
    """Counts the steps it has seen, across resumes: a hook with its own part of the training state."""

    state_key = "counter"

    def __init__(self):
        self.count = 0

    def after_step(self, trainer):
        self.count += 1

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


def _flat(state: dict) -> dict:
    """``state`` as train_state.pt held it before each part kept its own (up to commit 15542ee): one dict."""
    return {**state["trainer"], **state["data"], "best": state["checkpoints"]["best"], "optimizer": state["optimizer"],
            "scaler": state["scaler"], "ema_updates": state["ema"]["updates"], "world_size": state["rng"]["world_size"],
            "rng": state["rng"]["states"]}


def test_the_training_state_is_its_parts_and_an_old_flat_one_resumes_exactly(synth, tmp_path):
    overrides = ["train.max_steps=2", "train.checkpoint_every=1", "train.keep_checkpoints=2", "train.ema=true",
                 "train.seed=5", "model.dropout=0.1"]  # dropout: the random streams must come back too
    whole = _trainer(synth, tmp_path, overrides)
    whole.hooks.insert(0, Counter())  # before the Checkpoints hook: it counts the step saved
    whole.fit()
    first = tmp_path / "run" / "checkpoints" / "step_00000001"
    state = load_train_state(first)
    assert list(state) == ["trainer", "data", "optimizer", "scaler", "rng", "ema", "counter", "checkpoints"]
    assert state["counter"] == {"count": 1} and state["ema"] == {"updates": 1}
    old = _flat(state)
    assert sorted(old) == ["batch_in_epoch", "best", "ema_updates", "epoch", "optimizer", "rng", "scaler",
                           "skipped_images", "step", "trained_seconds", "world_size"]
    cut = tmp_path / "old" / "checkpoints" / "step_00000001"
    shutil.copytree(first, cut)
    torch.save(old, cut / TRAIN_STATE)
    resumed = _trainer(synth, tmp_path, overrides, run="old")
    counter = Counter()
    resumed.hooks.insert(0, counter)
    resumed.resume(cut)
    assert counter.count == 0 and resumed.step == 1  # a part the checkpoint has no entry for starts as it is
    resumed.fit()
    for ema in (False, True):
        expected, got = load_run(tmp_path / "run", ema=ema)[1], load_run(tmp_path / "old", ema=ema)[1]
        assert all(torch.equal(expected[k], got[k]) for k in expected), ema
    resumed.restore(state)  # today's layout: the hook gets its entry back
    assert counter.count == 1 and resumed.step == 1


def test_the_trainer_takes_a_model_built_from_its_own_config(tmp_path):
    """What training settles (the score threshold) reaches the model, and what the model records when
    saved or exported is the run's config: the model must be built from it, not from a copy."""
    config = apply_overrides(get_preset("dino_tiny"), TINY)
    model = Detector.from_config(copy.deepcopy(config))
    with pytest.raises(SparsedetError, match=r"built from the run's config: pass Detector\.from_config\(config\)"):
        build_trainer(model, config, None, None, tmp_path / "run")
    assert not (tmp_path / "run").exists()
