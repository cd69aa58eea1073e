"""The training engine: exact resume after SIGKILL, atomic checkpoints, two-process Gloo DDP,
bad data, mixed precision, fine-tuning onto new classes, schedules, EMA and the sampler."""
import dataclasses
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
from sparsedet.presets import PRESETS, get_preset
from tiny import TINY

LOSS_KEYS = ("loss", "loss_cls", "loss_bbox", "loss_giou")


def _cli(argv: list[str], before: str = "", env: dict | None = None) -> subprocess.CompletedProcess:
    """`sparsedet ARGV` in a fresh Python process; ``before`` runs first (test hooks); ``env`` adds
    variables."""
    code = before + f"\nimport sys\nfrom sparsedet.cli import main\nsys.exit(main({argv!r}))\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {}),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run: Path) -> dict[int, tuple]:
    return {r["step"]: tuple(r[k] for k in LOSS_KEYS) for r in _log(run) if "loss" in r}


KILL_AT_STEP = """
import os, signal
from sparsedet.engine.hooks import LogSteps
_log = LogSteps._log
def _killing(self, trainer):
    _log(self, trainer)
    if trainer.step == {step}:
        os.kill(os.getpid(), signal.SIGKILL)
LogSteps._log = _killing
"""


# On a GPU, bit-identical runs need deterministic kernels (the gather backend's value gradient and
# the losses' index_put accumulate with atomics otherwise); cuBLAS needs a fixed workspace for them.
DETERMINISTIC = "import torch\ntorch.use_deterministic_algorithms(True, warn_only=True)\n"


@pytest.mark.gpu
def test_sigkilled_run_resumes_exactly(synth, tmp_path, device):
    args = ["train", "--preset", "dino_tiny", "--train", synth["train"], "--no-progress", *TINY,
            "train.max_steps=8", "train.log_every=1", "train.checkpoint_every=3", "train.seed=5",
            "model.dropout=0.1", "train.threads=1", "--device", str(device)]  # dropout: the RNG state must be restored
    exact = (DETERMINISTIC, {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}) if device.type == "cuda" else ("", {})
    whole = _cli(args + ["--out", str(tmp_path / "whole")], *exact)
    assert whole.returncode == 0, whole.stderr
    killed = _cli(args + ["--out", str(tmp_path / "cut")], exact[0] + KILL_AT_STEP.format(step=5), exact[1])
    assert killed.returncode == -9, killed.stderr
    assert latest_checkpoint(tmp_path / "cut").name == "step_00000003"
    assert max(_losses(tmp_path / "cut")) == 5  # steps 4 and 5 were logged after the checkpoint

    resumed = _cli(["train", "--resume", str(tmp_path / "cut"), "--no-progress"], *exact)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout and "at step 3" in resumed.stdout
    expected, got = _losses(tmp_path / "whole"), _losses(tmp_path / "cut")
    assert sorted(got) == list(range(1, 9))
    assert got == expected  # bit-identical losses from step 4 on (and before)
    _, a = load_run(tmp_path / "whole")
    _, b = load_run(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.gpu
def test_torchrun_of_one_process_trains_in_a_group_of_one(synth, tmp_path, device):
    """torchrun with one process joins a process group of one, NCCL on a GPU (Gloo on a CPU), and
    trains through DDP and the collectives as a one-GPU node of a larger run would."""
    if "SPARSEDET_TEST_DEVICE" not in os.environ:
        pytest.skip("on a CPU the two-process Gloo test covers the group's code; SPARSEDET_TEST_DEVICE=cpu (or "
                    "cuda) runs this one")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "sparsedet",
            "train", "--preset", "dino_tiny", "--train", synth["train"], "--no-progress", "--out", str(tmp_path / "run"),
            "--device", str(device), *TINY, "train.max_steps=1", "train.threads=1"]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    backend = "nccl" if device.type == "cuda" else "gloo"
    assert f"{device.type}{':0' if device.type == 'cuda' else ''} x 1 process ({backend})" in done.stdout, done.stdout
    assert [r["step"] for r in _log(tmp_path / "run") if "loss" in r] == [1]
    assert latest_checkpoint(tmp_path / "run") is not None


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


KNOWN_DETECTIONS = '''
def known_detections(gt, image_id, category_ids):
    """Detections made from image ``image_id``'s ground truth, worse on later images: its boxes
    shifted right by 3 * image_id px, scored 0.9 - image_id / 10 (minus k / 100 for the k-th), and
    one false positive (another class on its first box) scored 0.955 - image_id / 5."""
    import torch
    anns = [a for a in gt["annotations"] if a["image_id"] == image_id]
    shift = 3.0 * image_id
    boxes = [[x + shift, y, x + w + shift, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
    labels = [category_ids.index(a["category_id"]) for a in anns]
    scores = [0.9 - image_id / 10 - k / 100 for k in range(len(anns))]
    if anns:
        x, y, w, h = anns[0]["bbox"]
        boxes.append([x, y, x + w, y + h])
        labels.append((labels[0] + 1) % len(category_ids))
        scores.append(0.955 - image_id / 5)
    return {"boxes": torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4), "scores": torch.tensor(scores),
            "labels": torch.tensor(labels, dtype=torch.long)}
'''

# Evaluation scores the detections above instead of the barely trained model's (whose AP is 0):
# the sharding over processes, the gathering and the scoring stay the engine's own.
KNOWN_DETECTIONS_HOOK = KNOWN_DETECTIONS + '''
from sparsedet.engine.evaluator import Evaluator
_update = Evaluator.update
def _known(self, image_ids, detections):
    _update(self, image_ids, [known_detections(self.gt, int(i), self.category_ids) for i in image_ids])
Evaluator.update = _known
'''


def test_two_gloo_processes_take_the_step_one_process_takes_with_the_global_batch(synth, tmp_path):
    """What DDP promises, checked after one step: 2 Gloo processes x batch 1 compute the gradients
    of 1 process x batch 2 on the same two images (to 1e-5 of the largest), end with its weights (to
    2e-5, 1/20 of the step lr = 4e-4) and log its losses. That is exact only where nothing but the
    process count differs between the two launches, so this test trains with frozen batch norm
    (trainable BN normalises each process's own batch), no dropout and no denoising queries (random
    draws differ per process; the denoising groups depend on the batch's largest box count), no
    warm-up (its first step's lr is tiny) and two images of the same size (the same padding, no crop
    in the tiny presets). The engine supplies the rest: one global sample order sliced by rank and
    one augmentation seed per sample. The images hold 5 and 2 boxes, so a loss normalised by each
    process's own box count would weigh them differently (the engine normalises by the mean count
    over processes, and DDP averages the gradients). The first global batch is two unreadable
    images, which both launches skip.

    Evaluation: each process scores its half of the val images and process 0 gathers them. Detections
    made from the ground truth (KNOWN_DETECTIONS) stand in for the model's, so that the AP is clearly
    above 0 and differs from either half's; the gathered AP must equal the single process's."""
    from sparsedet.cli import _prepare_training
    from sparsedet.engine.evaluator import evaluate_coco
    seed = get_preset("dino_tiny").train.seed
    data = json.loads(Path(synth["train"]).read_text())
    by_id = {img["id"]: img for img in data["images"]}
    assert all((by_id[i]["width"], by_id[i]["height"]) == (128, 128) for i in (3, 4, 6, 7))
    boxes = {i: sum(a["image_id"] == i for a in data["annotations"]) for i in (3, 7)}
    assert boxes == {3: 5, 7: 2}
    # The global order of a 4-image set: its first batch gets the unreadable images 4 and 6, its second 3 and 7.
    first, second = ([i for i, _ in batch] for batch in list(GroupedBatchSampler([0] * 4, 2, seed))[:2])
    slots = dict(zip(first + second, (4, 6, 3, 7)))
    data["images"] = [by_id[slots[k]] for k in range(4)]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in (3, 7)]
    root = tmp_path / "data"
    shutil.copytree(Path(synth["root"]) / "images", root / "images")
    for i in (4, 6):
        (root / by_id[i]["file_name"]).write_bytes(b"not an image")
    ann = root / "train.json"
    ann.write_text(json.dumps(data))
    overrides = [*TINY, "train.max_steps=1", "train.log_every=1", "train.eval_every=-1", "train.threads=1",
                 "train.warmup_steps=0", "model.backbone.norm=frozen_bn", "model.dn_queries=0", "model.dropout=0.0"]
    launch = tmp_path / "launch.py"
    launch.write_text(KNOWN_DETECTIONS_HOOK + "\nimport sys\nfrom sparsedet.cli import main\n"
                                              "sys.exit(main(sys.argv[1:]))\n")
    argv = ["train", "--preset", "dino_tiny", "--train", str(ann), "--val", synth["val"], "--no-progress", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, str(launch), *argv, "--out", str(tmp_path / "one"),
                             "train.batch_size=2"], capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(launch), *argv, "--out", str(tmp_path / "two"), "train.batch_size=1"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "unreadable" in single.stderr and "unreadable" in ddp.stderr

    # The same losses: each process divides its sum by the mean box count (7 / 2), so their mean is
    # the single process's sum over both images divided by 7.
    one, two = ([r for r in _log(tmp_path / run) if "loss" in r] for run in ("one", "two"))
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1]
    for key in LOSS_KEYS:
        assert two[0][key] == pytest.approx(one[0][key], rel=1e-5, abs=1e-7), key

    # The same gradients: Adam's first moment after one step, 0.1 x the (clipped) gradient, read from
    # each run's checkpoint; to 1e-5 of the largest.
    moments = [load_train_state(latest_checkpoint(tmp_path / run))["optimizer"]["state"] for run in ("one", "two")]
    assert moments[0].keys() == moments[1].keys()
    scale = max(m["exp_avg"].abs().max().item() for m in moments[0].values())
    for k in moments[0]:
        torch.testing.assert_close(moments[1][k]["exp_avg"], moments[0][k]["exp_avg"], rtol=0, atol=1e-5 * scale)
    # The same weights. Adam's first step moves every weight with a gradient by lr * g / (|g| + 1e-8),
    # about lr = 4e-4: a gradient of another sign misses by up to 2 * lr. atol 2e-5 = lr / 20, because
    # where |g| is near 1e-8 float noise in g moves the step by a few % of lr (1 % seen).
    lr = 4e-4
    _, model, _, _ = _prepare_training("dino_tiny", None, overrides, {"train": str(ann), "val": synth["val"]})
    start = model.state_dict()
    (_, a), (_, b) = load_run(tmp_path / "one"), load_run(tmp_path / "two")
    assert a.keys() == b.keys() == start.keys()
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    assert 0.5 * lr < moved < 2 * lr, moved
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=lr / 20, msg=lambda m: f"{k}: {m}")

    # Evaluation gathered from both processes = evaluation in one.
    gathered = json.loads((tmp_path / "two" / "metrics.json").read_text())
    alone = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert gathered["AP"] == pytest.approx(alone["AP"], abs=1e-12)
    assert gathered["AR100"] == pytest.approx(alone["AR100"], abs=1e-12)
    scope: dict = {}
    exec(KNOWN_DETECTIONS, scope)
    gt = json.loads(Path(synth["val"]).read_text())
    category_ids = [c["id"] for c in gt["categories"]]

    def ap(image_ids):
        results = []
        for i in image_ids:
            d = scope["known_detections"](gt, i, category_ids)
            for (x0, y0, x1, y1), s, label in zip(d["boxes"].tolist(), d["scores"].tolist(), d["labels"].tolist()):
                results.append({"image_id": i, "category_id": category_ids[label], "bbox": [x0, y0, x1 - x0, y1 - y0],
                                "score": s})
        return evaluate_coco(gt, results, per_class=False)["AP"]

    ids = [img["id"] for img in gt["images"]]
    assert alone["AP"] == pytest.approx(ap(ids), abs=1e-6) and 0.2 < alone["AP"] < 0.9
    assert min(abs(ap(ids[rank::2]) - alone["AP"]) for rank in (0, 1)) > 0.02  # neither half alone passes


def test_loss_normalisers_are_means_over_processes():
    """Under torchrun each process divides its loss sums by the mean count over processes (DDP then
    averages the gradients: the global batch's sum over its global count): the box count of every
    box term and Salience DETR's count of positive tokens alike. A second process holding 10 of each
    is simulated; each term must scale by local count / mean count."""
    from sparsedet.data.batch import Batch
    from sparsedet.losses.criterion import SetCriterion
    from sparsedet.models.detector import DetectionTransformer
    torch.manual_seed(0)
    cfg = get_preset("salience_detr_tiny")
    apply_overrides(cfg, {"num_classes": 3, "hidden_dim": 64, "ffn_dim": 64, "num_decoder_layers": 1,
                          "num_queries": 20, "dn_queries": 6, "backbone.width": 8, "encoder.fusion": False})
    model = DetectionTransformer(cfg.model).train()
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.5, 0.6]])},
               {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4]])}]
    out = model(Batch(torch.rand(2, 3, 128, 128), torch.zeros(2, 128, 128, dtype=torch.bool)), targets)
    alone = SetCriterion.for_model(cfg.model)(out, targets)
    counts = []

    def mean_over_processes(value, device):  # the other process holds 10 boxes and 10 positive tokens
        counts.append(value)
        return (value + 10) / 2

    shared = SetCriterion.for_model(cfg.model, mean_over_processes)(out, targets)
    assert len(counts) == 2 and counts[0] == 3 and counts[1] > 0  # boxes, then positive tokens
    assert shared.keys() == alone.keys() and "loss_select" in alone and "loss_bbox_dn" in alone
    for key in alone:
        count = counts[1] if key == "loss_select" else counts[0]
        expected = alone[key] * count / ((count + 10) / 2)
        assert shared[key].item() == pytest.approx(expected.item(), rel=1e-5), key


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
    from sparsedet.engine.build import build_trainer
    cfg = apply_overrides(get_preset("dino_tiny"), TINY + ["train.max_steps=8", "train.log_every=1"])
    with pytest.warns(UserWarning) as record:
        from sparsedet.cli import _prepare_training
        cfg, model, train_set, _ = _prepare_training("dino_tiny", None, TINY + ["train.max_steps=8"],
                                                     {"train": str(ann)})
        trainer = build_trainer(model, cfg, train_set, None, tmp_path / "run", progress=False)
        trainer.fit()
    messages = [str(w.message) for w in record]
    assert train_set.num_degenerate == 2 and any("dropped 2 degenerate" in m for m in messages)
    assert trainer.step == 8
    # 8 steps of 2 images = 2 epochs of the 8 images: each corrupt image was met twice.
    assert trainer.skipped_images == 4 and any("skipped 4 unreadable images" in m for m in messages)
    assert sum("skipping image id" in m for m in messages) == 4


def test_nonfinite_losses_skip_steps_then_stop_keeping_the_checkpoint(synth, tmp_path, monkeypatch):
    from sparsedet.engine.build import build_trainer
    from sparsedet.cli import _prepare_training
    cfg, model, train_set, _ = _prepare_training("dino_tiny", None, TINY + [
        "train.max_steps=20", "train.checkpoint_every=2", "train.max_nonfinite=3"], {"train": synth["train"]})
    trainer = build_trainer(model, cfg, train_set, None, tmp_path / "run", progress=False)
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


def test_train_amp_is_a_deprecated_alias_of_train_precision(tmp_path):
    def warns_once(set_amp) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            set_amp()
        assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == [
            "train.amp is deprecated and will be removed; use train.precision (train.amp='none' is "
            "train.precision='fp32')"]

    for set_amp in (lambda c: apply_overrides(c, ["train.amp=none"]),       # CLI override
                    lambda c: apply_overrides(c, {"train.amp": "none"}),     # Python override
                    lambda c: setattr(c.train, "amp", "none")):              # Python attribute
        config = get_preset("dino_tiny")
        assert config.train.precision == "auto"
        warns_once(lambda: set_amp(config))
        assert config.train.precision == "fp32" and "amp" not in config.to_dict()["train"]
    with pytest.warns(FutureWarning), pytest.raises(SparsedetError, match="train.precision='fp8'.*fp16 or auto"):
        apply_overrides(get_preset("dino_tiny"), ["train.amp=fp8"])
    # A run folder written before the rename: its config.json has "amp" and no "precision".
    run = tmp_path / "old_run"
    Detector.from_preset("dino_tiny", num_classes=3, hidden_dim=32, ffn_dim=32, num_encoder_layers=1,
                         num_decoder_layers=1).save_pretrained(run)
    raw = json.loads((run / "config.json").read_text())
    del raw["train"]["precision"]
    raw["train"]["amp"] = "none"
    (run / "config.json").write_text(json.dumps(raw))
    loaded = []
    warns_once(lambda: loaded.append(Detector.from_pretrained(run)))
    assert loaded[0].run_config.train.precision == "fp32"


# Every tiny preset in every precision where a test device is named (SPARSEDET_TEST_DEVICE=cuda, or
# =cpu for all of them on a CPU); three in the default CPU run, whose other tests train every preset
# in fp32 (test_overfit.py) and DINO in bf16 and fp16 (test_mixed_precision_trains_on_cpu).
STEP_CASES = ([(p, precision) for p in PRESETS if p.endswith("_tiny") for precision in ("fp32", "bf16", "fp16")]
              if "SPARSEDET_TEST_DEVICE" in os.environ else
              [("conditional_detr_tiny", "fp32"), ("deformable_detr_tiny", "bf16"), ("dino_tiny", "fp16")])


@pytest.mark.gpu
@pytest.mark.parametrize("preset,precision", STEP_CASES)
def test_one_training_step_per_tiny_preset_and_precision(preset, precision, synth, tmp_path, device):
    """One optimiser step of every tiny preset (at tiny widths) in every training precision, fp16
    with its loss scaler, on the test device: model, batches and optimiser state stay on it."""
    from sparsedet.cli import _prepare_training
    from sparsedet.engine.build import build_trainer
    one_layer = ["model.encoder.layer_ratios=[0.5]"] if preset.startswith(("focus", "salience")) else []
    cfg, model, train_set, _ = _prepare_training(preset, None, TINY + one_layer + [
        f"train.precision={precision}", f"train.device={device}", "train.tensorboard=false"], {"train": synth["train"]})
    trainer = build_trainer(model, cfg, train_set, None, tmp_path / "run", progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no native bf16" where the CPU has none
        terms = trainer.run_step((batch, targets) for batch, targets, _ in trainer.loader)
    assert trainer.step == 1 and math.isfinite(terms["loss"]), terms
    assert trainer.autocast_dtype == {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision] or (
        precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported())
    assert trainer.scaler.is_enabled() == (precision == "fp16")
    assert {p.device.type for p in model.parameters()} == {device.type}
    assert {s.device.type for state in trainer.optimizer.state.values() for s in state.values()
            if torch.is_tensor(s) and s.dim()} == {device.type}
    changed = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert len(changed) > 10


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu(synth, tmp_path, precision):
    from sparsedet.cli import _prepare_training
    from sparsedet.engine.build import build_trainer
    cfg, model, train_set, _ = _prepare_training("dino_tiny", None, TINY + [f"train.precision={precision}",
                                                 "train.max_steps=3", "train.log_every=1"], {"train": synth["train"]})
    trainer = build_trainer(model, cfg, train_set, None, tmp_path / "run", progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no native bf16" where the CPU has none
        trainer.fit()
    assert trainer.autocast_dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert trainer.scaler.is_enabled() == (precision == "fp16")
    assert all(math.isfinite(r["loss"]) for r in trainer.log.history)
    changed = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert len(changed) > 10


def test_ema_accumulation_and_tensorboard(synth, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--preset", "dino_tiny", "--train", synth["train"], "--val", synth["val"], "--no-progress",
                 "--out", str(run), *TINY, "train.batch_size=1", "train.accumulate=2", "train.max_steps=3",
                 "train.ema=true", "train.log_every=1"]) == 0
    state = load_train_state(latest_checkpoint(run))
    assert state["trainer"]["step"] == 3 and state["data"]["batch_in_epoch"] == 6  # two micro-batches a step
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
    from sparsedet.engine.build import build_trainer
    losses = []
    for workers in (0, 2):
        cfg, model, train_set, _ = _prepare_training("dino_tiny", None, TINY + [
            f"data.num_workers={workers}", "train.max_steps=3", "train.log_every=1"], {"train": synth["train"]})
        trainer = build_trainer(model, cfg, train_set, None, tmp_path / f"w{workers}", progress=False)
        trainer.fit()
        losses.append([r["loss"] for r in trainer.log.history])
    assert losses[0] == losses[1] and len(losses[0]) == 3


def _signal_at(monkeypatch, step: int, *signums: int) -> None:
    """Send ``signums`` to this process right after step ``step`` is logged (needs train.log_every=1)."""
    from sparsedet.engine.hooks import LogSteps
    log = LogSteps._log

    def signalling(self, trainer):
        log(self, trainer)
        if trainer.step == step:
            for signum in signums:
                os.kill(os.getpid(), signum)

    monkeypatch.setattr(LogSteps, "_log", signalling)


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(synth, tmp_path, capsys, monkeypatch):
    import signal
    args = ["train", "--preset", "dino_tiny", "--train", synth["train"], "--no-progress", *TINY,
            "train.max_steps=5", "train.log_every=1", "train.seed=5", "model.dropout=0.1"]
    assert main(args + ["--out", str(tmp_path / "whole")]) == 0
    handler = signal.getsignal(signal.SIGINT)
    _signal_at(monkeypatch, 3, signal.SIGINT)
    assert main(args + ["--out", str(tmp_path / "cut")]) == 130
    assert signal.getsignal(signal.SIGINT) is handler  # the trainer's handlers are gone again
    err = capsys.readouterr().err
    assert "interrupted by SIGINT at step 3" in err and f"sparsedet train --resume {tmp_path / 'cut'}" in err
    assert latest_checkpoint(tmp_path / "cut").name == "step_00000003"  # no periodic checkpoint before step 5
    assert load_train_state(latest_checkpoint(tmp_path / "cut"))["trainer"]["step"] == 3
    assert max(_losses(tmp_path / "cut")) == 3

    monkeypatch.undo()
    assert main(["train", "--resume", str(tmp_path / "cut"), "--no-progress"]) == 0
    assert "at step 3" in capsys.readouterr().out
    expected, got = _losses(tmp_path / "whole"), _losses(tmp_path / "cut")
    assert sorted(got) == list(range(1, 6)) and got == expected  # bit-identical, steps 4 and 5 included
    _, a = load_run(tmp_path / "whole")
    _, b = load_run(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_saves_and_exits_143_and_a_second_signal_quits_at_once(synth, tmp_path, capsys, monkeypatch):
    import signal
    args = ["train", "--preset", "dino_tiny", "--train", synth["train"], "--no-progress", *TINY,
            "train.max_steps=3", "train.log_every=1"]
    _signal_at(monkeypatch, 1, signal.SIGTERM)
    assert main(args + ["--out", str(tmp_path / "term")]) == 143
    assert "interrupted by SIGTERM at step 1" in capsys.readouterr().err
    assert load_train_state(latest_checkpoint(tmp_path / "term"))["trainer"]["step"] == 1

    _signal_at(monkeypatch, 1, signal.SIGINT, signal.SIGINT)  # twice: quit without saving
    assert main(args + ["--out", str(tmp_path / "twice")]) == 130
    assert capsys.readouterr().err.rstrip().endswith("interrupted")
    assert latest_checkpoint(tmp_path / "twice") is None


def test_resume_and_fine_tuning_keep_preset_and_source(synth, tmp_path):
    run = tmp_path / "run"
    args = ["--train", synth["train"], "--no-progress", *TINY, "train.max_steps=1"]
    assert main(["train", "--preset", "dino_tiny", "--out", str(run), *args]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["preset"] == "dino_tiny"
    config["source"] = "official-dino: checkpoint.pth"  # as if the run had started from converted weights
    (run / "config.json").write_text(json.dumps(config))
    assert main(["train", "--resume", str(run), "--no-progress", "train.max_steps=2"]) == 0
    resumed = json.loads((run / "config.json").read_text())
    assert (resumed["preset"], resumed["source"]) == ("dino_tiny", "official-dino: checkpoint.pth")
    assert resumed["train"]["max_steps"] == 2
    assert main(["train", "--weights", str(run), "--out", str(tmp_path / "tuned"), *args]) == 0
    tuned = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert (tuned["preset"], tuned["source"]) == ("dino_tiny", "official-dino: checkpoint.pth")


@pytest.mark.skipif(os.name != "posix", reason="file modes")
def test_run_files_honour_the_umask(tmp_path):
    import stat

    from sparsedet.config import Config
    from sparsedet.engine.checkpoint import atomic_write, publish, save_checkpoint
    old = os.umask(0o027)
    try:
        checkpoint = save_checkpoint(tmp_path, "step_00000001", {"w": torch.zeros(2)}, Config(), {"step": 1},
                                     ema_state={"w": torch.ones(2)})
        publish(checkpoint, tmp_path)
        atomic_write(tmp_path / "metrics.json", lambda p: Path(p).write_text("{}"))
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(checkpoint) == 0o750
    files = [*checkpoint.iterdir(), *(tmp_path / n for n in ("model.safetensors", "ema.safetensors", "config.json",
                                                             "metrics.json"))]
    assert len(files) == 8 and {p.name: mode(p) for p in files} == {p.name: 0o640 for p in files}


def test_no_progress_logs_plain_lines_evaluations_and_a_start_up_summary(synth, tmp_path, capsys):
    assert main(["train", "--preset", "dino_tiny", "--train", synth["train"], "--val", synth["val"], "--no-progress",
                 "--out", str(tmp_path / "run"), *TINY, "train.log_every=1", "train.eval_every=-1"]) == 0
    out = capsys.readouterr().out
    boxes = {split: len(json.loads(Path(synth[split]).read_text())["annotations"]) for split in ("train", "val")}
    assert f"train    8 images, {boxes['train']} boxes ({synth['train']})" in out
    assert f"val      4 images, {boxes['val']} boxes ({synth['val']})" in out
    assert f"classes  5: {', '.join(synth['classes'])}" in out
    assert "device   cpu x 1 process, fp32 (train.precision=fp32)" in out
    assert "plan     2 steps (train.max_steps=2)" in out
    assert "step 1/2  epoch 0  loss " in out and "step 2/2  epoch 0  loss " in out
    assert "AP50" in out and "class" in out  # the evaluation table
    assert out.index("plan") < out.index("step 1/2") < out.index("AP50")


def test_start_up_summary_explains_an_epoch_plan(synth, tmp_path):
    from sparsedet.data.datasets import make_datasets
    from sparsedet.engine.build import build_trainer
    config = apply_overrides(get_preset("dino_tiny"), [*TINY, f"data.train={synth['train']}", "train.max_steps=0",
                                                       "train.epochs=3", "train.minutes=5"])
    config, train_set, _ = make_datasets(config)
    config.model.num_classes = len(train_set.classes)
    trainer = build_trainer(Detector.from_config(config), config, train_set, None, tmp_path / "run", progress=False)
    summary = trainer.summary()
    assert "val      none: no evaluation" in summary
    assert ("plan     at most 12 steps = 3 epochs (train.epochs, train.max_steps=0) x 4 steps (8 images / 2 per "
            "step) or 5 min of training (train.minutes), whichever ends first") in summary


def test_fine_tuning_plans_the_presets_schedule_not_the_runs(synth, tmp_path):
    """A demo run (train.max_steps=1000000, train.minutes=10) fine-tuned: the model from the run, the
    schedule from its preset's defaults (else TrainConfig's), the recorded threshold chosen again."""
    from sparsedet.cli import _prepare_training, _training_origin
    from sparsedet.config import TrainConfig
    from sparsedet.data.datasets import make_datasets
    from sparsedet.engine.build import build_trainer
    run = tmp_path / "demo_run"
    demo = ["train.max_steps=1000000", "train.minutes=10", "train.eval_every=-1", "score_threshold=0.4"]
    config = apply_overrides(get_preset("dino_tiny"), [*TINY, f"data.train={synth['train']}", *demo])
    config, train_set, _ = make_datasets(config)
    config.model.classes, config.model.num_classes = train_set.classes, len(train_set.classes)
    config.model.category_ids = train_set.category_ids
    Detector.from_config(config).save_pretrained(run)

    config, model, train_set, _ = _prepare_training(None, str(run), [], {"train": synth["train"]})
    assert config.train == get_preset("dino_tiny").train and config.model.score_threshold is None
    assert config.model.hidden_dim == 64 and config.data.train_scales == [96]  # the run's model and its sizes
    trainer = build_trainer(model, config, train_set, None, tmp_path / "ft", progress=False,
                            origin=_training_origin(None, str(run), config, []))
    summary = trainer.summary()
    assert f"origin   model from {run}, schedule from preset dino_tiny's defaults\n" in summary
    assert "plan     48 steps = 12 epochs (train.epochs, train.max_steps=0) x 4 steps" in summary

    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**saved, "preset": ""}))  # e.g. a hand-made run
    config, *_ = _prepare_training(None, str(run), ["train.epochs=2"], {"train": synth["train"]})
    assert config.train == dataclasses.replace(TrainConfig(), epochs=2)
    assert _training_origin(None, str(run), config, ["train.epochs=2"]) == (
        f"model from {run}, schedule from the library's defaults (TrainConfig: the run names no preset), then the "
        "overrides given")
