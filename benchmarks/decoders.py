"""Convergence of the query-side methods at the same number of steps (issue: decoder family).

For each preset: `sparsedet demo` on the same synthetic data with the same seed, stopped after
``--steps`` optimiser steps (no time limit), evaluated on the 100 val images every
``--steps / --evals`` steps (evaluation time is not training time). Prints AP against steps
for every preset, then the final row with wall-clock training minutes, parameter counts and the
spread of the trained encoder's memory: the standard deviation over token positions, averaged over
channels and 4 val images (near 0 means the memory has collapsed to one vector for every position,
so queries read from it carry no image information).

    python benchmarks/decoders.py --steps 1500 --evals 3 --out bench_decoders
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from sparsedet import Detector
from sparsedet.data.batch import collate
from sparsedet.data.coco import CocoDetection
from sparsedet.data.transforms import build_transforms

PRESETS = ["conditional_detr_tiny", "sam_detr_tiny", "sam_detr_smca_tiny", "decoupled_detr_tiny"]


def memory_spread(model: Detector, val_json: Path, images: int = 4) -> float:
    m = model.config
    dataset = CocoDetection(val_json, transforms=build_transforms(False, [m.eval_size], m.eval_max_size))
    batch, _, _ = collate([dataset[i] for i in range(images)], model.run_config.data.size_divisor)
    model.eval()
    with torch.no_grad():
        levels = model.features(batch)
        memory = model.encoder(levels, model.queries).memory
    valid = ~levels.padding
    return statistics.mean(memory[b][valid[b]].std(0).mean().item() for b in range(images))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--evals", type=int, default=3, help="evaluations along the way (the last one at --steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--presets", nargs="+", default=PRESETS)
    p.add_argument("--out", default="bench_decoders")
    p.add_argument("--skip-training", action="store_true", help="reuse the runs already in --out")
    args = p.parse_args()
    out = Path(args.out)
    curves, finals = {}, {}
    for preset in args.presets:
        run = out / preset
        if not args.skip_training:
            subprocess.run([sys.executable, "-m", "sparsedet.cli", "demo", "--preset", preset, "--minutes", "100000",
                            "--seed", str(args.seed), "--out", str(run), f"train.max_steps={args.steps}",
                            f"train.eval_every={args.steps // args.evals}"], check=True)
        history = [json.loads(line) for line in (run / "run" / "metrics.jsonl").read_text().splitlines()]
        curves[preset] = {r["step"]: r["eval"]["AP"] for r in history if "eval" in r}
        final = json.loads((run / "metrics.json").read_text())
        minutes = max(r.get("time_s", 0.0) for r in history) / 60
        model = Detector.from_pretrained(run / "run")
        params = sum(p.numel() for p in model.parameters())
        finals[preset] = (final, minutes, params, memory_spread(model, run / "data" / "val.json"))
    steps = sorted({s for c in curves.values() for s in c})
    print(f"\nseed {args.seed}, synthetic data of `sparsedet demo` (400 train / 100 val images, 256 px); "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| preset | " + " | ".join(f"AP @ {s}" for s in steps) + " | AP50 | APs | APm | APl | train min | params (M) | memory std |")
    print("|---|" + "---:|" * (len(steps) + 7))
    for preset in args.presets:
        final, minutes, params, spread = finals[preset]
        aps = " | ".join(f"{curves[preset].get(s, float('nan')):.3f}" for s in steps)
        print(f"| {preset} | {aps} | {final['AP50']:.3f} | {final['APs']:.3f} | {final['APm']:.3f} | "
              f"{final['APl']:.3f} | {minutes:.1f} | {params / 1e6:.1f} | {spread:.3f} |")


if __name__ == "__main__":
    main()
