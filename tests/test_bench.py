"""`sparsedet bench`: the JSON a user scripts against, latency protocol, sweeps, the AP-vs-GFLOPs plot."""
import json

import pytest
import torch
from PIL import Image

from sparsedet.api import Detector
from sparsedet.cli import main
from sparsedet.tools.bench import STAGES, bench_model, load_model


def test_latency_split_covers_the_whole_run():
    torch.manual_seed(0)
    r = bench_model(load_model("dino_tiny", {"num_classes": 3}), (96, 128), runs=3, warmup=1)
    lat = r["latency_ms"]
    assert set(lat) == set(STAGES) | {"total"}
    for stats in lat.values():
        assert stats["min"] <= stats["median"] <= stats["max"]
    # Stage medians come from other runs than the whole-model ones, so compare loosely.
    assert sum(lat[s]["median"] for s in STAGES) == pytest.approx(lat["total"]["median"], rel=0.5)
    assert lat["encoder"]["median"] > 0 and lat["backbone"]["median"] > 0
    assert r["gflops"]["total"] == pytest.approx(sum(r["gflops"][s] for s in STAGES))
    assert r["memory_peak"]["mib"] > 0 and r["runs"] == 3


def test_cli_json_sweep_and_plot(tmp_path, capsys):
    runs = []
    for i, preset in enumerate(("sparse_detr_tiny", "deformable_detr_tiny")):
        torch.manual_seed(0)
        run = tmp_path / preset
        Detector.from_preset(preset, num_classes=3).save_pretrained(run)
        (run / "metrics.json").write_text(json.dumps({"AP": 0.2 + 0.1 * i}))
        runs.append(str(run))
    out = tmp_path / "bench.json"
    assert main(["bench", *runs, "--size", "96x128", "--runs", "0", "--json", str(out),
                 "--plot", str(tmp_path / "ap.png")]) == 0
    report = json.loads(out.read_text())
    assert {"torch", "threads", "cpu", "deform_attn_backend", "dtype"} <= set(report["environment"])
    sparse, dense = report["results"]
    assert sparse["gflops"]["encoder"] < dense["gflops"]["encoder"]
    assert sparse["params"] > 0 and len(sparse["encoder_tokens_per_layer"]) == 3
    assert Image.open(tmp_path / "ap.png").size[0] > 0

    out = tmp_path / "sweep.json"
    assert main(["bench", runs[0], "--size", "96x128", "--runs", "1", "--warmup", "0",
                 "--sweep", "keep_ratio=0.2,0.6", "--json", str(out)]) == 0
    low, high = json.loads(out.read_text())["results"]
    assert low["overrides"] == {"encoder.keep_ratio": 0.2}
    assert low["gflops"]["encoder"] < high["gflops"]["encoder"]
    assert low["encoder_tokens_per_layer"][0] < high["encoder_tokens_per_layer"][0]
    assert "median" in low["latency_ms"]["total"]
    assert "sweep of encoder.keep_ratio" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["bench", "no_such_preset", "--runs", "0"], "neither a run folder nor a preset"),
    (["bench", "dino_tiny", "--size", "800"], "HEIGHTxWIDTH"),
    (["bench", "dino_tiny", "--sweep", "keep_ratio"], "KEY=V1,V2"),
    (["bench", "dino_tiny", "--runs", "0", "--plot", "x.png"], "metrics.json"),
    (["bench", "dino_tiny", "--dtype", "fp16", "--device", "cpu"], "fp16 runs on CUDA only"),
])
def test_cli_errors(argv, message, capsys):
    assert main(argv + (["--size", "64x64"] if "--size" not in argv else [])) == 2
    assert message in capsys.readouterr().err
