"""How a run's AP depends on the evaluation batch size, i.e. on padding: images of different
aspect ratios in one batch are padded to a common size, and the padded border changes what the
convolutions near the image edge see (batch norm turns padded zeros into non-zero values).

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
    model = Detector.from_pretrained(args.run)
    c = model.config
    data = CocoDetection(args.val, transforms=build_transforms(False, [c.eval_size], c.eval_max_size))
    print(f"{args.run} on {args.val} ({len(data)} images), fp32\n")
    print("| eval batch size | AP | AP50 |")
    print("|---:|---:|---:|")
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        metrics, _ = evaluate(model, data, batch_size=bs, progress=False)
        print(f"| {bs} | {metrics['AP']:.3f} | {metrics['AP50']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
