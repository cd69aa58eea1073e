"""Faults lose nothing and say so: a full disk at each writer (simulated, and a real tmpfs where the
tests run as root), SIGKILL during a checkpoint, an evaluation and an export (the run resumes to the
weights of a run never interrupted, the export reruns), a NaN burst in bf16, a corrupt train_state.

Kept cheap: the tiny DINO at hidden size 32 and 64 px, 2 or 3 steps; kills happen in a driver process
that patches the writer to write part of its file and then SIGKILL itself (no timing involved);
exports are faked (a real one takes half a minute): what is under test is how the file is written."""
import errno
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sparsedet.cli import main
from sparsedet.engine.checkpoint import latest_checkpoint, load_run, load_train_state
from sparsedet.filewrite import WriteFailed
from tiny import TINY

SMALL = [*TINY, "model.hidden_dim=32", "model.ffn_dim=32", "model.num_queries=10", "model.dn_queries=4",
         "model.eval_size=64", "model.eval_max_size=64", "data.train_scales=[64]", "data.max_size=64",
         "train.threads=1", "train.seed=7"]
# Evaluations at steps 1 and 2, each followed by a checkpoint; both checkpoints kept.
PLAN = ["train.max_steps=2", "train.eval_every=1", "train.checkpoint_every=0", "train.keep_checkpoints=2",
        "train.log_every=1"]


def _train_args(synth: dict, run: Path) -> list[str]:
    return ["train", "--preset", "dino_tiny", "--train", synth["train"], "--val", synth["val"], "--no-progress",
            "--out", str(run), *SMALL, *PLAN]


def _cli(argv: list[str], before: str) -> subprocess.CompletedProcess:
    """`sparsedet ARGV` in a fresh Python process, after ``before`` (the patch that kills it)."""
    code = before + f"\nimport sys\nfrom sparsedet.cli import main\nsys.exit(main({argv!r}))\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_run(a)[1], load_run(b)[1]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _full_disk(error: str = "oserror"):
    """A writer ``(obj, path)`` that writes 100 bytes, then fails as a full disk makes it fail: an
    OSError (Python, safetensors' own errors carry the errno text too) or torch.save's RuntimeError."""
    def write(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"\0" * 100)
        if error == "torch":
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4054")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return write


@pytest.fixture(scope="module", autouse=True)
def no_run_report():
    """`sparsedet train` ends by drawing the run's curves and val pictures: not under test here, and
    a second or so a run."""
    from sparsedet.tools.report import RunReport
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RunReport, "after_train", lambda self, trainer: None)
        yield


@pytest.fixture
def one_thread():
    """train.threads=1 sets torch's thread count for the process: restored afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def whole_run(synth, tmp_path_factory) -> Path:
    """The PLAN run, never interrupted: what every resumed run must end with."""
    run = tmp_path_factory.mktemp("whole") / "run"
    threads = torch.get_num_threads()
    try:
        assert main(_train_args(synth, run)) == 0
    finally:
        torch.set_num_threads(threads)
    return run


# ---------------------------------------------------------------- disk full, simulated

def test_disk_full_at_a_checkpoint_keeps_the_last_one_and_says_how_to_resume(synth, tmp_path, monkeypatch,
                                                                             capsys, one_thread):
    run = tmp_path / "run"
    args = ["train", "--preset", "dino_tiny", "--train", synth["train"], "--no-progress", "--out", str(run), *SMALL,
            "train.max_steps=3", "train.checkpoint_every=1"]
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: (_full_disk("torch") if "step_00000002" in str(f)
                                                                else real_save)(obj, f, *a, **k))
    import sparsedet.engine.hooks as hooks
    import sparsedet.filewrite as filewrite
    for module in (hooks, filewrite):  # as good as full: torch.save's error alone does not say so
        monkeypatch.setattr(module, "free_bytes", lambda path: 4096)
    with pytest.warns(UserWarning, match="4.0 KB free on the file system of .*less than the") as warned:
        assert main(args) == 2
    assert sum("a checkpoint takes" in str(w.message) for w in warned) == 1  # before step 1's checkpoint, once
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: could not write the checkpoint step 2 to "
                                                     f"{run / 'checkpoints' / 'step_00000002'}: ")
    assert "(4.0 KB free on that file system, about " in err and "free some space or write elsewhere" in err
    assert f"The newest intact checkpoint is {run / 'checkpoints' / 'step_00000001'} (step 1)" in err
    assert f"\n  sparsedet train --resume {run}\n" in err
    assert not _leftovers(run)
    assert latest_checkpoint(run).name == "step_00000001"
    assert load_train_state(latest_checkpoint(run))["trainer"]["step"] == 1
    load_run(run)  # the run folder's weights are the previous checkpoint's, whole

    monkeypatch.undo()  # space freed: the printed command continues the run
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert "resumed" in capsys.readouterr().out and latest_checkpoint(run).name == "step_00000003"


def test_disk_full_at_the_final_weights_is_a_write_failure_naming_the_whole_checkpoint(synth, tmp_path, monkeypatch,
                                                                                      one_thread):
    import sparsedet.engine.checkpoint as checkpoint
    from sparsedet.cli import _prepare_training
    from sparsedet.engine.build import build_trainer
    cfg, model, train_set, _ = _prepare_training("dino_tiny", None, SMALL + ["train.max_steps=2",
                                                 "train.checkpoint_every=1"], {"train": synth["train"]})
    trainer = build_trainer(model, cfg, train_set, None, tmp_path / "run", progress=False)
    real_save = checkpoint.save_file
    monkeypatch.setattr(checkpoint, "save_file", lambda t, p: (_full_disk() if "step_00000002" in p
                                                               else real_save)(t, p))
    with pytest.raises(WriteFailed, match="could not write the final weights and checkpoint step 2") as failed:
        trainer.fit()
    assert failed.value.out_of_space and failed.value.free > 0
    assert "No space left on device" in str(failed.value) and "step_00000001 (step 1)" in str(failed.value)
    assert isinstance(failed.value.__cause__, OSError)
    assert not _leftovers(tmp_path / "run") and latest_checkpoint(tmp_path / "run").name == "step_00000001"


def test_only_failed_writes_become_write_failures(tmp_path, monkeypatch):
    from sparsedet.filewrite import atomic_write, guarded
    target = tmp_path / "f.bin"

    def failing(error):
        def write(path):
            Path(path).write_bytes(b"\0" * 100)
            raise error
        return write

    for error in (ValueError("a bug"), RuntimeError("a tensor cannot be pickled"), FileNotFoundError(2, "gone")):
        with pytest.raises(type(error)):  # unchanged, traceback and all
            atomic_write(target, failing(error))
    with pytest.raises(WriteFailed, match=r"the f\.bin to .*: Read-only file system \(.* free on that file system\); "
                                          "check the disk"):
        atomic_write(target, failing(OSError(errno.EROFS, os.strerror(errno.EROFS))))
    # safetensors' error type carries the errno text; a torch.save RuntimeError counts once space is short
    with pytest.raises(WriteFailed, match="No space left on device"):
        atomic_write(target, failing(Exception("No space left on device (os error 28)")))
    with pytest.raises(WriteFailed, match="the disk nearly full"):
        atomic_write(target, failing(RuntimeError("something unheard of")), needed=10 ** 18)
    with pytest.raises(WriteFailed, match="the checkpoint step 3 to /x/step_3"):  # the outer writer's label
        with guarded(Path("/x/step_3"), "checkpoint step 3"):
            atomic_write(target, failing(OSError(errno.ENOSPC, "full")))
    assert list(tmp_path.iterdir()) == []  # every attempt's temporary file went


def _fake_onnx_program():
    """What torch.onnx.export returns, holding a one-node graph with the exported inputs' names."""
    from onnx import TensorProto, helper
    images = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, "height", "width"])
    boxes = helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["batch", 3, "height", "width"])
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["boxes"])], "fake", [images], [boxes])
    return SimpleNamespace(model_proto=helper.make_model(graph))


def test_disk_full_writing_metrics_predictions_and_an_export(synth, tiny_run, tmp_path, monkeypatch, capsys):
    import onnx
    real_write_text = Path.write_text
    full = _full_disk()

    def write_text(path, text, *args, **kwargs):  # the temporary files of metrics.json and predictions.json
        if path.name.startswith((".metrics.json.", ".predictions.json.")):
            return full(text, path)
        return real_write_text(path, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: _fake_onnx_program())
    monkeypatch.setattr(onnx, "save", _full_disk())
    image = next(Path(synth["val"]).parent.rglob("*.png"))
    runs = {"evaluation metrics (metrics.json)": (["eval", "--weights", str(tiny_run), "--val", synth["val"], "--out",
                                                   str(tmp_path / "eval")], tmp_path / "eval" / "metrics.json"),
            "predictions": (["predict", "--weights", str(tiny_run), str(image), "--out", str(tmp_path / "pred")],
                            tmp_path / "pred" / "predictions.json"),
            "ONNX export": (["export", str(tiny_run), "--out", str(tmp_path / "onnx" / "m.onnx")],
                            tmp_path / "onnx" / "m.onnx")}
    for what, (argv, target) in runs.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert main(argv) == 2, what
        err = capsys.readouterr().err
        assert f"error: could not write the {what} to {target}: No space left on device (" in err
        assert not target.exists() and not _leftovers(target.parent), what
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == [f"{image.stem}_pred.png"]


def test_a_real_full_tmpfs_fails_the_next_checkpoint_with_a_warning_first(synth, tmp_path, one_thread):
    from sparsedet.cli import _prepare_training
    from sparsedet.engine.build import build_trainer
    from sparsedet.engine.checkpoint import folder_bytes
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount, run = tmp_path / "small", tmp_path / "small" / "run"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"mount -t tmpfs failed here: {mounted.stderr.decode().strip()}")

    def trainer(steps: int):
        cfg, model, train_set, _ = _prepare_training("dino_tiny", None, SMALL + [f"train.max_steps={steps}"],
                                                     {"train": synth["train"]})
        return build_trainer(model, cfg, train_set, None, run, progress=False)

    try:
        trainer(1).fit()  # step 1's checkpoint, then shrink the disk to what is used and half a checkpoint
        used = shutil.disk_usage(mount).used
        subprocess.run(["mount", "-o", f"remount,size={used + folder_bytes(latest_checkpoint(run)) // 2}", str(mount)],
                       check=True)
        resumed = trainer(2)
        resumed.resume()
        with pytest.warns(UserWarning, match="less than the .* a checkpoint takes"):
            with pytest.raises(WriteFailed, match="checkpoint step 2") as failed:
                resumed.fit()
        assert failed.value.out_of_space, failed.value
        assert "step_00000001 (step 1)" in str(failed.value) and f"sparsedet train --resume {run}" in str(failed.value)
        assert not _leftovers(mount) and load_train_state(latest_checkpoint(run))["trainer"]["step"] == 1
        load_run(run)
    finally:
        subprocess.run(["umount", str(mount)], check=True)


# ---------------------------------------------------------------- SIGKILL mid-write, then resume or rerun

KILL_IN_CHECKPOINT = """
import os, signal, torch
_save = torch.save
def _dying(obj, f, *args, **kwargs):  # step 2's train_state.pt: half a file, then the process dies
    if "step_00000002" in str(f):
        open(f, "wb").write(b"\\0" * 100)
        os.kill(os.getpid(), signal.SIGKILL)
    return _save(obj, f, *args, **kwargs)
torch.save = _dying
"""

KILL_IN_EVALUATION = """
import os, signal
import sparsedet.engine.hooks as hooks
_evaluate, calls = hooks.evaluate, []
def _dying(*args, **kwargs):  # the second evaluation (step 2): computed, then the process dies
    calls.append(1)
    result = _evaluate(*args, **kwargs)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return result
hooks.evaluate = _dying
"""


# (the patch, the step of the last evaluation written before the kill)
@pytest.mark.parametrize("fault, evaluated", [(KILL_IN_CHECKPOINT, 2), (KILL_IN_EVALUATION, 1)],
                         ids=["checkpoint", "evaluation"])
def test_sigkill_mid_run_resumes_to_the_uninterrupted_weights(synth, tmp_path, whole_run, fault, evaluated,
                                                              one_thread, capsys):
    run = tmp_path / "run"
    died = _cli(_train_args(synth, run), before=fault)
    assert died.returncode == -9, died.stderr
    assert latest_checkpoint(run).name == "step_00000001"
    assert load_train_state(latest_checkpoint(run))["trainer"]["step"] == 1
    assert json.loads((run / "metrics.json").read_text())["step"] == evaluated  # whole
    load_run(run)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert "at step 1" in capsys.readouterr().out
    assert not _leftovers(run / "checkpoints")  # the half-written attempt was pruned
    assert json.loads((run / "metrics.json").read_text())["step"] == 2
    assert _same_weights(run, whole_run) and _same_weights(latest_checkpoint(run), whole_run)


KILL_IN_EXPORT = """
import os, signal, onnx, torch
from test_faults import _fake_onnx_program
torch.onnx.export = lambda *args, **kwargs: _fake_onnx_program()
def _dying(proto, path, *args, **kwargs):  # half the file, then the process dies
    open(path, "wb").write(proto.SerializeToString()[:20])
    os.kill(os.getpid(), signal.SIGKILL)
onnx.save = _dying
"""


def test_sigkill_during_an_export_leaves_no_file_and_the_rerun_writes_it_whole(tiny_run, tmp_path, monkeypatch):
    import onnx

    import sparsedet.tools.export as export
    target = tmp_path / "m.onnx"
    argv = ["export", str(tiny_run), "--out", str(target)]
    died = _cli(argv, before=KILL_IN_EXPORT)
    assert died.returncode == -9, died.stderr
    assert not target.exists()  # only a hidden .m.onnx.*.tmp of the dead process, never a torn m.onnx
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: _fake_onnx_program())
    monkeypatch.setattr(export, "compare", lambda *a, **k: {"ok": True, "images": 2, "checked_per_image": 20,
                                                            "unmatched": 0, "max_box_px": 0.0, "max_score": 0.0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(argv) == 0
    metadata = {p.key: p.value for p in onnx.load(str(target)).metadata_props}
    assert json.loads(metadata["config"])["model"]["kind"] == "dino"


# ---------------------------------------------------------------- bad numbers and bad files

def test_a_nan_burst_in_bf16_skips_those_steps_and_the_run_recovers(synth, tmp_path, monkeypatch, one_thread):
    from sparsedet.cli import _prepare_training
    from sparsedet.engine.build import build_trainer
    cfg, model, train_set, _ = _prepare_training("dino_tiny", None, SMALL + [
        "train.precision=bf16", "train.max_steps=2", "train.max_nonfinite=3"],
        {"train": synth["train"]})
    trainer = build_trainer(model, cfg, train_set, None, tmp_path / "run", progress=False)
    total, calls = trainer.criterion.total, []

    def bursting(terms):  # micro-batches 2 and 3: two non-finite losses in a row, one under the limit
        calls.append(1)
        return total(terms) * (float("nan") if len(calls) in (2, 3) else 1.0)

    monkeypatch.setattr(trainer.criterion, "total", bursting)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit()
    skipped = [str(w.message) for w in caught if "non-finite loss, step skipped" in str(w.message)]
    assert skipped == ["step 2: non-finite loss, step skipped"] * 2
    assert trainer.step == 2 and trainer.autocast_dtype == torch.bfloat16
    assert all(r["loss"] == r["loss"] for r in trainer.log.history if "loss" in r)  # no NaN was logged
    assert all(torch.isfinite(v).all() for v in load_run(tmp_path / "run")[1].values())


def test_a_corrupt_train_state_names_the_older_intact_checkpoint_which_resumes(whole_run, tmp_path, capsys,
                                                                               one_thread):
    run = tmp_path / "run"
    shutil.copytree(whole_run, run)
    for best in run.glob("checkpoints/best_*"):  # copies, not the hard links to step_N they were: not torn below
        shutil.rmtree(best)
    newest, older = run / "checkpoints" / "step_00000002", run / "checkpoints" / "step_00000001"
    state = newest / "train_state.pt"
    state.write_bytes(state.read_bytes()[:1000])  # torn, as by a copy cut short
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"error: could not read {state} as a training state" in err and "Traceback" not in err
    assert f"The newest intact checkpoint is {older} (step 1)" in err
    assert err.rstrip().endswith(f"sparsedet train --resume {older}")

    assert main(["train", "--resume", str(older), "--no-progress"]) == 0  # the command it printed
    assert load_train_state(newest)["trainer"]["step"] == 2  # written again, whole
    assert _same_weights(run, whole_run)


# ---------------------------------------------------------------- data that vanishes

def test_an_image_deleted_mid_training_is_skipped_with_a_warning(synth, tmp_path, one_thread):
    """Every image is met in the first two steps (8 images, batch 4); one is deleted after the
    dataset was read: training skips it, says so, and finishes."""
    from sparsedet.cli import _prepare_training
    from sparsedet.engine.build import build_trainer
    root = tmp_path / "data"
    shutil.copytree(Path(synth["root"]) / "images", root / "images")
    shutil.copy(synth["train"], root / "train.json")
    cfg, model, train_set, _ = _prepare_training("dino_tiny", None, SMALL + ["train.max_steps=2", "train.batch_size=4"],
                                                 {"train": str(root / "train.json")})
    trainer = build_trainer(model, cfg, train_set, None, tmp_path / "run", progress=False)
    gone = json.loads((root / "train.json").read_text())["images"][0]["file_name"]
    (root / gone).unlink()
    with pytest.warns(UserWarning) as record:
        trainer.fit()
    messages = [str(w.message) for w in record]
    assert trainer.step == 2 and trainer.skipped_images == 1
    assert any("skipped 1 unreadable images" in m for m in messages), messages
    load_run(tmp_path / "run")
