"""Exported models in onnxruntime against PyTorch eager (ours) and transformers eager.

Builds transformers' two-stage Deformable DETR with random weights (as vs_transformers.py) and
converts it; builds focus_detr_r50 with random weights. Exports both with
``Detector.export_onnx`` for any input size (the export checks onnxruntime against PyTorch on its
samples), then times, alternating run by run at --size, batch 1: transformers fp32 eager, and per
model ours fp32 eager (as ``predict`` runs it) and the file in onnxruntime (CPU provider,
``intra_op_num_threads`` = --threads). Prints medians and ratios to transformers.

    python benchmarks/onnx_speed.py --size 800x1333 --runs 3
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from vs_transformers import MEAN, STD, hf_deformable_detr, time_alternating  # noqa: E402

from sparsedet import Detector  # noqa: E402
from sparsedet.engine.precision import inference_precision  # noqa: E402
from sparsedet.tools.bench import environment, format_environment, parse_size  # noqa: E402
from sparsedet.tools.convert import convert  # noqa: E402
from sparsedet.tools.export import INPUTS, OUTPUTS, ExportedDetector, describe, onnxruntime_session  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="800x1333", help="HEIGHTxWIDTH of the export and the timed input")
    p.add_argument("--runs", type=int, default=5, help="timed rounds after one warm-up (default 5)")
    p.add_argument("--threads", type=int, default=2, help="PyTorch and onnxruntime threads (default 2)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    h, w = parse_size(args.size)
    with tempfile.TemporaryDirectory() as tmp:
        hf = hf_deformable_detr(tmp)
        ours, _ = convert("hf-deformable-detr", tmp, {"model.eval_size": min(h, w), "model.eval_max_size": max(h, w)})
        focus = Detector.from_preset("focus_detr_r50", **{"backbone.weights": None, "eval_size": min(h, w),
                                                          "eval_max_size": max(h, w)})
        images = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
        feeds = {"images": images.numpy(), "mask": np.zeros((1, h, w), dtype=bool),
                 "sizes": np.array([[h, w]], dtype=np.int64)}
        pixel_values, pixel_mask = (images - MEAN) / STD, torch.ones(1, h, w, dtype=torch.long)

        def run_hf():
            with torch.inference_mode():
                hf(pixel_values=pixel_values, pixel_mask=pixel_mask)

        runs = {"transformers Deformable DETR, fp32 eager": run_hf}
        for name, model in (("Deformable DETR", ours), ("Focus-DETR", focus)):
            runs.update(exported_runs(name, model.eval(), os.path.join(tmp, f"{name}.onnx"), feeds, args.threads))
        times = time_alternating(runs, args.runs)
    import onnxruntime
    import transformers
    print(format_environment({**environment(torch.device("cpu"), "fp32"), "transformers": transformers.__version__,
                              "onnxruntime": onnxruntime.__version__}))
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["transformers Deformable DETR, fp32 eager"]
    print(f"\nbatch 1, {h}x{w}, {args.runs} runs alternating\n")
    print("| model | median s | min | max | transformers / this |")
    print("|---|---:|---:|---:|---:|")
    for name, values in times.items():
        print(f"| {name} | {med[name]:.2f} | {min(values):.2f} | {max(values):.2f} | {base / med[name]:.2f}x |")


def exported_runs(name: str, model, path: str, feeds: dict, threads: int) -> dict:
    """Export ``model`` for any input size; return its timed runs: PyTorch fp32 eager and the file
    in onnxruntime on ``feeds``."""
    start = time.perf_counter()
    report = model.export_onnx(path)
    print(f"{name}: export + check {time.perf_counter() - start:.0f} s: {describe(report)}", flush=True)
    session = onnxruntime_session(path, threads)
    wrapper = ExportedDetector(model, model.config.top_k).eval()

    def run_eager():
        with inference_precision(model, None), torch.inference_mode():
            wrapper(*(torch.from_numpy(feeds[k]) for k in INPUTS))

    return {f"sparsedet {name}, fp32 eager": run_eager,
            f"sparsedet {name}, ONNX in onnxruntime": lambda: session.run(OUTPUTS, feeds)}


if __name__ == "__main__":
    main()
