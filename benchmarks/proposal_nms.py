"""Salience DETR's proposal filter at the R50 scale: ``select_distinct`` (cell NMS over the best
4 x 900 tokens of an 800x1067 input's 17,821) against the same decisions made by dense box NMS
(``batched_nms`` on the tokens' 3x3-cell boxes), median of --runs calls each, one image.

    python benchmarks/proposal_nms.py --runs 20
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from sparsedet.ops.functional import token_levels
from sparsedet.models.queries import ProposalQueries
from sparsedet.ops.boxes import batched_nms

SHAPES = [(100, 134), (50, 67), (25, 34), (13, 17)]  # strides 8-64 of 800x1067


def dense_box_nms(logits: torch.Tensor, queries: ProposalQueries) -> torch.Tensor:
    """The same selection through an n x n IoU matrix (how select_distinct worked before)."""
    cand = logits.max(-1).values.topk(4 * queries.num_queries, dim=1).indices[0]
    starts = torch.tensor([0] + [h * w for h, w in SHAPES]).cumsum(0)
    widths = torch.tensor([w for _, w in SHAPES])
    level = token_levels(cand, SHAPES)
    local = cand - starts[level]
    x, y = (local % widths[level]).float(), (local // widths[level]).float()
    boxes = torch.stack([x - 1, y - 1, x + 1, y + 1], -1)
    scores = logits.max(-1).values[0, cand]
    kept = batched_nms(boxes, scores, level, queries.nms_iou)
    rest = torch.ones(len(cand), dtype=torch.bool)
    rest[kept] = False
    return cand[torch.cat([kept, rest.nonzero().squeeze(1)])[:queries.num_queries]][None]


def median_ms(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(2)
    queries = ProposalQueries("mixed", 900, 256, 91, nms_iou=0.3)
    logits = torch.randn(1, sum(h * w for h, w in SHAPES), 91, generator=torch.Generator().manual_seed(0))
    assert torch.equal(queries.select_distinct(logits, SHAPES), dense_box_nms(logits, queries))
    cell = median_ms(lambda: queries.select_distinct(logits, SHAPES), args.runs)
    dense = median_ms(lambda: dense_box_nms(logits, queries), args.runs)
    print(f"{platform.processor() or platform.machine()}, 2 threads, torch {torch.__version__}; same 900 picks\n")
    print("| proposal filter (3600 candidates, 900 kept) | median ms |")
    print("|---|---:|")
    print(f"| select_distinct (cell NMS) | {cell:.1f} |")
    print(f"| dense box NMS (n x n IoU) | {dense:.1f} |")


if __name__ == "__main__":
    main()
