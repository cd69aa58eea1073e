"""Deformable-attention backends against each other: forward and forward+backward time of the op
alone, at the encoder and decoder scales of an 800x1333 R50 model and of the tiny presets.

    python benchmarks/deform_attn.py [--runs 5] [--cases enc_800x1333,dec_800x1333,enc_tiny,dec_tiny]

Inputs: random values, uniform locations in [-0.1, 1.1], softmax weights, fp32, batch as given
per case. Medians of ``--runs`` after one warm-up, ``torch.get_num_threads()`` threads. Also
prints the one-time build of the cpu kernel (cold cache) and the largest output difference from
``reference``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from sparsedet.ops import deform_attn, deform_attn_kernel


def levels(h: int, w: int) -> list[tuple[int, int]]:
    return [(-(-h // s), -(-w // s)) for s in (8, 16, 32, 64)]


# name: (batch, shapes, queries, heads, channels per head)
CASES = {
    "enc_800x1333": (1, levels(800, 1333), None, 8, 32),
    "dec_800x1333": (1, levels(800, 1333), 900, 8, 32),
    "enc_tiny": (2, levels(256, 256), None, 8, 16),
    "dec_tiny": (2, levels(256, 256), 130, 8, 16),
}


def inputs(case: str, g: torch.Generator):
    batch, shapes, queries, heads, dim = CASES[case]
    tokens = sum(h * w for h, w in shapes)
    q = queries or tokens
    value = torch.randn(batch, tokens, heads, dim, generator=g)
    loc = torch.rand(batch, q, heads, len(shapes), 4, 2, generator=g) * 1.2 - 0.1
    weights = torch.rand(batch, q, heads, len(shapes), 4, generator=g).softmax(-1)
    return value, shapes, loc, weights


def timed(fn, runs: int) -> float:
    fn()
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--cases", default=",".join(CASES))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as home:
        os.environ["SPARSEDET_HOME"] = home
        t0 = time.perf_counter()
        built = deform_attn_kernel.available()
        print(f"cpu kernel build (cold cache): {time.perf_counter() - t0:.2f} s, available={built}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32\n")
    print("| case | backend | forward ms | forward+backward ms | max abs diff vs reference |")
    print("|---|---|---:|---:|---:|")
    for case in args.cases.split(","):
        value, shapes, loc, weights = inputs(case, torch.Generator().manual_seed(0))
        ref = deform_attn.ms_deform_attn(value, shapes, loc, weights, "reference")
        for backend in deform_attn.BACKENDS:
            if backend == "cpu" and not deform_attn_kernel.available():
                continue
            leaves = [t.clone().requires_grad_() for t in (value, loc, weights)]

            def forward():
                with torch.no_grad():
                    return deform_attn.ms_deform_attn(value, shapes, loc, weights, backend)

            def train():
                deform_attn.ms_deform_attn(leaves[0], shapes, leaves[1], leaves[2], backend).sum().backward()

            diff = (forward() - ref).abs().max().item()
            fwd, both = timed(forward, args.runs), timed(train, args.runs)
            print(f"| {case} | {backend} | {fwd * 1e3:.1f} | {both * 1e3:.1f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
