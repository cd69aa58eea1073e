"""Dense against token-sparse encoders at the same training budget (issue: sparse encoders).

For each preset: `sparsedet demo` (same synthetic data, seed and wall-clock budget); with
``--same-steps N`` also a second run of exactly N steps (no time limit), so that the encoder's effect
on AP can be told from the step-rate effect; then on the
first ``--images`` val images at the preset's eval size, eval mode, batch 1:
- encoder GMACs ("GFLOPs" in the papers' sense: one multiply-add = 1, bilinear sample = 4),
  counting everything between the neck and the decoder: token scoring and its projection, the
  layers, background embedding and fusion (Salience);
- encoder latency: median over the images of the fastest of 3 encoder forwards each (after 3
  warm-up calls).

    python benchmarks/sparse_encoders.py --minutes 5 --out bench_sparse
    python benchmarks/sparse_encoders.py --minutes 10 --same-steps 1500 --out bench_sparse
    python benchmarks/sparse_encoders.py --skip-training --out bench_sparse   # re-measure cost only
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from sparsedet import Detector
from sparsedet.data.batch import collate
from sparsedet.data.coco import CocoDetection
from sparsedet.data.transforms import build_transforms
from sparsedet.ops.flops import count_macs

# Each sparse encoder next to its dense base: Sparse DETR sits on two-stage Deformable DETR
# (deformable_detr_tiny), Focus-DETR and Salience DETR on DINO (dino_tiny).
PRESETS = ["dino_tiny", "deformable_detr_tiny", "sparse_detr_tiny", "focus_detr_tiny", "salience_detr_tiny"]


def encoder_cost(model: Detector, dataset: CocoDetection, n: int) -> tuple[float, float, float]:
    """(mean encoder GMACs, median encoder latency ms, mean kept fraction) over n images."""
    model.eval()
    macs, times, kept = [], [], []
    with torch.no_grad():
        for i in range(min(n, len(dataset))):
            batch, _, _ = collate([dataset[i]], model.run_config.data.size_divisor)
            levels = model.features(batch)
            def run():
                return model.encoder(levels, model.queries)
            macs.append(count_macs(run)["total"] / 1e9)
            for _ in range(3 if i == 0 else 0):
                run()
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                out = run()
                best = min(best, (time.perf_counter() - t0) * 1e3)
            times.append(best)
            kept.append(out.selection.kept_fraction() if out.selection is not None else 1.0)
    return statistics.mean(macs), statistics.median(times), statistics.mean(kept)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=20)
    p.add_argument("--presets", nargs="+", default=PRESETS)
    p.add_argument("--out", default="bench_sparse")
    p.add_argument("--same-steps", type=int, default=0, metavar="N",
                   help="also train each preset for exactly N steps and report that AP (0: off)")
    p.add_argument("--skip-training", action="store_true", help="reuse the runs already in --out")
    args = p.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    rows = []
    for preset in args.presets:
        run = out / preset
        if not args.skip_training:
            subprocess.run([sys.executable, "-m", "sparsedet.cli", "demo", "--preset", preset, "--minutes",
                            str(args.minutes), "--seed", str(args.seed), "--out", str(run)], check=True)
        metrics = json.loads((run / "metrics.json").read_text())
        if args.same_steps:
            fixed = out / f"{preset}_{args.same_steps}_steps"
            if not args.skip_training:
                subprocess.run([sys.executable, "-m", "sparsedet.cli", "demo", "--preset", preset, "--minutes", "0",
                                "--seed", str(args.seed), "--out", str(fixed),
                                f"train.max_steps={args.same_steps}"], check=True)
            metrics["AP_same_steps"] = json.loads((fixed / "metrics.json").read_text())["AP"]
        model = Detector.from_pretrained(run / "run")
        m = model.config
        val = CocoDetection(run / "data" / "val.json", transforms=build_transforms(False, [m.eval_size], m.eval_max_size))
        gmacs, ms, kept = encoder_cost(model, val, args.images)
        rows.append((preset, metrics, gmacs, ms, kept))
        minutes = model.run_config.train.minutes
    base = rows[0]
    print(f"\n{minutes:g} min training per preset, seed {args.seed}; cost on {args.images} val images at "
          f"the eval size, batch 1; {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}\n")
    same = f" AP @ {args.same_steps} steps |" if args.same_steps else ""
    print(f"| preset | steps | AP |{same} AP vs {base[0]} | APs | encoder GFLOPs | vs {base[0]} | encoder ms (median) "
          "| vs | kept tokens / layer |")
    print("|---|---:|---:|" + ("---:|" if same else "") + "---:|---:|---:|---:|---:|---:|---:|")
    for preset, mt, g, ms, kept in rows:
        at_steps = f" {mt['AP_same_steps']:.3f} |" if same else ""
        print(f"| {preset} | {mt['step']} | {mt['AP']:.3f} |{at_steps} {mt['AP'] / max(base[1]['AP'], 1e-9):.0%} | "
              f"{mt['APs']:.3f} | {g:.3f} | {g / base[2]:.0%} | {ms:.1f} | {ms / base[3]:.0%} | {kept:.0%} |")


if __name__ == "__main__":
    main()
