"""One CLI grammar: positional key=value overrides in every verb that builds a model (the old
--set still works, with a deprecation warning), "did you mean" for a mistyped preset before
anything else prints, whole preset descriptions, and bench's default size from the model."""
import json

import pytest

from sparsedet.cli import main, parse_args
from sparsedet.presets import PRESETS


def test_bench_takes_positional_overrides_and_the_tiny_presets_own_size(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "sparse_detr_tiny", "--runs", "0", "encoder.keep_ratio=0.3", "--json", str(out),
                 "num_classes=3"]) == 0  # an override after an option too
    row = json.loads(out.read_text())["results"][0]
    assert row["overrides"] == {"encoder.keep_ratio": 0.3, "num_classes": 3}
    assert row["size"] == [256, 341]  # short side eval_size 256, 4:3, under eval_max_size 384
    assert "sparse_detr_tiny  256x341" in capsys.readouterr().out


def test_set_is_a_deprecated_spelling_of_the_positional_overrides(tmp_path):
    out = tmp_path / "bench.json"
    with pytest.warns(FutureWarning, match="--set is deprecated.*positional key.sub=value"):
        assert main(["bench", "sparse_detr_tiny", "--runs", "0", "--size", "64x64", "--set",
                     "encoder.keep_ratio=0.3", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["results"][0]["overrides"] == {"encoder.keep_ratio": 0.3}


def test_viz_parses_positional_overrides():
    args = parse_args(["viz", "dino_tiny", "photo.png", "--out", "o", "num_classes=3", "--layer", "1", "dropout=0"])
    assert args.overrides == ["num_classes=3", "dropout=0"] and args.image == "photo.png"


@pytest.mark.parametrize("argv", [
    ["bench", "dino_tinny", "--runs", "0"],
    ["viz", "dino_tinny", "IMAGE", "--out", "OUT"],
    ["export", "dino_tinny", "--out", "OUT/m.onnx"],
])
def test_a_mistyped_preset_gets_did_you_mean_before_anything_prints(argv, tmp_path, capsys):
    image = tmp_path / "photo.png"
    from PIL import Image
    Image.new("RGB", (32, 32)).save(image)
    argv = [str(image) if a == "IMAGE" else a.replace("OUT", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # not the environment table, not a progress line
    assert "'dino_tinny' is neither a run folder nor a preset name; did you mean dino_tiny" in captured.err


def test_presets_prints_whole_descriptions(capsys):
    assert main(["presets"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for name, fn in PRESETS.items():
        assert f"{name} {' '.join(fn.__doc__.split())}" in text


def test_a_mistyped_zoo_name_gets_did_you_mean(tmp_path, capsys):
    assert main(["predict", "--weights", "dino_r50_12epp", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "'dino_r50_12epp' is neither a run folder nor a zoo name; did you mean dino_r50_12ep" in \
        capsys.readouterr().err


def test_viz_refuses_an_onnx_file(tmp_path, capsys):
    image = tmp_path / "photo.png"
    from PIL import Image
    Image.new("RGB", (32, 32)).save(image)
    assert main(["viz", str(tmp_path / "m.onnx"), str(image), "--out", str(tmp_path / "o")]) == 2
    assert "is an ONNX file, which keeps no tokens or sampling points to draw" in capsys.readouterr().err
