"""Convergence of the query-side methods at the same number of steps (issue: decoder family).

For each preset: `sparsedet demo` on the same synthetic data with the same seed, stopped after
``--steps`` optimiser steps (no time limit), evaluated on the 100 val images every
``--steps / --evals`` steps (evaluation time is not training time). Prints AP against steps
for every preset, then the final row with wall-clock training minutes, parameter counts and the
spread of the trained encoder's memory: the standard deviation over token positions, averaged over
channels and 4 val images (near 0 means the memory has collapsed to one vector for every position,
so queries read from it carry no image information).

``--lr`` trains every preset at another learning rate (``train.lr`` and ``train.lr_backbone``;
the presets use the official 1e-4). ``--probe-every N`` saves a checkpoint every N steps
(``train.checkpoint_every``, all of them kept) and prints the memory's spread at each, which shows
when a collapse happens (every checkpoint holds the optimiser state too: mind the disk).

    python benchmarks/decoders.py --steps 1500 --evals 3 --out bench_decoders
    python benchmarks/decoders.py --steps 2000 --evals 4 --lr 4e-4 --probe-every 100 --out bench_decoders_lr4e-4
"""
from __future__ import annotations

import argparse
import json
import platform
import re
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
    p.add_argument("--lr", type=float, help="train.lr and train.lr_backbone for every preset (default: the preset's)")
    p.add_argument("--probe-every", type=int, default=0, metavar="N",
                   help="checkpoint every N steps and print the memory std at each (0: off)")
    args = p.parse_args()
    extra = [f"train.lr={args.lr}", f"train.lr_backbone={args.lr}"] if args.lr else []
    if args.probe_every:
        extra += [f"train.checkpoint_every={args.probe_every}",
                  f"train.keep_checkpoints={args.steps // args.probe_every + 1}"]
    probes = {}
    out = Path(args.out)
    curves, finals = {}, {}
    for preset in args.presets:
        run = out / preset
        if not args.skip_training:
            subprocess.run([sys.executable, "-m", "sparsedet.cli", "demo", "--preset", preset, "--minutes", "100000",
                            "--seed", str(args.seed), "--out", str(run), f"train.max_steps={args.steps}",
                            f"train.eval_every={args.steps // args.evals}", *extra], check=True)
        history = [json.loads(line) for line in (run / "run" / "metrics.jsonl").read_text().splitlines()]
        curves[preset] = {r["step"]: r["eval"]["AP"] for r in history if "eval" in r}
        final = json.loads((run / "metrics.json").read_text())
        minutes = max(r.get("time_s", 0.0) for r in history) / 60
        model = Detector.from_pretrained(run / "run")
        params = sum(p.numel() for p in model.parameters())
        finals[preset] = (final, minutes, params, memory_spread(model, run / "data" / "val.json"))
        if args.probe_every:
            saved = sorted((int(m.group(1)), c) for c in (run / "run" / "checkpoints").glob("step_*")
                           if (m := re.fullmatch(r"step_(\d+)", c.name)))
            probes[preset] = {step: memory_spread(Detector.from_pretrained(c), run / "data" / "val.json")
                              for step, c in saved}
    steps = sorted({s for c in curves.values() for s in c})
    print(f"\nseed {args.seed}, synthetic data of `sparsedet demo` (400 train / 100 val images, 256 px); "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
          + (f", lr {args.lr:g} for every preset" if args.lr else "") + "\n")
    print("| preset | " + " | ".join(f"AP @ {s}" for s in steps) + " | AP50 | APs | APm | APl | train min | params (M) | memory std |")
    print("|---|" + "---:|" * (len(steps) + 7))
    for preset in args.presets:
        final, minutes, params, spread = finals[preset]
        aps = " | ".join(f"{curves[preset].get(s, float('nan')):.3f}" for s in steps)
        print(f"| {preset} | {aps} | {final['AP50']:.3f} | {final['APs']:.3f} | {final['APm']:.3f} | "
              f"{final['APl']:.3f} | {minutes:.1f} | {params / 1e6:.1f} | {spread:.3f} |")
    if probes:
        probe_steps = sorted({s for c in probes.values() for s in c})
        print("\nmemory std at each checkpoint (4 val images)\n")
        print("| preset | " + " | ".join(f"@ {s}" for s in probe_steps) + " |")
        print("|---|" + "---:|" * len(probe_steps))
        for preset, probe in probes.items():
            print(f"| {preset} | " + " | ".join(f"{probe[s]:.3f}" if s in probe else "" for s in probe_steps) + " |")


if __name__ == "__main__":
    main()
