"""Random state: seeding a run, and saving / restoring every generator it draws from (Python,
NumPy, torch CPU and CUDA) so that a resumed run continues exactly."""
from __future__ import annotations

import random
import warnings
from collections.abc import Callable

import numpy as np
import torch

from . import distributed


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    version, keys, gauss = random.getstate()
    kind, mt, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(keys), gauss], "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(mt.astype(np.int64)), pos, has_gauss, cached]}


def set_rng_state(state: dict) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    kind, mt, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, mt.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RandomStreams:
    """Every process's generators as a part of a checkpoint's training state (``state_dict`` gathers
    them: every process takes part). Loaded on as many processes as saved them, each continues its
    own; on another number they restart from ``seed`` + rank + the step (``step()``), with a warning."""

    def __init__(self, ctx: distributed.Context, seed: int, step: Callable[[], int]):
        self.ctx, self.seed, self.step = ctx, seed, step

    def state_dict(self) -> dict:
        return {"world_size": self.ctx.world_size, "states": distributed.gather_objects(rng_state(), self.ctx)}

    def load_state_dict(self, state: dict) -> None:
        if state["world_size"] == self.ctx.world_size:
            set_rng_state(state["states"][self.ctx.rank])
            return
        warnings.warn(f"the checkpoint was written by {state['world_size']} processes, resuming with "
                      f"{self.ctx.world_size}: random streams restart from train.seed")
        seed_everything(self.seed + self.ctx.rank + self.step())
