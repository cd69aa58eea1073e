"""What Sparse DETR's encoder auxiliary heads add to its cost curve over the keep ratio.

``sparsedet bench sparse_detr_r50 --runs 0 --sweep keep_ratio=...`` counts inference, where the
encoder auxiliary heads (detection heads on the kept tokens after every encoder layer but the
last) do not run: they only feed losses. This script counts the same model, same input (one
random 800x1067 image, random weights: cost depends on neither) and the same convention
(``sparsedet.ops.flops``: one multiply-add = 1 FLOP), once as ``sparsedet bench`` does and once
with the encoder in training mode so that its auxiliary heads run (dropout off; the rest of the
model stays in eval mode, so nothing else changes), and prints both curves, the heads' share, and
each curve's slope per +0.1 of rho (as the README's table: (last - first) / steps of 0.1).

    python benchmarks/sparse_aux_heads.py --size 800x1067 --ratios 0.1,0.2,0.3,0.4,0.5
"""
from __future__ import annotations

import argparse

import torch

from sparsedet.data.batch import Batch
from sparsedet.ops.flops import count_macs
from sparsedet.tools.bench import environment, format_environment, load_model, parse_size, stage_modules


def count(model, inputs, aux: bool) -> dict[str, float]:
    """GFLOPs of one forward; ``aux``: the encoder in training mode (its auxiliary heads run)."""
    model.eval()
    if aux:
        model.encoder.train()
        for module in model.encoder.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    stages = stage_modules(model)
    if model.encoder.aux_heads is not None:  # innermost stage wins: the heads' cost is set apart
        stages["encoder aux heads"] = list(model.encoder.aux_heads.modules())
    macs = count_macs(lambda: model(inputs), stages)
    model.eval()
    return {k: v / inputs.images.shape[0] / 1e9 for k, v in macs.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sparse_detr_r50")
    p.add_argument("--size", default="800x1067", help="HEIGHTxWIDTH (default 800x1067)")
    p.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5", help="keep ratios, ascending, 0.1 apart")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    h, w = parse_size(args.size)
    ratios = [float(r) for r in args.ratios.split(",")]
    inputs = Batch(torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0)),
                   torch.zeros(1, h, w, dtype=torch.bool))
    rows = []
    for rho in ratios:
        model = load_model(args.preset, {"encoder.keep_ratio": rho})
        rows.append((rho, count(model, inputs, False), count(model, inputs, True)))

    print(format_environment(environment(torch.device("cpu"), "fp32")))
    print(f"{args.preset}, {h}x{w}, batch 1, GFLOPs (1e9 multiply-adds)\n")
    print("| ρ | inference (as `sparsedet bench`) | with encoder aux heads | of which aux heads "
          "| encoder, with aux heads |")
    print("|---|---:|---:|---:|---:|")
    for rho, inference, training in rows:
        print(f"| {rho:g} | {inference['total']:.2f} | {training['total']:.2f} | "
              f"{training.get('encoder aux heads', 0.0):.2f} | "
              f"{training['encoder'] + training.get('encoder aux heads', 0.0):.2f} |")
    steps = round((ratios[-1] - ratios[0]) / 0.1)
    if steps > 0:
        slope = lambda i: (rows[-1][i]["total"] - rows[0][i]["total"]) / steps  # noqa: E731
        print(f"| slope per +0.1 | {slope(1):.2f} | {slope(2):.2f} | | |")


if __name__ == "__main__":
    main()
