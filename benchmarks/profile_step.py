"""Where a training step's time goes: forward by stage, loss, backward, optimiser.

    python benchmarks/profile_step.py --preset dino_tiny --batch 2 --size 256 --steps 20

Times are medians over ``--steps`` steps after warm-up, on random images with five boxes each,
with the preset's precision (bf16 autocast where the CPU runs it natively).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from sparsedet import Detector
from sparsedet.data.batch import Batch
from sparsedet.engine.optim import make_optimizer
from sparsedet.engine.precision import autocast, resolve_precision
from sparsedet.losses.criterion import SetCriterion


class StageTimer:
    """Records wall time of named modules' forward passes via hooks."""

    def __init__(self, stages: dict[str, torch.nn.Module]):
        self.times: dict[str, float] = {}
        for name, module in stages.items():
            module.register_forward_pre_hook(lambda m, a, n=name: self._start(n))
            module.register_forward_hook(lambda m, a, o, n=name: self._stop(n))
        self._t0: dict[str, float] = {}

    def _start(self, name):
        self._t0[name] = time.perf_counter()

    def _stop(self, name):
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - self._t0[name]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="dino_tiny")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    torch.manual_seed(0)
    model = Detector.from_preset(args.preset, num_classes=5).train()
    cfg = model.run_config
    dtype = resolve_precision(cfg.train.precision, torch.device("cpu"), training=True)
    criterion = SetCriterion(5, cfg.model.loss)
    opt = make_optimizer(model, cfg.train, torch.device("cpu"))
    timer = StageTimer({"backbone": model.backbone, "neck": model.neck, "encoder": model.encoder,
                        "queries": model.queries, "decoder": model.decoder})
    batch = Batch.from_images([torch.rand(3, args.size, args.size) for _ in range(args.batch)])
    g = torch.Generator().manual_seed(0)
    targets = [{"labels": torch.randint(0, 5, (5,), generator=g),
                "boxes": torch.cat([torch.rand(5, 2, generator=g) * 0.6 + 0.2, torch.rand(5, 2, generator=g) * 0.2 + 0.05], 1)}
               for _ in range(args.batch)]
    rows: dict[str, list[float]] = {}
    for step in range(args.steps + 3):
        timer.times.clear()
        t0 = time.perf_counter()
        with autocast(dtype, torch.device("cpu")):
            out = model(batch, targets)
        t1 = time.perf_counter()
        loss = criterion.total(criterion(out, targets))
        t2 = time.perf_counter()
        opt.zero_grad()
        loss.backward()
        t3 = time.perf_counter()
        opt.step()
        t4 = time.perf_counter()
        if step >= 3:  # warm-up
            sample = {**{f"forward: {k}": v for k, v in timer.times.items()}, "forward (all)": t1 - t0,
                      "loss + matching": t2 - t1, "backward": t3 - t2, "optimiser": t4 - t3, "step": t4 - t0}
            for k, v in sample.items():
                rows.setdefault(k, []).append(v)
    print(f"{args.preset}, batch {args.batch} x {args.size}x{args.size}, {torch.get_num_threads()} threads, "
          f"precision {'bf16 autocast' if dtype else 'fp32'}, torch {torch.__version__}\n")
    print("| part | median ms | share of step |")
    print("|---|---:|---:|")
    step = statistics.median(rows["step"])
    for k, v in rows.items():
        print(f"| {k} | {statistics.median(v) * 1000:.0f} | {statistics.median(v) / step:.0%} |")


if __name__ == "__main__":
    main()
