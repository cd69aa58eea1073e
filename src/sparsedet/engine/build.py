"""Making a :class:`~sparsedet.engine.trainer.Trainer`: its parts (criterion, optimiser, loss
scaler, EMA, DDP wrapper, sampler and loader, run log) and its default hooks."""
from __future__ import annotations

from functools import partial
from itertools import count
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..config import Config, validate
from ..data.batch import collate
from ..data.protocol import DetectionDataset
from ..data.sampler import GroupedBatchSampler, SeededSamples, aspect_groups
from ..errors import SparsedetError
from ..losses.criterion import SetCriterion
from . import distributed
from .hooks import Checkpoints, EMAUpdate, Evaluate, Hook, LogSteps, SpeedWatch, StepPlan, StopOnSignal
from .interrupt import ignore_stop_signals
from .optim import WeightEMA, make_optimizer
from .precision import LossScaler, resolve_precision
from .rng import seed_everything
from .runlog import RunLog
from .trainer import Trainer


def set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)


def free_run_folder(parent: Path = Path("runs"), name: str = "train") -> Path:
    """Create and return the first of ``parent/name``, ``parent/name2``, ``parent/name3``, ... that
    does not exist yet (created here, so that two runs started together never share one)."""
    parent.mkdir(parents=True, exist_ok=True)
    for n in count(1):
        path = parent / (name if n == 1 else f"{name}{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def build_trainer(model, config: Config, train_set: DetectionDataset, val_set: DetectionDataset | None,
                  out_dir: str | Path | None, progress: bool = True, origin: str = "") -> Trainer:
    """A Trainer of ``model`` (a ``sparsedet.Detector`` built from ``config``:
    ``Detector.from_config(config)``) on ``train_set``, evaluating on ``val_set`` (None: no
    evaluation), writing ``out_dir`` (None: the first free ``runs/train``, ``runs/train2``, ...), with
    the default hooks. Under ``torchrun`` it joins the process group. Every part is an attribute of
    the result and may be replaced before ``fit``; ``progress``: a progress bar on process 0, else
    plain log lines; ``origin``: where the model and the schedule come from, for the summary (""
    leaves that line out)."""
    if model.run_config is not config:
        # What training settles in the config (the score threshold) must reach the model, and what
        # the model records when saved or exported (its run_config) must be the run's.
        raise SparsedetError("build_trainer needs the model built from the run's config: pass "
                             "Detector.from_config(config) (or Detector.for_finetuning(run, config)) with that config")
    t = validate(config).train
    ctx, device = distributed.setup(t.device)
    if out_dir is None:  # process 0 picks the folder, the others take its choice
        out_dir = distributed.gather_objects(str(free_run_folder()) if ctx.is_main else None, ctx)[0]
    out_dir = Path(out_dir)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    model = model.to(device)
    autocast_dtype = resolve_precision(t.precision, device, training=True)
    criterion = SetCriterion.for_model(
        config.model, lambda value, device: distributed.mean_over_ranks({"n": value}, ctx, device)["n"])
    optimizer = make_optimizer(model, t, device)
    ema = WeightEMA(model, t.ema_decay) if t.ema else None
    # Unused parameters happen (no denoising queries for an image without boxes), so DDP looks for them.
    net = (DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                   find_unused_parameters=True) if ctx.distributed else model)
    groups = aspect_groups(train_set.image_sizes) if config.data.aspect_grouping else [0] * len(train_set)
    sampler = GroupedBatchSampler(groups, t.batch_size, t.seed, ctx.rank, ctx.world_size)
    # The loader's own generator: creating an iterator must not draw from the global RNG
    # (dropout and denoising draw from it; exact resume depends on that).
    loader = DataLoader(SeededSamples(train_set), batch_sampler=sampler,
                        collate_fn=partial(collate, size_divisor=config.data.size_divisor),
                        num_workers=config.data.num_workers, generator=torch.Generator().manual_seed(t.seed),
                        pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals)
    seed_everything(t.seed + ctx.rank)  # the same model everywhere (DDP broadcasts), own dropout
    return Trainer(config=config, model=model, net=net, criterion=criterion, optimizer=optimizer,
                   scaler=LossScaler(device.type, enabled=autocast_dtype == torch.float16),
                   autocast_dtype=autocast_dtype, ema=ema, sampler=sampler, loader=loader, train_set=train_set,
                   val_set=val_set, log=RunLog(out_dir, ctx.is_main, progress, t.tensorboard), out_dir=out_dir,
                   ctx=ctx, device=device, hooks=default_hooks(config, val_set), origin=origin)


def default_hooks(config: Config, val_set: DetectionDataset | None) -> list[Hook]:
    """EMA update, plan and budget, step logging, evaluation, checkpoints, stop signals: in this
    order, so that evaluation and checkpoints see whether this step ends training and a signal that
    arrives during any of them stops training after this step."""
    t = config.train
    hooks: list[Hook] = [EMAUpdate()] if t.ema else []
    hooks += [StepPlan(), LogSteps(), SpeedWatch()]
    if val_set is not None:
        hooks.append(Evaluate(val_set))
    return hooks + [Checkpoints(t.checkpoint_every, t.keep_checkpoints), StopOnSignal()]
