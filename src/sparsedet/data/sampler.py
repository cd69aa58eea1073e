"""Deterministic, resumable batches: aspect-ratio grouping, sharding over processes and one
augmentation seed per sample.

Every batch is a list of ``(index, sample_seed)``. The order of an epoch depends only on
``(seed, epoch)``, and a sample's augmentation only on its ``sample_seed``, so a run resumed at
``(epoch, batch)`` sees exactly the data an uninterrupted run would, whatever the number of
data-loader workers.
"""
from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, Sampler

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads (seed, epoch, index) over the seed space


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * _MIX + epoch) * _MIX + index) % (1 << 63)


class GroupedBatchSampler(Sampler[list[tuple[int, int]]]):
    """Shuffled batches of ``batch_size`` samples per process, drawn from one global order.

    ``groups[i]`` is the aspect group of sample ``i`` (0 landscape, 1 portrait; all equal: no
    grouping). A global batch of ``batch_size * world_size`` samples comes from one group; process
    ``rank`` takes its slice. The epoch's leftovers form mixed batches; with several processes the
    last global batch is filled up with samples from the start of the epoch so that every process
    runs the same number of steps.
    """

    def __init__(self, groups: Sequence[int], batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not groups:
            raise ValueError("GroupedBatchSampler needs at least one sample")
        self.groups, self.batch_size, self.seed = list(groups), batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The epoch to draw next; ``start`` skips that many of its batches (resuming)."""
        self.epoch, self.start = epoch, start

    def _global_batches(self) -> list[list[int]]:
        n, size = len(self.groups), self.batch_size * self.world_size
        if self.shuffle:
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, 0))
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        batches, buckets = [], {}
        for i in order:
            bucket = buckets.setdefault(self.groups[i], [])
            bucket.append(i)
            if len(bucket) == size:
                batches.append(bucket[:])
                bucket.clear()
        rest = [i for bucket in buckets.values() for i in bucket]
        batches += [rest[k:k + size] for k in range(0, len(rest), size)]
        if self.world_size > 1 and len(batches[-1]) < size:
            fill = (order * (size // n + 1))[:size - len(batches[-1])]
            batches[-1] = batches[-1] + fill
        return batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        for batch in self._global_batches()[self.start:]:
            yield [(i, sample_seed(self.seed, self.epoch, i)) for i in batch[lo:hi]]
        self.start = 0

    def __len__(self) -> int:
        return len(self._global_batches()) - self.start


@dataclass
class DataPosition:
    """Where training is in its data: the epoch and how many of its batches it has trained on, where
    :meth:`GroupedBatchSampler.set_epoch` starts again after a resume. Counted by the consumer of the
    batches, since a data loader draws its sampler's batches ahead of their use."""

    epoch: int = 0
    batch: int = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch = state["epoch"], state["batch_in_epoch"]


def aspect_groups(sizes: Sequence[tuple[int, int]]) -> list[int]:
    """0 for landscape or square (w >= h), 1 for portrait, from (height, width) pairs."""
    return [0 if w >= h else 1 for h, w in sizes]


class SeededSamples(Dataset):
    """``dataset[index]`` with Python's ``random`` seeded by the sample's own seed (the transforms
    draw from it), leaving the caller's random state as it was."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        state = random.getstate()
        random.seed(seed)
        try:
            return self.dataset[index]
        finally:
            random.setstate(state)


def shape_batches(sizes: Sequence[tuple[int, int]], indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """``indices`` in batches of at most ``batch_size`` whose images, of (height, width) ``sizes[i]``,
    have like shapes: sorted by aspect ratio, then area (then index), so a batch pads little."""
    order = sorted(indices, key=lambda i: (sizes[i][1] / sizes[i][0], sizes[i][0] * sizes[i][1], i))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
