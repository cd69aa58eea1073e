"""benchmarks/gpu_check.sh end to end on the CPU (--smoke: toy sizes, one run each; transformers'
section left out, its import alone takes seconds): every section runs, writes its figures into the
one JSON, and the targets are computed from them. Asked for a GPU this machine lacks, every section
records its error and the JSON is still whole."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["environment", "deform_attn", "train_step", "predict", "vs_transformers", "pytest_gpu"]


def test_smoke_run_writes_every_section(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), "--smoke", "--skip",
                           "vs_transformers"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["sections"] == {**dict.fromkeys(SECTIONS, "ok"), "vs_transformers": "skipped"}, report["sections"]
    assert report["environment"]["torch"] == torch.__version__ and "packages" in report["environment"]
    cases = report["deform_attn"]["cases"]
    assert set(cases) == {f"{c}_{d}" for c in ("encoder", "decoder_5", "decoder_9") for d in ("fp32", "bf16")}
    for case in cases.values():
        for backend in report["deform_attn"]["backends"]:
            assert case[backend]["forward"]["median_ms"] > 0 and case[backend]["forward_backward"]["runs"] == 1
            assert case[backend]["max_abs_diff_vs_reference"] < 0.05, (backend, case)
    for preset in ("dino_r50", "focus_detr_r50"):
        assert report["train_step"][preset]["losses_finite"] and report["train_step"][preset]["median_ms"] > 0
    for row in report["predict"]["presets"].values():
        assert row["batch_2"]["images_per_second"] > 0 and row["host_syncs_batch_1"] is None  # counted on CUDA
    tests = report["pytest_gpu"]
    assert (tests["passed"], tests["failed"], tests["errors"]) == (2, 0, 0), tests
    targets = report["targets"]
    assert targets["triton_fwd_bwd_vs_gather_bf16_encoder"]["pass"] is None  # no triton backend, or no GPU
    assert targets["deformable_detr_predict_vs_transformers_bf16"]["pass"] is None  # section skipped
    assert targets["sparse_detr_r50_fps_over_deformable_detr_r50_two_stage_batch_2"]["value"] > 0


def test_a_missing_gpu_is_recorded_in_every_section(tmp_path):
    if torch.cuda.is_available():
        return  # the sections would run for real
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    out = tmp_path / "check.json"
    assert gpu_check.main([str(out), "--device", "cuda", "--skip", "pytest_gpu"]) == 0
    report = json.loads(out.read_text())
    assert report["sections"] == {"environment": "ok", **dict.fromkeys(SECTIONS[1:-1], "error"),
                                  "pytest_gpu": "skipped"}
    assert all("no CUDA device" in report[name]["error"] for name in SECTIONS[1:-1])
    assert all(t["pass"] is None and t["reason"] for t in report["targets"].values())
