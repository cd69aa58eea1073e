"""One resolver for "a model" (``sparsedet.resolve``): each kind resolves to its tag with no network,
mistyped names get "did you mean", and every verb refuses, with what it takes, the kinds it does not."""
from pathlib import Path

import pytest
import torch
from PIL import Image

from sparsedet import Detector
from sparsedet.api import load_ref
from sparsedet.cli import main
from sparsedet.errors import SparsedetError
from sparsedet.resolve import KINDS, VERBS, ModelRef, resolve_model

ZOO_NAME = "dino_r50_12ep"
SMALL = {"num_classes": 3, "hidden_dim": 32, "ffn_dim": 32, "num_encoder_layers": 1, "num_decoder_layers": 1,
         "num_queries": 5, "dn_queries": 2, "eval_size": 64, "eval_max_size": 96, "backbone.width": 8}


@pytest.fixture
def offline(monkeypatch):
    """A zoo name that would download fails the test instead."""
    monkeypatch.setattr("sparsedet.tools.zoo.pretrained_run", lambda name: pytest.fail(f"{name} was fetched"))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("resolve") / "run"
    Detector.from_preset("dino_tiny", **SMALL).save_pretrained(path)
    return path


def _example(kind: str, run: Path) -> str:
    return {"run": str(run), "preset": "dino_tiny", "zoo": ZOO_NAME, "exported": str(run.parent / "m.onnx")}[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_resolves_to_its_tag_without_network(kind, run, offline):
    target = _example(kind, run)
    assert resolve_model(target, "bench") == ModelRef(kind, target)
    assert resolve_model(Path(target) if kind in ("run", "exported") else target, "bench").kind == kind


def test_the_suffix_is_told_in_any_case_and_a_path_before_a_name(run, tmp_path, monkeypatch):
    assert resolve_model("MODEL.ONNX", "predict").kind == "exported"  # not yet there: loading says so
    monkeypatch.chdir(tmp_path)
    Path("dino_tiny").mkdir()
    assert resolve_model("dino_tiny", "bench").kind == "run"  # a folder of that name here is what is meant


def test_a_run_loads_its_weights_and_a_preset_its_random_ones(run):
    ref = resolve_model(str(run), "predict")
    assert ref.path() == run
    model = load_ref(ref, device="cpu", overrides={"top_k": 7})
    saved = Detector.from_pretrained(run)
    assert model.config.top_k == 7
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in model.state_dict().items())
    preset = load_ref(resolve_model("dino_tiny", "bench"), device="cpu", overrides=SMALL)
    assert isinstance(preset, Detector) and not preset.training and preset.config.num_classes == 3
    with pytest.raises(SparsedetError, match="a preset name: it has no run folder"):
        resolve_model("dino_tiny", "bench").path()


def test_a_zoo_name_downloads_only_when_its_folder_is_asked_for(run, monkeypatch):
    asked = []
    monkeypatch.setattr("sparsedet.tools.zoo.pretrained_run", lambda name: asked.append(name) or run)
    ref = resolve_model(ZOO_NAME, "eval")
    assert ref == ModelRef("zoo", ZOO_NAME) and asked == []
    assert ref.path() == run and asked == [ZOO_NAME]
    assert isinstance(load_ref(ref, device="cpu"), Detector)


def test_an_exported_file_refuses_what_it_cannot_do_before_it_is_read(tmp_path):
    ref = resolve_model(tmp_path / "m.onnx", "bench")
    for kwargs, message in (({"overrides": {"top_k": 3}}, "computes what it was exported with"),
                            ({"ema": True}, "an .onnx file holds one set"),
                            ({"device": "cuda"}, "runs on the CPU"),
                            ({}, "ONNX file not found")):
        with pytest.raises(SparsedetError, match=message):
            load_ref(ref, **kwargs)


@pytest.mark.parametrize("kind", ["run", "preset", "zoo"])
def test_another_runtime_is_refused_for_what_runs_in_pytorch_before_a_download(kind, run, offline):
    with pytest.raises(SparsedetError, match="--runtime applies to exported .onnx files"):
        load_ref(resolve_model(_example(kind, run), "bench"), runtime="openvino")
    with pytest.raises(SparsedetError, match="unknown runtime 'tensorrt'"):
        resolve_model(_example(kind, run), "bench").check_runtime("tensorrt")


@pytest.mark.parametrize("verb, typo, meant", [
    ("bench", "dino_tinny", "'dino_tinny' is neither a run folder nor a preset name; did you mean dino_tiny"),
    ("viz", "dino_r50_12epp", "nor a preset name; did you mean dino_r50_12ep"),
    ("predict", "dino_r50_12epp",
     "'dino_r50_12epp' is neither a run folder nor a zoo name; did you mean dino_r50_12ep"),
    ("train", "dino_r50_24epp", "did you mean dino_r50_24ep"),
    ("from_pretrained", "dino_r50_36epp", "did you mean dino_r50_36ep"),
])
def test_a_mistyped_name_gets_did_you_mean(verb, typo, meant):
    with pytest.raises(SparsedetError, match=meant):
        resolve_model(typo, verb)


def test_an_unknown_name_is_a_missing_run_folder_where_no_preset_is_taken(tmp_path):
    assert resolve_model(tmp_path / "gone", "eval") == ModelRef("run", str(tmp_path / "gone"))
    with pytest.raises(SparsedetError, match="run folder not found"):
        load_ref(resolve_model(tmp_path / "gone", "eval"), device="cpu")
    with pytest.raises(SparsedetError, match=r"'nothing_like_it' is neither a run folder nor a preset name \(see"):
        resolve_model("nothing_like_it", "bench")


REFUSED = [(verb, kind) for verb, accepts in VERBS.items() for kind in KINDS if kind not in accepts.kinds]


@pytest.mark.parametrize("verb, kind", REFUSED)
def test_each_verb_refuses_a_kind_it_does_not_take_and_says_what_it_takes(verb, kind, run, offline):
    target = _example(kind, run)
    accepts = VERBS[verb]
    with pytest.raises(SparsedetError) as refusal:
        resolve_model(target, verb)
    message = str(refusal.value)
    assert message.startswith(f"{target} ") and message.endswith(f"; {accepts.label} takes {accepts.takes()}")


def test_the_verbs_take_what_their_help_says():
    takes = {verb: set(accepts.kinds) for verb, accepts in VERBS.items()}
    assert takes["eval"] == takes["predict"] == takes["serve"] == takes["load_detector"] == {"run", "zoo", "exported"}
    assert takes["train"] == takes["from_pretrained"] == {"run", "zoo"}
    assert takes["viz"] == takes["export"] == {"run", "preset", "zoo"}
    assert takes["bench"] == takes["export --int8"] == set(KINDS)


def test_the_cli_verbs_refuse_before_any_work(run, tmp_path, capsys, synth, offline):
    image = tmp_path / "photo.png"
    Image.new("RGB", (32, 32)).save(image)

    def refused(argv: list[str], message: str) -> None:
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.startswith(f"error: {message}"), captured

    onnx = str(tmp_path / "m.onnx")
    refused(["train", "--weights", "dino_tiny", "--train", synth["train"], "--out", str(tmp_path / "t")],
            "dino_tiny is a preset name: start from it with --preset")
    refused(["train", "--weights", onnx, "--train", synth["train"], "--out", str(tmp_path / "t")],
            f"{onnx} is an ONNX file, which holds no trainable weights; train --weights takes")
    refused(["predict", "--weights", "dino_tiny", str(image), "--out", str(tmp_path / "p")],
            "dino_tiny is a preset name, with random weights")
    refused(["eval", "--weights", "dino_tiny", "--val", synth["val"]], "dino_tiny is a preset name")
    refused(["viz", onnx, str(image), "--out", str(tmp_path / "v")],
            f"{onnx} is an ONNX file, which keeps no tokens or sampling points to draw; viz takes a run folder, "
            "a preset name or a zoo name")
    refused(["export", onnx, "--out", str(tmp_path / "e.onnx")],
            f"{onnx} is already an ONNX file (export quantises an fp32 one with --int8); export takes")
    with pytest.raises(SparsedetError, match="Detector.from_pretrained takes a run folder or a zoo name"):
        Detector.from_pretrained("dino_tiny")


def test_serve_refuses_a_preset(capsys):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    assert main(["serve", "--weights", "dino_tiny", "--port", "0"]) == 2
    assert "serve --weights takes a run folder, a zoo name or an ONNX file" in capsys.readouterr().err


def test_only_the_resolver_tells_an_exported_file_by_its_name():
    src = Path(__import__("sparsedet").__file__).parent
    telling = [p.relative_to(src).as_posix() for p in src.rglob("*.py") if 'endswith(".onnx")' in p.read_text()]
    assert telling == ["resolve.py"]
