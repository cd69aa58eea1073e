"""Training throughput of the engine's modes on this machine: precision, accumulation, EMA and
two Gloo processes against one, on the synthetic demo data.

Each setting runs `sparsedet train` for --steps optimiser steps in a fresh process and reports the
mean seconds per step over the steps after the first --skip (warm-up), from RUN/metrics.jsonl.

    python benchmarks/train_engine.py --steps 40 --out bench_train
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

SETTINGS = {  # name: (processes, threads per process, overrides); every row names its precision, since
    # the presets' train.precision=auto means bf16 on a CPU with native bf16 and fp32 elsewhere.
    "fp32, 1 process x 2 threads": (1, 2, ["train.batch_size=2", "train.precision=fp32"]),
    "bf16 autocast": (1, 2, ["train.batch_size=2", "train.precision=bf16"]),
    "fp16 autocast + loss scaler": (1, 2, ["train.batch_size=2", "train.precision=fp16"]),
    "fp32 + EMA": (1, 2, ["train.batch_size=2", "train.precision=fp32", "train.ema=true"]),
    "fp32, batch 1 x accumulate 2": (1, 2, ["train.batch_size=1", "train.precision=fp32", "train.accumulate=2"]),
    "fp32, 2 Gloo processes x 1 thread, batch 1 each": (2, 1, ["train.batch_size=1", "train.precision=fp32"]),
}


def run(name: str, procs: int, threads: int, overrides: list[str], args, data: Path) -> dict:
    out = Path(args.out) / name.replace(" ", "_").replace(",", "").replace("+", "")
    shutil.rmtree(out, ignore_errors=True)
    launcher = [sys.executable, "-m", "sparsedet"] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), "-m", "sparsedet"]
    cmd = launcher + ["train", "--preset", args.preset, "--train", str(data / "train.json"), "--out", str(out),
                      "--no-progress", f"train.max_steps={args.steps}", "train.log_every=1", "train.eval_every=-1",
                      f"train.threads={threads}", "train.seed=0", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    # The precision the run itself reports in its start-up summary ("device   cpu x 1 process, bf16 (...)").
    device_line = next(line for line in done.stdout.splitlines() if line.startswith("device"))
    precision = device_line.split(", ")[1].split(" (")[0]
    times = [r["time_s"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    return {"setting": name, "ran as": precision,
            "s_per_step": (times[-1] - times[args.skip]) / (len(times) - 1 - args.skip)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="dino_tiny")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the median")
    p.add_argument("--out", default="bench_train")
    args = p.parse_args()
    data = Path(args.out) / "data"
    if not (data / "train.json").is_file():
        from sparsedet.data.synthetic import write_synthetic
        write_synthetic(data, n_train=200, n_val=1, size=256, seed=0)
    rows = [run(name, *setting, args, data) for name, setting in SETTINGS.items()]
    base = rows[0]["s_per_step"]
    print(f"\n`python benchmarks/train_engine.py --steps {args.steps}`: {args.preset}, 2 images per optimiser "
          f"step, 256-px synthetic images; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}\n")
    print("| setting | precision the run reported | s / step (mean) | relative to fp32 |")
    print("|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['setting']} | {r['ran as']} | {r['s_per_step']:.3f} | {r['s_per_step'] / base:.2f} |")


if __name__ == "__main__":
    main()
