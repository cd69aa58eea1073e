"""The training engine: exact resume after SIGKILL, atomic checkpoints, two-process Gloo DDP,
bad data, mixed precision, fine-tuning onto new classes, schedules, EMA and the sampler."""
import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from sparsedet import Detector
from sparsedet.cli import main
from sparsedet.config import TrainConfig, apply_overrides
from sparsedet.data.sampler import GroupedBatchSampler, SeededSamples
from sparsedet.engine.checkpoint import latest_checkpoint, load_run, load_train_state
from sparsedet.engine.optim import WeightEMA, lr_factor, param_groups
from sparsedet.errors import SparsedetError
from sparsedet.presets import get_preset
from tiny import TINY

LOSS_KEYS = ("loss", "loss_cls", "loss_bbox", "loss_giou")


def _cli(argv: list[str], before: str = "") -> subprocess.CompletedProcess:
    """`sparsedet ARGV` in a fresh Python process; ``before`` runs first (test hooks)."""
    code = before + f"\nimport sys\nfrom sparsedet.cli import main\nsys.exit(main({argv!r}))\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run: Path) -> dict[int, tuple]:
    return {r["step"]: tuple(r[k] for k in LOSS_KEYS) for r in _log(run) if "loss" in r}


KILL_AT_STEP = """
import os, signal
from sparsedet.engine.trainer import Trainer
_log_step = Trainer._log_step
def _killing(self, sums, bar):
    _log_step(self, sums, bar)
    if self.step == {step}:
        os.kill(os.getpid(), signal.SIGKILL)
Trainer._log_step = _killing
"""


def test_sigkilled_run_resumes_exactly(synth, tmp_path):
    args = ["train", "--preset", "dino_tiny", "--train", synth["train"], "--no-progress", *TINY,
            "train.max_steps=8", "train.log_every=1", "train.checkpoint_every=3", "train.seed=5",
            "model.dropout=0.1", "train.threads=1"]  # dropout on: the RNG state must be restored too
    whole = _cli(args + ["--out", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr
    killed = _cli(args + ["--out", str(tmp_path / "cut")], before=KILL_AT_STEP.format(step=5))
    assert killed.returncode == -9, killed.stderr
    assert latest_checkpoint(tmp_path / "cut").name == "step_00000003"
    assert max(_losses(tmp_path / "cut")) == 5  # steps 4 and 5 were logged after the checkpoint

    resumed = _cli(["train", "--resume", str(tmp_path / "cut"), "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout and "at step 3" in resumed.stdout
    expected, got = _losses(tmp_path / "whole"), _losses(tmp_path / "cut")
    assert sorted(got) == list(range(1, 9))
    assert got == expected  # bit-identical losses from step 4 on (and before)
    _, a = load_run(tmp_path / "whole")
    _, b = load_run(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


KILL_WHILE_SAVING = """
import os, signal
import sparsedet.engine.checkpoint as ckpt
_save = ckpt.save_file
calls = []
def _dying(tensors, path):
    calls.append(path)
    if len(calls) == 2:  # the second checkpoint's weights: half a file, then the process dies
        open(path, "wb").write(b"\\0" * 1000)
        os.kill(os.getpid(), signal.SIGKILL)
    _save(tensors, path)
ckpt.save_file = _dying
"""


def test_kill_while_saving_keeps_the_previous_checkpoint(synth, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--preset", "dino_tiny", "--train", synth["train"], "--no-progress", "--out", str(run),
            *TINY, "train.max_steps=4", "train.checkpoint_every=2", "train.log_every=1", "train.keep_checkpoints=1"]
    died = _cli(args, before=KILL_WHILE_SAVING)
    assert died.returncode == -9
    # Written so far: step 2's checkpoint and the run folder (linked to it); then step 4's died.
    checkpoint = latest_checkpoint(run)
    assert checkpoint.name == "step_00000002"
    assert list((run / "checkpoints").glob(".step_00000004.*.tmp"))  # the half-written attempt
    config, weights = load_run(checkpoint)
    assert load_train_state(checkpoint)["step"] == 2
    Detector.from_pretrained(run)  # the run folder's weights are whole too
    resumed = _cli(["train", "--resume", str(run), "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000004"]  # leftovers pruned


def test_train_state_is_never_unpickled(synth, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--preset", "dino_tiny", "--train", synth["train"], "--no-progress", "--out", str(run),
                 *TINY]) == 0
    checkpoint = latest_checkpoint(run)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"step": Evil()}, checkpoint / "train_state.pt")
    with pytest.raises(SparsedetError, match="could not read .*train_state.pt"):
        load_train_state(checkpoint)


def test_new_run_into_a_folder_with_checkpoints_is_refused(synth, tmp_path, capsys):
    argv = ["train", "--preset", "dino_tiny", "--train", synth["train"], "--no-progress", "--out",
            str(tmp_path / "run"), *TINY]
    assert main(argv) == 0
    assert main(argv) == 2
    assert "--resume" in capsys.readouterr().err


def test_two_gloo_processes_train_like_one_with_the_global_batch(synth, tmp_path):
    """2 processes x batch 1 against 1 process x batch 2 on the same data, which holds an image
    without boxes and a corrupt image: same steps, same loss scale, evaluation gathered from both."""
    data = json.loads(Path(synth["train"]).read_text())
    root = tmp_path / "data"
    shutil.copytree(Path(synth["root"]) / "images", root / "images")
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 2]  # image 2: no boxes
    (root / data["images"][5]["file_name"]).write_bytes(b"not an image")
    ann = root / "train.json"
    ann.write_text(json.dumps(data))
    common = ["--train", str(ann), "--val", synth["val"], "--no-progress", "--preset", "dino_tiny", *TINY,
              "train.max_steps=6", "train.log_every=1", "train.eval_every=-1", "train.threads=1"]
    single = _cli(["train", "--out", str(tmp_path / "one"), *common, "train.batch_size=2"])
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "sparsedet", "train", "--out", str(tmp_path / "two"), *common, "train.batch_size=1"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = _log(tmp_path / "one"), _log(tmp_path / "two")
    steps = [r["step"] for r in two if "loss" in r]
    assert steps == [r["step"] for r in one if "loss" in r] == [1, 2, 3, 4, 5, 6]
    mean = [sum(r["loss"] for r in log if "loss" in r) / 6 for log in (one, two)]
    assert 0.8 < mean[1] / mean[0] < 1.25, mean
    assert "unreadable" in ddp.stderr
    # Evaluation: each process scored its half of the val images; process 0 gathered all of them.
    gathered = json.loads((tmp_path / "two" / "metrics.json").read_text())
    from sparsedet.data.coco import CocoDetection
    from sparsedet.data.transforms import build_transforms
    from sparsedet.engine.evaluator import evaluate
    model = Detector.from_pretrained(tmp_path / "two")
    val = CocoDetection(synth["val"], transforms=build_transforms(False, [96], 128))
    alone, _ = evaluate(model, val, batch_size=1, progress=False)
    assert gathered["AP"] == pytest.approx(alone["AP"], abs=1e-9) and gathered["AR100"] == pytest.approx(alone["AR100"])


def test_bad_data_trains_through_with_counted_warnings(synth, tmp_path):
    data = json.loads(Path(synth["train"]).read_text())
    root = tmp_path / "data"
    shutil.copytree(Path(synth["root"]) / "images", root / "images")
    for k in (0, 3):
        (root / data["images"][k]["file_name"]).write_bytes(b"\x89PNG truncated")
    data["annotations"][0]["bbox"] = [10, 10, 0, 5]
    data["annotations"][1]["bbox"] = [float("nan"), 1, 2, 3]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] not in (5, 6)]  # two empty images
    ann = root / "train.json"
    ann.write_text(json.dumps(data))
    from sparsedet.engine.trainer import Trainer
    cfg = apply_overrides(get_preset("dino_tiny"), TINY + ["train.max_steps=8", "train.log_every=1"])
    with pytest.warns(UserWarning) as record:
        from sparsedet.cli import _prepare_training
        cfg, model, train_set, _ = _prepare_training("dino_tiny", None, TINY + ["train.max_steps=8"],
                                                     {"train": str(ann)})
        trainer = Trainer(model, cfg, train_set, None, tmp_path / "run", progress=False)
        trainer.fit()
    messages = [str(w.message) for w in record]
    assert train_set.num_degenerate == 2 and any("dropped 2 degenerate" in m for m in messages)
    assert trainer.step == 8
    # 8 steps of 2 images = 2 epochs of the 8 images: each corrupt image was met twice.
    assert trainer.skipped_images == 4 and any("skipped 4 unreadable images" in m for m in messages)
    assert sum("skipping image id" in m for m in messages) == 4


def test_nonfinite_losses_skip_steps_then_stop_keeping_the_checkpoint(synth, tmp_path, monkeypatch):
    from sparsedet.engine.trainer import Trainer
    from sparsedet.cli import _prepare_training
    cfg, model, train_set, _ = _prepare_training("dino_tiny", None, TINY + [
        "train.max_steps=20", "train.checkpoint_every=2", "train.max_nonfinite=3"], {"train": synth["train"]})
    trainer = Trainer(model, cfg, train_set, None, tmp_path / "run", progress=False)
    total = trainer.criterion.total
    calls = []

    def poisoned(terms):  # micro-batches 3 (one bad step, skipped), then 6, 7, 8 (three in a row)
        calls.append(1)
        loss = total(terms)
        return loss * float("nan") if len(calls) in (3, 6, 7, 8) else loss

    monkeypatch.setattr(trainer.criterion, "total", poisoned)
    with pytest.warns(UserWarning, match="non-finite loss, step skipped"):
        with pytest.raises(SparsedetError, match="3 non-finite losses in a row at step 5"):
            trainer.fit()
    assert trainer.step == 4
    assert latest_checkpoint(tmp_path / "run").name == "step_00000004"
    assert all(torch.isfinite(v).all() for v in load_run(tmp_path / "run")[1].values())


def test_fine_tuning_onto_another_class_set_keeps_the_rest(synth, tmp_path):
    base = tmp_path / "base"
    assert main(["train", "--preset", "dino_tiny", "--train", synth["train"], "--val", synth["val"], "--no-progress",
                 "--out", str(base), *TINY]) == 0
    data = json.loads(Path(synth["train"]).read_text())
    data["categories"] = data["categories"][:3] + [{"id": 9, "name": "new"}]
    keep = {c["id"] for c in data["categories"]}
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] in keep]
    ann = tmp_path / "four_classes.json"
    ann.write_text(json.dumps(data))
    from sparsedet.cli import _prepare_training
    with pytest.warns(UserWarning, match="another class set .*reinitialised the 5 class-dependent tensors"):
        cfg, model, _, _ = _prepare_training(None, str(base), [], {"train": str(ann), "images": synth["root"]})
    assert model.config.classes == [c["name"] for c in data["categories"]] and model.num_classes == 4
    _, old = load_run(base)
    new = model.state_dict()
    fresh = {"heads.class_embed.0.weight", "heads.class_embed.0.bias", "denoising.label_enc.weight",
             "queries.class_head.weight", "queries.class_head.bias"}  # DINO shares one class head per layer
    assert {k for k in new if new[k].shape != old[k].shape} == fresh
    assert all(torch.equal(new[k], old[k]) for k in new if k not in fresh)
    with pytest.warns(UserWarning, match="another class set"):
        assert main(["train", "--weights", str(base), "--train", str(ann), "--images", synth["root"],
                     "--no-progress", "--out", str(tmp_path / "tuned"), *TINY]) == 0
    tuned = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert tuned["model"]["category_ids"] == [1, 2, 3, 9]
    assert tuned["data"]["val"] == "" and tuned["data"]["train"] == str(ann)  # not the base run's data


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu(synth, tmp_path, amp):
    from sparsedet.cli import _prepare_training
    from sparsedet.engine.trainer import Trainer
    cfg, model, train_set, _ = _prepare_training("dino_tiny", None, TINY + [f"train.amp={amp}",
                                                 "train.max_steps=3", "train.log_every=1"], {"train": synth["train"]})
    trainer = Trainer(model, cfg, train_set, None, tmp_path / "run", progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no native bf16" where the CPU has none
        trainer.fit()
    assert trainer.amp_dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    assert trainer.scaler.is_enabled() == (amp == "fp16")
    assert all(math.isfinite(r["loss"]) for r in trainer.history)
    changed = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert len(changed) > 10


def test_ema_accumulation_and_tensorboard(synth, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--preset", "dino_tiny", "--train", synth["train"], "--val", synth["val"], "--no-progress",
                 "--out", str(run), *TINY, "train.batch_size=1", "train.accumulate=2", "train.max_steps=3",
                 "train.ema=true", "train.log_every=1"]) == 0
    state = load_train_state(latest_checkpoint(run))
    assert state["step"] == 3 and state["batch_in_epoch"] == 6  # two micro-batches per optimiser step
    metrics = json.loads((run / "metrics.json").read_text())
    assert "AP" in metrics and "AP" in metrics["ema"]
    raw, ema = Detector.from_pretrained(run), Detector.from_pretrained(run, ema=True)
    assert any(not torch.equal(a, b) for a, b in zip(raw.state_dict().values(), ema.state_dict().values()))
    assert main(["eval", "--weights", str(run), "--ema", "--val", synth["val"], "--out", str(tmp_path / "e")]) == 0
    assert list((run / "checkpoints").glob("best_step_*"))
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3] and "eval/AP" in acc.Tags()["scalars"]


def test_weight_ema_is_the_warmed_up_average():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(model.weight, 0.0)
    ema = WeightEMA(model, decay=0.9)
    expected = 0.0
    for n, w in enumerate([1.0, 2.0, 3.0], start=1):
        torch.nn.init.constant_(model.weight, w)
        ema.update(model)
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * w
    assert ema.module.weight.item() == pytest.approx(expected)


def test_schedules_and_parameter_groups():
    cfg = TrainConfig(lr=1e-4, lr_backbone=1e-5, warmup_steps=10, lr_drop=0.8)
    assert lr_factor(0, 0.0, cfg) == pytest.approx(0.1) and lr_factor(9, 0.5, cfg) == 1.0
    assert lr_factor(50, 0.79, cfg) == 1.0 and lr_factor(50, 0.8, cfg) == pytest.approx(0.1)
    cos = TrainConfig(schedule="cosine", min_lr_ratio=0.01)
    assert lr_factor(0, 0.0, cos) == 1.0 and lr_factor(5, 1.0, cos) == pytest.approx(0.01)
    assert lr_factor(5, 0.5, cos) == pytest.approx(0.01 + 0.99 * 0.5)
    with pytest.raises(SparsedetError, match="train.schedule"):
        lr_factor(0, 0.0, TrainConfig(schedule="linear"))
    model = Detector.from_preset("dino_tiny", num_classes=3)
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    assert groups["backbone"]["lr"] == 1e-5 and groups["linear_proj"]["lr"] == pytest.approx(1e-5)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].startswith("backbone.") for p in groups["backbone"]["params"])
    assert all("sampling_offsets" in names[id(p)] or "reference_points" in names[id(p)]
               for p in groups["linear_proj"]["params"])
    assert sum(len(g["params"]) for g in groups.values()) == sum(p.requires_grad for p in model.parameters())


def test_sampler_is_deterministic_sharded_grouped_and_resumable():
    groups = [0, 1, 0, 0, 1, 1, 0, 1, 0, 0, 1]
    one = GroupedBatchSampler(groups, batch_size=2, seed=3)
    one.set_epoch(4)
    batches = list(one)
    one.set_epoch(4)
    assert list(one) == batches  # the epoch's order depends on (seed, epoch) only
    one.set_epoch(5)
    assert list(one) != batches
    assert sorted(i for b in batches for i, _ in b) == list(range(11))
    full = [b for b in batches if len(b) == 2]
    assert all(len({groups[i] for i, _ in b}) == 1 for b in full[:-1])  # leftovers may mix
    one.set_epoch(4, start=3)
    assert list(one) == batches[3:]
    # Two processes split each global batch of 2 x 2; together they cover what one process sees.
    shards = []
    for rank in (0, 1):
        s = GroupedBatchSampler(groups, batch_size=2, seed=3, rank=rank, world_size=2)
        s.set_epoch(4)
        shards.append(list(s))
    assert len(shards[0]) == len(shards[1]) == 3
    seen = {i for shard in shards for b in shard for i, _ in b}
    assert seen == set(range(11))
    # A sample's augmentation seed is its own, whatever the sharding.
    seeds = {i: s for b in batches for i, s in b}
    assert all(seeds[i] == s for shard in shards for b in shard for i, s in b)


def test_seeded_samples_fix_the_augmentation_and_leave_random_alone():
    import random

    class Draw:
        def __len__(self):
            return 1

        def __getitem__(self, index):
            return random.random()

    samples = SeededSamples(Draw())
    random.seed(0)
    state = random.getstate()
    assert samples[(0, 7)] == samples[(0, 7)] != samples[(0, 8)]
    assert random.getstate() == state


def test_data_loader_workers_do_not_change_the_run(synth, tmp_path):
    """Augmentation seeds belong to the samples, so worker processes see the same data as the main one."""
    from sparsedet.cli import _prepare_training
    from sparsedet.engine.trainer import Trainer
    losses = []
    for workers in (0, 2):
        cfg, model, train_set, _ = _prepare_training("dino_tiny", None, TINY + [
            f"data.num_workers={workers}", "train.max_steps=3", "train.log_every=1"], {"train": synth["train"]})
        trainer = Trainer(model, cfg, train_set, None, tmp_path / f"w{workers}", progress=False)
        trainer.fit()
        losses.append([r["loss"] for r in trainer.history])
    assert losses[0] == losses[1] and len(losses[0]) == 3
