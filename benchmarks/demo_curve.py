"""AP against training steps for `sparsedet demo` (the foundation's benchmark).

Runs the demo once with periodic evaluation (evaluation time is not counted as training time)
and prints a markdown table of COCO AP on the synthetic val split against steps, with the
training minutes they took on this machine (a busy machine takes longer for the same steps; the
AP at a step does not depend on it). Then evaluates the final model with ``sparsedet eval`` in
fp32 and bf16 (``--precision``) at two batch sizes: with batch-independent detections
(``model.mask_padding``) the AP is the same at both.

    python benchmarks/demo_curve.py --steps 2000 --eval-every 250 --out bench_demo
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from sparsedet.tools.bench import cpu_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--minutes", type=float, default=60.0, help="the demo's time budget: large, so steps decide")
    p.add_argument("--preset", default="dino_tiny")
    p.add_argument("--eval-every", type=int, default=250, help="steps between evaluations")
    p.add_argument("--out", default="bench_demo")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cmd = [sys.executable, "-m", "sparsedet.cli", "demo", "--steps", str(args.steps), "--minutes", str(args.minutes),
           "--preset", args.preset, "--out", args.out, f"train.eval_every={args.eval_every}", *args.overrides]
    subprocess.run(cmd, check=True)
    rows = [json.loads(line) for line in (Path(args.out) / "run" / "metrics.jsonl").read_text().splitlines()]
    print(f"\n`{' '.join(cmd[2:])}` on {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| step | training minutes | AP | AP50 | APs | APm | APl |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "eval" in r:
            e = r["eval"]
            print(f"| {r['step']} | {r['time_s'] / 60:.1f} | {e['AP']:.3f} | {e['AP50']:.3f} | {e['APs']:.3f} | "
                  f"{e['APm']:.3f} | {e['APl']:.3f} |")
    print("\n| final model evaluated in | batch size | AP | AP50 | APs | APm | APl | eval seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for precision in ("fp32", "bf16"):
        for batch_size in (1, 8):
            out = Path(args.out) / f"eval_{precision}_{batch_size}"
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "sparsedet.cli", "eval", "--weights", str(Path(args.out) / "run"),
                            "--val", str(Path(args.out) / "data" / "val.json"), "--out", str(out),
                            "--precision", precision, "--batch-size", str(batch_size)],
                           check=True, stdout=subprocess.DEVNULL)
            seconds = time.perf_counter() - start
            e = json.loads((out / "metrics.json").read_text())
            print(f"| {precision} | {batch_size} | {e['AP']:.3f} | {e['AP50']:.3f} | {e['APs']:.3f} | {e['APm']:.3f} "
                  f"| {e['APl']:.3f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
