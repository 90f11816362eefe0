"""Training set-up: seeding, data and loaders, the step schedule, model and optimizer, the DDP
wrap and resume from ``last.pt`` (what ``train_loop`` calls before its first epoch)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cellmorph.cells import CELL, site_codes
from cellmorph.checkpoint import (
    CheckpointSaver,
    check_compatible,
    load_checkpoint,
    restore_rng,
)
from cellmorph.config import (
    Config,
    OptimConfig,
    TrainConfig,
    config_to_dict,
    resolve_from_store,
)
from cellmorph.distributed import Context
from cellmorph.evaluation import (
    Fold,
    resolve_amp,
)
from cellmorph.index import Index, build_index, check_batch_size
from cellmorph.loaders import Loader, build_loader
from cellmorph.loaders.normalize import Normalization, from_store
from cellmorph.model import CellNet, build_model
from cellmorph.rundir import RunDir
from cellmorph.store.layout import DIGEST
from cellmorph.store.read import Store, open_store

# --------------------------------------------------------------------------- schedule


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW at peak ``lr``; no weight decay on norms and biases (decaying them only hurts)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


# --------------------------------------------------------------------------- setup


@dataclass
class Data:
    """The store, its index and this rank's loaders."""

    store: Store
    index: Index
    train_loader: Loader | None  # None when only evaluating
    val_loader: Loader
    test_loader: Loader | None  # scored once, by the chosen model (None: no test fold)
    norm: Normalization  # saved with checkpoints: predict applies the same recipe
    calibration_loader: Loader | None = None  # training images for batch-norm statistics
    sites: np.ndarray | None = None  # cell stores: the site of each row (site-level scores)

    @property
    def fold(self) -> Fold:
        """Labels, well ids (and a cell store's site ids) per store row, for scoring."""
        return Fold(self.index.classes, self.index.labels, self.index.well_ids, self.sites)


@dataclass
class Training:
    """Everything that changes during training; ``model`` is the unwrapped network."""

    model: CellNet
    net: nn.Module  # what runs forward/backward (DDP-wrapped, compiled)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    criterion: nn.Module
    amp_dtype: torch.dtype | None
    device: torch.device


def build_data(cfg: Config, ctx: Context, *, training: bool = True) -> Data:
    """The store, the index and this rank's loaders (no training loader for ``training=False``)."""
    cfg = resolve_from_store(cfg)  # train_loop resolved it; a direct call may not have
    # Only the columns training reads, shared by the node's workers (one copy per node).
    store = open_store(cfg.data.store, columns=[cfg.data.label_column])
    index = build_index(store.metadata, cfg.data, warn=training)
    if training:
        check_batch_size(cfg.loader.batch_size, index)
    norm = from_store(store, cfg.loader)

    def loader(rows: np.ndarray, train: bool, repeats: np.ndarray | None = None) -> Loader | None:
        if not len(rows):
            return None
        return build_loader(store, rows, index.labels, cfg.loader, train=train,
                            device=ctx.device, seed=cfg.seed, rank=ctx.rank,
                            world_size=ctx.world_size, norm=norm, repeats=repeats)  # fmt: skip

    # Training draws the oversampled epoch from the rows and their counts; an evaluation covers
    # each row once (the study protocol's validation list repeats rows).
    training_loader = loader(index.train, True, index.train_repeats) if training else None
    calibration = loader(calibration_rows(index, cfg), False) if training else None
    val, test = loader(np.unique(index.val), False), loader(np.unique(index.test), False)
    sites = site_codes(store.metadata, index.well_ids) if store.unit == CELL else None
    return Data(store, index, training_loader, val, test, norm, calibration, sites)


def calibration_rows(index: Index, cfg: Config) -> np.ndarray:
    """A fixed sample of the training fold (as the data come, not oversampled), sorted."""
    n = min(cfg.train.bn_calibration_images, len(index.train))
    rng = np.random.default_rng([cfg.seed, 0xB7])
    return np.sort(rng.choice(index.train, n, replace=False)) if n else index.train[:0]


TOO_FEW_STEPS = 200  # below this, a model trained from scratch stays near chance (measured)


@dataclass(frozen=True)
class Schedule:
    """How long and how fast: sized in optimizer steps, so small data still learns."""

    epochs: int
    steps_per_epoch: int
    warmup: int
    lr: float  # peak, scaled to the global batch
    global_batch: int
    added_epochs: int  # by train.min_steps

    @property
    def total(self) -> int:
        return self.epochs * self.steps_per_epoch

    def describe(self) -> str:
        added = f" (+{self.added_epochs} for train.min_steps)" if self.added_epochs else ""
        text = (
            f"schedule: {self.epochs} epochs{added} x {self.steps_per_epoch} steps = "
            f"{self.total} optimizer steps, global batch {self.global_batch}, peak lr "
            f"{self.lr:.2e}, warm-up {self.warmup} steps"
        )
        if self.total < TOO_FEW_STEPS:
            text += (
                f"\nwarning: {self.total} optimizer steps are too few to learn from scratch; "
                "raise train.epochs or train.min_steps (or lower loader.batch_size)"
            )
        return text


def plan_schedule(cfg: Config, batches_per_epoch: int, world_size: int) -> Schedule:
    """A pure function of the config and the data's size: every rank plans the same."""
    spe = batches_per_epoch
    if cfg.train.max_steps_per_epoch:
        spe = min(spe, cfg.train.max_steps_per_epoch)
    spe = max(spe, 1)
    epochs = cfg.train.epochs
    if not cfg.train.max_steps_per_epoch:  # a capped epoch is a smoke run: as long as asked
        epochs = max(epochs, math.ceil(cfg.train.min_steps / spe))
    global_batch = cfg.loader.batch_size * world_size
    ratio = global_batch / 256
    scale = {"sqrt": math.sqrt(ratio), "linear": ratio, "none": 1.0}[cfg.optim.lr_scaling]
    warmup = min(cfg.optim.warmup_steps, (epochs * spe) // 4)
    return Schedule(
        epochs, spe, warmup, cfg.optim.lr * scale, global_batch, epochs - cfg.train.epochs
    )


def build_training(cfg: Config, data: Data, schedule: Schedule, ctx: Context) -> Training:
    model = build_model(cfg.model, len(data.store.channels), len(data.index.classes))
    model = model.to(ctx.device)
    if ctx.device.type == "cuda" and cfg.train.channels_last is not False:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim, schedule.lr)
    total, warmup, floor = schedule.total, schedule.warmup, cfg.optim.min_lr_ratio
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, floor)
    )
    dtype, use_scaler = resolve_amp(cfg.train.amp, ctx.device)
    weights = data.index.class_weights
    if weights is not None:
        weights = torch.as_tensor(weights, dtype=torch.float32, device=ctx.device)
    criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.optim.label_smoothing)
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    return Training(model, model, optimizer, scheduler, scaler, criterion, dtype, ctx.device)


def wrap(training: Training, cfg: TrainConfig, ctx: Context) -> None:
    """Compile and wrap for DDP after resuming (state dicts load into the plain model)."""
    net: nn.Module = training.model
    if cfg.compile:
        net = torch.compile(net)
    training.net = ctx.wrap_model(net) if ctx.wrap_model else net


def resume(run: RunDir, t: Training, data: Data, cfg: Config, saver: CheckpointSaver) -> int:
    """Load ``last.pt`` if this run has one; returns the first epoch to train.

    Called before any run file is written, so a refused resume changes nothing.
    """
    if not run.last_checkpoint.is_file():
        return 0
    ckpt = load_checkpoint(run.last_checkpoint)
    check_compatible(ckpt, data.index.classes, data.store.channels,
                     config_to_dict(cfg)["model"], run.last_checkpoint,
                     data.store.attrs.get(DIGEST))  # fmt: skip
    t.model.load_state_dict(ckpt["model"])
    t.optimizer.load_state_dict(ckpt["optimizer"])
    t.scheduler.load_state_dict(ckpt["scheduler"])
    if t.scaler is not None and ckpt.get("scaler"):
        t.scaler.load_state_dict(ckpt["scaler"])
    restore_rng(ckpt["rng"])
    saver.restore(ckpt)
    return int(ckpt["epoch"]) + 1
