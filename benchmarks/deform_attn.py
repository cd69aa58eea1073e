"""Deformable-attention backends against each other: forward and forward+backward time of the op
alone, at the encoder and decoder scales of an 800x1333 R50 model and of the tiny presets.

    python benchmarks/deform_attn.py [--runs 5] [--cases enc_800x1333,dec_800x1333,enc_tiny,dec_tiny]
                                     [--device cpu|cuda]

Inputs: random values, uniform locations in [-0.1, 1.1], softmax weights, fp32, batch as given
per case. Medians of ``--runs`` after one warm-up, ``torch.get_num_threads()`` threads (on CUDA,
synchronised before and after each run). Also prints the one-time build of the cpu kernel (cold
cache) and the largest output difference from ``reference``. Each backend runs where it can: cpu
on CPUs, triton on CUDA (where triton imports; the first run compiles its kernels), reference and
gather on both.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from sparsedet.ops import deform_attn, deform_attn_kernel, deform_attn_triton


def levels(h: int, w: int) -> list[tuple[int, int]]:
    return [(-(-h // s), -(-w // s)) for s in (8, 16, 32, 64)]


# name: (batch, shapes, queries, heads, channels per head)
CASES = {
    "enc_800x1333": (1, levels(800, 1333), None, 8, 32),
    "dec_800x1333": (1, levels(800, 1333), 900, 8, 32),
    "enc_tiny": (2, levels(256, 256), None, 8, 16),
    "dec_tiny": (2, levels(256, 256), 130, 8, 16),
}


def inputs(case: str, g: torch.Generator, device: str = "cpu"):
    batch, shapes, queries, heads, dim = CASES[case]
    tokens = sum(h * w for h, w in shapes)
    q = queries or tokens
    value = torch.randn(batch, tokens, heads, dim, generator=g)
    loc = torch.rand(batch, q, heads, len(shapes), 4, 2, generator=g) * 1.2 - 0.1
    weights = torch.rand(batch, q, heads, len(shapes), 4, generator=g).softmax(-1)
    return value.to(device), shapes, loc.to(device), weights.to(device)


def timed(fn, runs: int, device: str = "cpu") -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fn()
    samples = []
    for _ in range(runs):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def skip_reason(backend: str, device: str) -> str | None:
    """Why ``backend`` does not run on ``device`` here, or None."""
    if backend == "cpu":
        if device != "cpu":
            return "CPU tensors only"
        return None if deform_attn_kernel.available() else f"unavailable ({deform_attn_kernel.failure()})"
    if backend == "triton":
        if device == "cpu":
            return "CUDA only (on CPUs it runs only in Triton's interpreter)"
        return deform_attn_triton.unusable_reason(device)
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as home:
        os.environ["SPARSEDET_HOME"] = home
        t0 = time.perf_counter()
        built = deform_attn_kernel.available()
        print(f"cpu kernel build (cold cache): {time.perf_counter() - t0:.2f} s, available={built}")
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print(f"torch {torch.__version__}, {where}, {torch.get_num_threads()} threads, fp32")
    for backend in deform_attn.BACKENDS:
        if (reason := skip_reason(backend, args.device)) is not None:
            print(f"{backend}: skipped, {reason}")
    print()
    print("| case | backend | forward ms | forward+backward ms | max abs diff vs reference |")
    print("|---|---|---:|---:|---:|")
    for case in args.cases.split(","):
        value, shapes, loc, weights = inputs(case, torch.Generator().manual_seed(0), args.device)
        ref = deform_attn.ms_deform_attn(value, shapes, loc, weights, "reference")
        for backend in deform_attn.BACKENDS:
            if skip_reason(backend, args.device) is not None:
                continue
            leaves = [t.clone().requires_grad_() for t in (value, loc, weights)]

            def forward():
                with torch.no_grad():
                    return deform_attn.ms_deform_attn(value, shapes, loc, weights, backend)

            def train():
                deform_attn.ms_deform_attn(leaves[0], shapes, leaves[1], leaves[2], backend).sum().backward()

            diff = (forward() - ref).abs().max().item()
            fwd, both = timed(forward, args.runs, args.device), timed(train, args.runs, args.device)
            print(f"| {case} | {backend} | {fwd * 1e3:.1f} | {both * 1e3:.1f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
