"""How a run's AP depends on the evaluation batch size, i.e. on padding, with the official code's
handling of a padded batch (``model.mask_padding=false``: padded zeros turned non-zero by the
backbone's batch norm reach the image's edge, GroupNorm statistics and query positions include
the padding) and with ours (``true``: each image computes what it computes alone). Same weights,
same images; images of different aspect ratios share a padded batch.

    python benchmarks/eval_padding.py RUN VAL_JSON [--batch-sizes 1,2,4,8]
"""
from __future__ import annotations

import argparse

from sparsedet import Detector
from sparsedet.data.coco import CocoDetection
from sparsedet.data.transforms import build_transforms
from sparsedet.engine.evaluator import evaluate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("val")
    p.add_argument("--batch-sizes", default="1,2,4,8")
    args = p.parse_args()
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    print(f"{args.run} on {args.val}, fp32; AP (AP50)\n")
    print("| eval batch size | " + " | ".join(f"mask_padding={m}" for m in ("false", "true")) + " |")
    print("|---:|---:|---:|")
    for bs in sizes:
        cells = []
        for mask in (False, True):
            model = Detector.from_pretrained(args.run, mask_padding=mask)
            c = model.config
            data = CocoDetection(args.val, transforms=build_transforms(False, [c.eval_size], c.eval_max_size))
            metrics, _ = evaluate(model, data, batch_size=bs, progress=False)
            cells.append(f"{metrics['AP']:.3f} ({metrics['AP50']:.3f})")
        print(f"| {bs} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
