"""Corr of trained tiny token-sparse models beside their AP (issue 20; docs/corr.md).

Writes one synthetic dataset (`sparsedet synth`), trains each sparse preset on it for exactly
``--steps`` steps from the same seed (`sparsedet train`, no evaluation while training), then runs
`sparsedet eval --corr` on the val images: AP, and per encoder layer the share of the decoder's
attention map on the tokens that layer kept (per image, averaged over images) next to the share of
tokens it kept (what a scorer blind to the decoder would get on average).

    python benchmarks/corr.py --steps 200 --out bench_corr
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

PRESETS = ["sparse_detr_tiny", "focus_detr_tiny", "salience_detr_tiny"]


def sparsedet(*args: str) -> None:
    """Run one `sparsedet` command in a fresh process, as a user would."""
    subprocess.run([sys.executable, "-m", "sparsedet.cli", *args], check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="training steps per preset (default 200)")
    p.add_argument("--train-images", type=int, default=200)
    p.add_argument("--val-images", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--presets", nargs="+", default=PRESETS)
    p.add_argument("--out", default="bench_corr")
    args = p.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    data = out / "data"
    start = time.perf_counter()
    sparsedet("synth", "--out", str(data), "--train", str(args.train_images), "--val", str(args.val_images),
              "--seed", str(args.seed))
    rows = []
    for preset in args.presets:
        run = out / preset
        t0 = time.perf_counter()
        sparsedet("train", "--preset", preset, "--train", str(data / "train.json"), "--out", str(run),
                  "--no-progress", f"train.max_steps={args.steps}", f"train.seed={args.seed}", "train.minutes=0",
                  "train.threads=2")
        train_s = time.perf_counter() - t0
        sparsedet("eval", "--weights", str(run), "--val", str(data / "val.json"), "--corr", "--out",
                  str(run / "eval"))
        rows.append((preset, train_s, json.loads((run / "eval" / "metrics.json").read_text())))
    print(f"\n{args.steps} steps per preset from seed {args.seed} on {args.train_images} synthetic train images, "
          f"eval on {args.val_images} val images; {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; {time.perf_counter() - start:.0f} s in all\n")
    print("| preset | train s | AP | AP50 | Corr (mean) | Corr per encoder layer | kept share per layer |")
    print("|---|---:|---:|---:|---:|---|---|")
    for preset, train_s, m in rows:
        c = m["corr"]
        per_layer = " / ".join(f"{v:.3f}" for v in c["per_layer"])
        kept = " / ".join(f"{v:.3f}" for v in c["kept_per_layer"])
        print(f"| {preset} | {train_s:.0f} | {m['AP']:.3f} | {m['AP50']:.3f} | {c['mean']:.3f} | {per_layer} | {kept} |")


if __name__ == "__main__":
    main()
