"""The README's error promise: a mistake a user can make gives one `error:` line naming the fix and
exit status 2 (CLI), or a SparsedetError (API); never a traceback or a silent no-op."""
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsedet import Detector, SparsedetError
from sparsedet.cli import main
from sparsedet.config import apply_overrides, validate
from sparsedet.engine.device import resolve_device
from sparsedet.engine.precision import resolve_precision
from sparsedet.presets import get_preset
from tiny import TINY

SMALL = {"hidden_dim": 64, "ffn_dim": 64, "num_encoder_layers": 1, "num_decoder_layers": 1, "num_queries": 10,
         "dn_queries": 4, "eval_size": 64, "eval_max_size": 96, "backbone.width": 8}


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and err.count("\n") == 1
    return err


@pytest.fixture
def cpu_build(monkeypatch):
    """torch as a CPU build sees it, whatever this machine has."""
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return Detector.from_preset("dino_tiny", num_classes=3, **SMALL).eval()


@pytest.mark.parametrize("key, value, must", [
    ("train.batch_size", 0, "at least 1"),
    ("train.lr", -1, "positive"),
    ("train.lr", float("nan"), "positive"),
    ("train.accumulate", 0, "at least 1"),
    ("train.ema_decay", 1.0, "[0, 1)"),
    ("train.lr_drop", 1.5, "[0, 1]"),
    ("train.precision", "fp8", "fp32, bf16, fp16 or auto"),
    ("data.num_workers", -2, "0 (load in the main process) or more"),
])
def test_out_of_range_settings_are_refused_where_they_are_set(key, value, must):
    with pytest.raises(SparsedetError, match=key.replace(".", r"\.")) as e:
        apply_overrides(get_preset("dino_tiny"), {key: value})
    assert must in str(e.value)
    config = get_preset("dino_tiny")  # a Config built in Python is checked too (a Trainer validates it)
    section, name = key.split(".")
    setattr(getattr(config, section), name, value)
    with pytest.raises(SparsedetError, match=key.replace(".", r"\.")):
        validate(config)


def test_train_cli_refuses_bad_settings_with_one_line(synth, tmp_path, capsys):
    base = ["train", "--preset", "dino_tiny", "--train", synth["train"], "--out", str(tmp_path / "r"), "--no-progress"]
    assert "train.batch_size=0 is out of range" in _error(capsys, base + ["train.batch_size=0"])
    assert "train.lr=-1.0 is out of range" in _error(capsys, base + ["train.lr=-1"])
    err = _error(capsys, base + ["encoder.keep_ratio=0.2"])
    assert "model.encoder.keep_ratio has no effect with model.encoder.kind='dense'" in err


def test_train_on_cuda_with_a_cpu_build_names_the_fix(synth, tmp_path, capsys, cpu_build):
    err = _error(capsys, ["train", "--preset", "dino_tiny", "--train", synth["train"], "--out", str(tmp_path / "r"),
                          "--no-progress", *TINY, "train.device=cuda"])
    assert "CUDA is not available in this torch build" in err and "use train.device=cpu" in err


def test_resolve_device(monkeypatch, cpu_build):
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(SparsedetError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    with pytest.raises(SparsedetError, match=r"CUDA is not available in this torch build \(torch .*\); use x"):
        resolve_device("cuda", fix="x")
    monkeypatch.setattr(torch.version, "cuda", "12.4")  # a CUDA build on a machine without a visible GPU
    with pytest.raises(SparsedetError, match="sees no CUDA device"):
        resolve_device(torch.device("cuda:0"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device(0) == torch.device("cuda", 0)
    with pytest.raises(SparsedetError, match="cuda:3 asked for, but torch sees 1 CUDA device"):
        resolve_device("cuda:3")


def test_api_device_errors_name_the_fix(tiny_model, tmp_path, cpu_build):
    for move in (lambda m: m.to("cuda"), lambda m: m.to(device="cuda"), lambda m: m.cuda()):
        with pytest.raises(SparsedetError, match=r"CUDA is not available .*use \.to\('cpu'\)"):
            move(tiny_model)
    assert tiny_model.to("cpu") is tiny_model  # what the machine has, and dtype moves, still work
    assert tiny_model.to(torch.float64).heads.box_embed[0].layers[0].weight.dtype == torch.float64
    tiny_model.to(torch.float32).save_pretrained(tmp_path / "run")
    with pytest.raises(SparsedetError, match="use map_location='cpu'"):
        Detector.from_pretrained(tmp_path / "run", map_location="cuda")


def test_bf16_on_a_gpu_without_it_warns(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    for training in (True, False):
        with pytest.warns(UserWarning, match="no bf16; running in fp32"):
            assert resolve_precision("bf16", torch.device("cuda"), training) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "auto" chooses fp32 quietly
        assert resolve_precision("auto", torch.device("cuda"), training=True) is None


def test_thresholds_and_top_k_out_of_range_are_refused(tiny_model, tmp_path, capsys):
    image = np.zeros((32, 32, 3), np.uint8)
    for threshold in (2, -1, float("nan")):
        with pytest.raises(SparsedetError, match=r"threshold must be a score in \[0, 1\]"):
            tiny_model.predict(image, threshold=threshold)
    with pytest.raises(SparsedetError, match="top_k must be"):
        tiny_model.predict(image, top_k=0)
    assert len(tiny_model.predict(image, threshold=1.0)[0]["scores"]) == 0  # the bounds themselves are fine
    tiny_model.save_pretrained(tmp_path / "run")
    for value in ("2", "-1"):
        err = _error(capsys, ["predict", "--weights", str(tmp_path / "run"), str(tmp_path), "--out",
                              str(tmp_path / "out"), "--threshold", value])
        assert "threshold must be a score in [0, 1]" in err
    assert not (tmp_path / "out").exists()


def test_image_arrays_must_say_what_they_hold(tiny_model):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 48, 3))
    expected = tiny_model.preprocess([pixels.astype(np.uint8)])[0].images
    for same in (pixels.astype(np.float32) / 255, pixels.astype(np.int64),
                 torch.from_numpy(pixels.astype(np.uint8)).permute(2, 0, 1)):
        torch.testing.assert_close(tiny_model.preprocess([same])[0].images, expected)
    with pytest.raises(SparsedetError, match=r"must be RGB in \[0, 1\], got values 0\.\.255; .*divide it by 255"):
        tiny_model.predict(pixels.astype(np.float32))  # OpenCV style
    with pytest.raises(SparsedetError, match="before normalisation"):
        tiny_model.predict((pixels / 255 - 0.45) / 0.22)
    with pytest.raises(SparsedetError, match="0..255"):
        tiny_model.predict(pixels * 2)
    with pytest.raises(SparsedetError, match=r"RGB \(H, W, 3\)"):
        tiny_model.predict(pixels.transpose(2, 0, 1).astype(np.uint8))


def test_overrides_that_cannot_take_effect_are_refused(tmp_path):
    with pytest.raises(SparsedetError, match=r"takes model settings only; train\.lr is a training setting"):
        Detector.from_preset("dino_tiny", **{"train.lr": 1e-4})
    with pytest.raises(SparsedetError, match="data.train is a data setting"):
        Detector.from_preset("dino_tiny", **{"data.train": "x.json"})
    with pytest.raises(SparsedetError, match=r"model\.encoder\.keep_ratio has no effect with "
                                              r"model\.encoder\.kind='dense': only sparse and focus read it"):
        Detector.from_preset("dino_tiny", **{"encoder.keep_ratio": 0.2})
    with pytest.raises(SparsedetError, match=r"model\.decoder\.smca has no effect with model\.kind='conditional'"):
        apply_overrides(get_preset("conditional_detr_tiny"), ["decoder.smca=true"])
    config = apply_overrides(get_preset("sparse_detr_tiny"), {"encoder.keep_ratio": 0.3})  # read there: fine
    assert config.model.encoder.keep_ratio == 0.3
    # The kind may be switched in the same call.
    assert apply_overrides(get_preset("dino_tiny"), ["encoder.kind=focus", "encoder.keep_ratio=0.3"])
    torch.manual_seed(0)
    Detector.from_preset("dino_tiny", num_classes=3, **SMALL).save_pretrained(tmp_path / "run")
    with pytest.raises(SparsedetError, match="keep_ratio has no effect"):
        Detector.from_pretrained(tmp_path / "run", **{"encoder.keep_ratio": 0.2})


def test_a_missing_image_path_is_named_as_such(tiny_model, tmp_path):
    with pytest.raises(SparsedetError) as e:
        tiny_model.predict("nope.jpg")
    assert "image not found: nope.jpg" in str(e.value) and "annotation" not in str(e.value)
    with pytest.raises(SparsedetError, match="is a folder"):
        tiny_model.predict(tmp_path)


def test_int8_export_mistakes_are_named_before_any_work(tiny_run, synth, tmp_path, capsys):
    out = tmp_path / "q.onnx"
    export = ["export", str(tiny_run), "--out", str(out)]
    assert "--int8 needs --calibration DATA" in _error(capsys, [*export, "--int8"])
    assert "--calibration belongs to an int8 export" in _error(capsys, [*export, "--calibration", synth["train"]])
    assert "leave out --precision fp16" in _error(capsys, [*export, "--int8", "--calibration", synth["train"],
                                                           "--precision", "fp16"])
    assert "--calibration-images must be at least 1" in _error(
        capsys, [*export, "--int8", "--calibration", synth["train"], "--calibration-images", "0"])
    assert "--max-ap-drop must be within [0, 1]" in _error(
        capsys, [*export, "--int8", "--calibration", synth["train"], "--max-ap-drop", "-0.1"])
    assert "unknown layer group 'decoder'" in _error(
        capsys, [*export, "--int8", "--calibration", synth["train"], "--keep-float", "heads,decoder"])
    # Calibration data with another class table (the synthetic categories renamed).
    other = json.loads(Path(synth["train"]).read_text())
    for c in other["categories"]:
        c["name"] = c["name"].upper()
    other_path = tmp_path / "other.json"
    other_path.write_text(json.dumps(other))
    root = str(Path(synth["train"]).parent)
    err = _error(capsys, [*export, "--int8", "--calibration", str(other_path), "--images", root])
    assert "does not fit the model's classes" in err and "1 (CIRCLE)" in err and "1 (circle)" in err, err
    assert not out.exists() and not list(tmp_path.glob(".q-*"))


def test_a_bad_deform_attn_variable_is_one_error_line(monkeypatch, capsys):
    from sparsedet.ops import deform_attn
    monkeypatch.setattr(deform_attn, "_override", None)  # a set_default_backend choice would hide the variable
    monkeypatch.setenv(deform_attn.ENV, "bogus")
    err = _error(capsys, ["bench", "dino_tiny", "--runs", "0"])
    assert "SPARSEDET_DEFORM_ATTN" in err and "'bogus'" in err and "reference, cpu, gather" in err
    with pytest.raises(SparsedetError, match="unknown deformable-attention backend 'grid'; choose one of"):
        deform_attn.set_default_backend("grid")


def test_model_and_loss_settings_the_model_cannot_use_name_the_fix(tmp_path):
    with pytest.raises(SparsedetError, match=r"model\.hidden_dim=64 does not split among model\.num_heads=6 heads; "
                                              r"set model\.num_heads so that it divides model\.hidden_dim"):
        Detector.from_preset("dino_tiny", num_classes=3, **{**SMALL, "num_heads": 6})
    with pytest.raises(SparsedetError, match="model.num_heads=6"):  # torch's own attention asserted before
        Detector.from_preset("conditional_detr_tiny", num_classes=3, **{**SMALL, "num_heads": 6})
    with pytest.raises(SparsedetError, match=r"model\.loss\.cls_loss='softmax' is out of range: it must be focal, "
                                              r"varifocal or aligned"):
        apply_overrides(get_preset("dino_tiny"), ["loss.cls_loss=softmax"])
    from sparsedet.config import LossConfig
    from sparsedet.losses.criterion import SetCriterion
    with pytest.raises(SparsedetError, match="set model.loss.cls_loss to focal, varifocal or aligned"):
        SetCriterion(3, LossConfig(cls_loss="softmax"))  # built in Python, past validate


def test_api_arguments_out_of_their_choices_name_them(tmp_path, capsys):
    from sparsedet.data.synthetic import write_synthetic
    from sparsedet.tools.convert import convert
    with pytest.raises(SparsedetError, match="unknown checkpoint source 'official-dion'; did you mean official-dino"):
        convert("official-dion", tmp_path / "ckpt.pth")
    assert "n_train (synth --train) must be at least 1, got 0" in _error(
        capsys, ["synth", "--out", str(tmp_path / "d"), "--train", "0"])
    assert "size (synth --size) must be at least 32, got 8" in _error(
        capsys, ["synth", "--out", str(tmp_path / "d"), "--size", "8"])
    with pytest.raises(SparsedetError, match="format .* must be 'coco' or 'yolo'"):
        write_synthetic(tmp_path / "d", format="voc")
    assert not (tmp_path / "d").exists()


def test_the_cli_warning_format_ends_with_main(monkeypatch, capsys):
    import sparsedet.cli as cli
    seen = []

    def command(args):
        seen.append(warnings.formatwarning("slow", UserWarning, "x.py", 1))
        raise SparsedetError("boom")

    before = warnings.formatwarning
    monkeypatch.setitem(cli.COMMANDS, "presets", command)
    assert "boom" in _error(capsys, ["presets"])
    assert seen == ["warning: slow\n"] and warnings.formatwarning is before
    with pytest.warns(UserWarning, match="recorded"):  # a caller recording warnings still gets them
        monkeypatch.setitem(cli.COMMANDS, "presets", lambda args: warnings.warn("recorded") or 0)
        assert main(["presets"]) == 0
