"""AP against training minutes for `sparsedet demo` (the foundation's benchmark).

Runs the demo once with periodic evaluation (evaluation time is not counted as training time)
and prints a markdown table of COCO AP on the synthetic val split against training minutes, then
evaluates the final model with ``sparsedet eval`` in fp32 and in bf16 (``--precision``).

    python benchmarks/demo_curve.py --minutes 10 --eval-every 100 --out bench_demo
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--preset", default="dino_tiny")
    p.add_argument("--eval-every", type=int, default=100, help="steps between evaluations")
    p.add_argument("--out", default="bench_demo")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cmd = [sys.executable, "-m", "sparsedet.cli", "demo", "--minutes", str(args.minutes), "--preset", args.preset,
           "--out", args.out, f"train.eval_every={args.eval_every}", *args.overrides]
    subprocess.run(cmd, check=True)
    rows = [json.loads(line) for line in (Path(args.out) / "run" / "metrics.jsonl").read_text().splitlines()]
    print(f"\n`{' '.join(cmd[2:])}` on {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| training minutes | step | AP | AP50 | APs | APm | APl |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "eval" in r:
            e = r["eval"]
            print(f"| {r['time_s'] / 60:.1f} | {r['step']} | {e['AP']:.3f} | {e['AP50']:.3f} | {e['APs']:.3f} | "
                  f"{e['APm']:.3f} | {e['APl']:.3f} |")
    print("\n| final model evaluated in | AP | AP50 | APs | APm | APl | eval seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for precision in ("fp32", "bf16"):
        out = Path(args.out) / f"eval_{precision}"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "sparsedet.cli", "eval", "--weights", str(Path(args.out) / "run"),
                        "--val", str(Path(args.out) / "data" / "val.json"), "--out", str(out),
                        "--precision", precision], check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        e = json.loads((out / "metrics.json").read_text())
        print(f"| {precision} | {e['AP']:.3f} | {e['AP50']:.3f} | {e['APs']:.3f} | {e['APm']:.3f} | {e['APl']:.3f} | "
              f"{seconds:.1f} |")


if __name__ == "__main__":
    main()
