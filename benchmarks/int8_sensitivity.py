"""Which layers of a trained model int8 hurts: COCO AP with each layer group of
``sparsedet.tools.quantize.GROUPS`` quantised alone, and with everything quantised but that group.

Exports RUN once in fp32, calibrates once (min-max ranges from the first N train images, kept in a
ranges file that every variant shares), then for each variant (``--recipes-only``: the last two)
quantises, scores the int8 file on the val data in onnxruntime and prints the AP drop beside the
group's share of the dense layers' multiply-adds (counted on one val image in PyTorch: what int8
could speed up). The last rows are ``DEFAULT_RECIPE`` and quantising everything.

    python benchmarks/int8_sensitivity.py RUN --train DATA/train.json --val DATA/val.json [--calibration-images 64]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from sparsedet import Detector
from sparsedet.tools.export import export_onnx
from sparsedet.tools.quantize import (DEFAULT_RECIPE, EVERYTHING, GROUPS, Recipe, calibration_feeds, file_ap,
                                      group_of, open_split, quantize_file)


def dense_macs(model, dataset) -> dict[str, int]:
    """Multiply-adds of each group's Linear and Conv2d layers on the first image of ``dataset``."""
    macs: dict[str, int] = defaultdict(int)
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            per_output = module.in_features
        elif isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        else:
            continue
        def count(module, args, out, group=group_of(name), k=per_output):
            macs[group] += out.numel() * k
        hooks.append(module.register_forward_hook(count))
    image, _ = dataset[0]
    with torch.inference_mode():
        model.predict([image])
    for h in hooks:
        h.remove()
    return dict(macs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--train", required=True, help="calibration data (COCO json)")
    p.add_argument("--val", required=True, help="val data (COCO json)")
    p.add_argument("--calibration-images", type=int, default=64)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--recipes-only", action="store_true", help="only the default recipe and everything in int8")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = Detector.from_pretrained(args.run)
    calibration, val = open_split(args.train, "train", None, model), open_split(args.val, "val", None, model)
    macs = dense_macs(model, val)
    total = sum(macs.values())
    present = [g for g in [*GROUPS, "other"] if macs.get(g)]
    with tempfile.TemporaryDirectory() as tmp:
        float_path, ranges = Path(tmp) / "float.onnx", Path(tmp) / "ranges.json"
        export_onnx(model, float_path)
        base = file_ap(float_path, val)
        count = min(args.calibration_images, len(calibration))
        variants = [] if args.recipes_only else (
            [(f"{g} only", Recipe(tuple(o for o in present if o != g))) for g in present] +
            [(f"all but {g}", Recipe((g,))) for g in present])
        variants += [(f"default recipe ({DEFAULT_RECIPE.name})", DEFAULT_RECIPE), ("everything", EVERYTHING)]
        print(f"{args.run}: float file AP {base:.3f} on {val.source}; {count} calibration images of "
              f"{calibration.source}\n")
        rows = []
        for label, recipe in variants:
            start = time.perf_counter()
            path = Path(tmp) / "int8.onnx"
            quantize_file(float_path, path, calibration_feeds(calibration, count, None), count, recipe, ranges)
            ap = file_ap(path, val)
            int8_macs = sum(macs.get(g, 0) for g in present if g not in recipe.keep_float)
            rows.append((label, int8_macs / total, ap, base - ap))
            print(f"{label}: AP {ap:.3f} (drop {base - ap:+.3f}), {time.perf_counter() - start:.0f} s", flush=True)
    print(f"\nfloat AP {base:.3f}; dense multiply-adds {total / 1e9:.2f} G per image\n")
    print("| int8 layers | share of dense multiply-adds in int8 | AP | AP drop |")
    print("|---|---:|---:|---:|")
    for label, share, ap, drop in rows:
        print(f"| {label} | {share:.1%} | {ap:.3f} | {drop:+.3f} |")


if __name__ == "__main__":
    main()
