"""`sparsedet bench`: the JSON a user scripts against, latency protocol, each model's own peak
memory, sweeps, the AP-vs-GFLOPs plot."""
import json

import pytest
import torch
from PIL import Image

from sparsedet.api import Detector
from sparsedet.cli import main
from sparsedet.tools.bench import STAGES, bench_model, format_result, load_model, noise_warnings


def test_latency_split_covers_the_whole_run():
    torch.manual_seed(0)
    r = bench_model(load_model("dino_tiny", {"num_classes": 3}), (96, 128), runs=3, warmup=1)
    lat = r["latency_ms"]
    assert set(lat) == set(STAGES) | {"total"}
    for stats in lat.values():
        assert 0 <= stats["min"] <= stats["median"] <= stats["max"]
    assert lat["encoder"]["median"] > 0 and lat["backbone"]["median"] > 0
    assert r["gflops"]["total"] == pytest.approx(sum(r["gflops"][s] for s in STAGES))
    assert r["memory_peak"]["mib"] >= 0 and r["runs"] == 3


@pytest.mark.perf
def test_stage_medians_add_up_to_the_total():
    """Stage medians come from other runs than the whole-model ones: they agree only on a quiet machine."""
    torch.manual_seed(0)
    lat = bench_model(load_model("dino_tiny", {"num_classes": 3}), (96, 128), runs=5, warmup=2)["latency_ms"]
    assert sum(lat[s]["median"] for s in STAGES) == pytest.approx(lat["total"]["median"], rel=0.5)


def _ms(median, low, high):
    return {"median": median, "min": low, "max": high}


def test_noisy_timings_are_flagged_by_spread_and_by_stages_that_do_not_add_up():
    steady = {"backbone": _ms(40, 38, 45), "encoder": _ms(50, 48, 60), "heads": _ms(0.2, 0.05, 0.9),
              "total": _ms(91, 88, 99)}
    assert noise_warnings(steady) == []  # a tiny stage's jitter (0.05 to 0.9 ms) is not judged
    spread = {**steady, "encoder": _ms(50, 30, 66)}
    assert noise_warnings(spread) == ["encoder: slowest run 2.2x the fastest"]
    assert noise_warnings({"total": _ms(100, 45, 85)}) == []  # an exported file: the total alone
    assert noise_warnings({"total": _ms(100, 40, 120)}) == ["total: slowest run 3.0x the fastest"]
    apart = {**steady, "total": _ms(130, 125, 140)}  # stages add up to 90.2 ms
    assert noise_warnings(apart) == ["stage medians add up to 90.2 ms, 31% off the total 130.0 ms (tolerance 25%)"]
    row = {"params": 1, "size": [8, 8], "batch": 1, "precision": "fp32", "encoder_tokens": 4,
           "encoder_tokens_per_layer": [4], "gflops": {name: 0.0 for name in (*STAGES, "total")},
           "latency_ms": {name: _ms(1, 1, 1) for name in (*STAGES, "total")}, "runs": 3, "warmup": 1,
           "memory_peak": {"mib": 1, "kind": "k"}, "noisy": noise_warnings(apart)}
    assert format_result("m", row).splitlines()[-1].endswith("): the machine may be busy; close other work or "
                                                              "raise --runs")


@pytest.mark.perf
def test_cpu_peak_memory_is_each_runs_own():
    """The CPU peak is the RSS increase during the bench's own runs: a small input benched after a
    large one reports far less. The process's lifetime peak RSS, reported before, handed the large
    run's peak on to every later model (and the pytest process's own to both)."""
    torch.manual_seed(0)
    model = load_model("dino_tiny", {"num_classes": 3})
    large = bench_model(model, (448, 448), runs=1, warmup=0)["memory_peak"]
    small = bench_model(model, (64, 64), runs=1, warmup=0)["memory_peak"]
    assert large["kind"] == small["kind"] == "peak RSS increase during the runs"
    assert large["mib"] > 30 and 0 <= small["mib"] < large["mib"] / 5, (large, small)  # seen: 92 and 3
    assert small["rss_before_mib"] > small["mib"]  # the weights, inputs and the rest of the process


@pytest.mark.perf
@pytest.mark.parametrize("high_water_mark", [True, False], ids=["kernel-mark", "sampled"])
def test_peak_rss_counts_what_the_block_added(high_water_mark, monkeypatch):
    """Both ways of reading the peak: the kernel's high-water mark (reset at the start), or samples
    of the RSS in a thread where the kernel refuses the reset."""
    import time

    from sparsedet.tools import bench
    if not high_water_mark:
        monkeypatch.setattr(bench, "_reset_high_water_mark", lambda: False)
    with bench.PeakRss() as large:
        held = torch.ones(64 * 2**20 // 4)  # 64 MiB, written
        time.sleep(0.05)  # held across many samples
        del held
    with bench.PeakRss() as small:
        held = torch.ones(1024)
        time.sleep(0.05)
    assert large.method == ("kernel high-water mark" if high_water_mark else "RSS sampled every 1 ms")
    assert 60 * 2**20 < large.increase < 80 * 2**20, large.increase
    assert 0 <= small.increase < 4 * 2**20, small.increase


def test_cli_json_sweep_and_plot(tmp_path, capsys):
    runs = []
    for i, preset in enumerate(("sparse_detr_tiny", "deformable_detr_tiny")):
        torch.manual_seed(0)
        run = tmp_path / preset
        Detector.from_preset(preset, num_classes=3).save_pretrained(run)
        corr = {"corr": {"mean": 0.5, "per_layer": [0.6, 0.5, 0.4], "images": 4}} if i == 0 else {}
        (run / "metrics.json").write_text(json.dumps({"AP": 0.2 + 0.1 * i, **corr}))
        runs.append(str(run))
    out = tmp_path / "bench.json"
    assert main(["bench", *runs, "--size", "96x128", "--runs", "0", "--json", str(out),
                 "--plot", str(tmp_path / "ap.png")]) == 0
    report = json.loads(out.read_text())
    assert {"torch", "threads", "cpu", "deform_attn_backend", "precision"} <= set(report["environment"])
    sparse, dense = report["results"]
    assert sparse["gflops"]["encoder"] < dense["gflops"]["encoder"]
    assert sparse["params"] > 0 and len(sparse["encoder_tokens_per_layer"]) == 3
    assert Image.open(tmp_path / "ap.png").size == (1080, 480)  # the sparse run's Corr adds a panel

    out = tmp_path / "sweep.json"
    assert main(["bench", runs[0], "--size", "96x128", "--runs", "1", "--warmup", "0",
                 "--sweep", "keep_ratio=0.2,0.6", "--json", str(out)]) == 0
    low, high = json.loads(out.read_text())["results"]
    assert low["overrides"] == {"encoder.keep_ratio": 0.2}
    assert low["gflops"]["encoder"] < high["gflops"]["encoder"]
    assert low["encoder_tokens_per_layer"][0] < high["encoder_tokens_per_layer"][0]
    assert "median" in low["latency_ms"]["total"] and low["precision"] == "fp32"
    out = capsys.readouterr().out
    assert "sweep of encoder.keep_ratio" in out
    assert [line.split()[-1] for line in out.splitlines() if line.split()[:1] in (["0.2"], ["0.6"])] == ["fp32"] * 2


def test_dtype_is_a_deprecated_alias_of_precision_and_rows_name_what_ran(tmp_path, capsys):
    out = tmp_path / "bench.json"
    with pytest.warns(FutureWarning, match="--dtype is deprecated and will be removed; use --precision"):
        assert main(["bench", "dino_tiny", "--size", "64x64", "--runs", "1", "--warmup", "0", "--device", "cpu",
                     "--dtype", "bf16", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["environment"]["precision"] == "bf16" and "dtype" not in report["environment"]
    assert report["results"][0]["precision"] == "bf16"
    assert "dino_tiny  64x64  batch 1  bf16  params" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["bench", "no_such_preset", "--runs", "0"], "neither a run folder nor a preset"),
    (["bench", "dino_tiny", "--size", "800"], "HEIGHTxWIDTH"),
    (["bench", "dino_tiny", "--sweep", "keep_ratio"], "KEY=V1,V2"),
    (["bench", "dino_tiny", "--runs", "0", "--plot", "x.png"], "metrics.json"),
    (["bench", "dino_tiny", "--precision", "fp16", "--device", "cpu"], "fp16 runs on CUDA only"),
])
def test_cli_errors(argv, message, capsys):
    assert main(argv + (["--size", "64x64"] if "--size" not in argv else [])) == 2
    assert message in capsys.readouterr().err
