"""Process groups for ``torchrun``: NCCL on GPUs, Gloo on CPUs (one process under torchrun too, so
that a one-GPU launch runs the NCCL path). No group outside torchrun."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .device import resolve_device


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    grouped: bool = False  # in a process group (torchrun's, of one process or more)

    @property
    def distributed(self) -> bool:
        return self.grouped or self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_name: str) -> tuple[Context, torch.device]:
    """Join the group torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK) and pick
    this process's device: ``cuda:LOCAL_RANK`` with NCCL where GPUs are used, else the CPU with Gloo.
    A single process joins a group of one when torchrun started it (TORCHELASTIC_RUN_ID), else none."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world <= 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        return Context(), device
    ctx = Context(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")), grouped=True)
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return ctx, device


def backend() -> str:
    """The process group's backend ("nccl", "gloo"), "" without a group."""
    return dist.get_backend() if dist.is_initialized() else ""


def teardown() -> None:
    """Leave the process group after an error (the error then goes on to its message; torchrun
    ends the other processes)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_together(code: int) -> int:
    """End a run every process finished (or stopped at the step they agreed on): under torchrun,
    wait for all, then end this process with ``code`` at once; without a process group, return
    ``code``. Skipping the interpreter's teardown is deliberate: Gloo's teardown (torch 2.13) races
    with its peers'. A process that destroyed its group after its peers had gone, or while they
    destroyed theirs, died with SIGABRT ("terminate called without an active exception") in about
    one of five test-suite runs. An ended process's connections are closed by the kernel instead."""
    if not dist.is_initialized():
        return code
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def all_agree(flag: bool, ctx: Context, device: torch.device) -> bool:
    """True only if ``flag`` is true on every rank (so that all ranks skip a step together)."""
    if not ctx.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def mean_over_ranks(values: dict[str, float], ctx: Context, device: torch.device) -> dict[str, float]:
    """The mean of each number over ranks (logged losses describe the global batch)."""
    if not ctx.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return {k: v / ctx.world_size for k, v in zip(keys, t.tolist())}


def max_over_ranks(value: float, ctx: Context, device: torch.device) -> float:
    if not ctx.distributed:
        return value
    t = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def gather_objects(obj, ctx: Context) -> list:
    """Every rank's ``obj``, in rank order (one element without a group)."""
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def sync_buffers(module: torch.nn.Module, ctx: Context) -> None:
    """Give every rank process 0's buffers (BatchNorm statistics drift apart per process between
    DDP's own broadcasts at each forward)."""
    if ctx.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()
