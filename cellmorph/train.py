"""The training loop: one ``train_loop(cfg, ctx)`` for local runs and for Ray Train workers.

Reads top to bottom: data -> model and optimizer -> resume -> for each epoch: train, evaluate,
hand the result to the run directory -> the result. Rank 0 owns the run directory; every rank
computes the same index and epoch permutation, so ranks agree without talking.
"""

from __future__ import annotations

import math
import random
import time
import uuid
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from cellmorph import atomic, runlock, tracking
from cellmorph.checkpoint import (
    CheckpointSaver,
    check_compatible,
    check_same_store,
    load_checkpoint,
    read_checkpoint,
    restore_rng,
    rng_state,
)
from cellmorph.config import Config, OptimConfig, TrainConfig, config_to_dict
from cellmorph.distributed import Context, interactive, local_context
from cellmorph.errors import CellmorphError
from cellmorph.index import Index, build_index, check_batch_size
from cellmorph.loaders import Loader, build_loader
from cellmorph.loaders.normalize import Normalization, from_store
from cellmorph.metrics import (
    ImageSums,
    WellSums,
    merge_open,
    scores_from_sums,
    well_confusion,
    well_labels,
)
from cellmorph.model import CellNet, build_model
from cellmorph.predict import (
    iter_infer,
    model_from_checkpoint,
    profile_wells,
    resolve_device,
    treatments,
)
from cellmorph.progress import StepProgress
from cellmorph.rundir import OutputPart, RunDir
from cellmorph.sampling import sample_wells
from cellmorph.store import DIGEST, Store, describe, open_store

# --------------------------------------------------------------------------- schedule / amp


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_amp(mode: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether to use a GradScaler) for ``train.amp`` on ``device``."""
    if device.type == "cuda":
        if mode == "auto":
            return (
                (torch.bfloat16, False) if torch.cuda.is_bf16_supported() else (torch.float16, True)
            )
        if mode == "bf16":
            return torch.bfloat16, False
        if mode == "fp16":
            return torch.float16, True
        return None, False
    if mode == "fp16":
        raise CellmorphError(
            "train.amp: fp16 with a GradScaler needs a GPU; use bf16 or off on CPU"
        )
    # On CPU, autocast costs more than it saves for this model: off unless asked.
    return (torch.bfloat16, False) if mode == "bf16" else (None, False)


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
    # Only the columns training reads, shared by the node's workers (one copy per node).
    store = open_store(cfg.data.store, columns=[cfg.data.label_column])
    index = build_index(store.metadata, cfg.data, warn=training)
    if training:
        check_batch_size(cfg.loader.batch_size, index)
    norm = from_store(store, cfg.loader)
    train_rows = index.train_order if training else index.train_order[:0]
    # An evaluation covers each row once (the study protocol's validation list repeats rows).
    loaders = [
        build_loader(store, rows, index.labels, cfg.loader, train=train, device=ctx.device,
                     seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size, norm=norm)
        if len(rows) else None
        for rows, train in ((train_rows, True), (np.unique(index.val), False),
                            (np.unique(index.test), False),
                            (calibration_rows(index, cfg) if training else train_rows, False))
    ]  # fmt: skip
    return Data(store, index, *loaders[:3], norm, loaders[3])


def calibration_rows(index: Index, cfg: Config) -> np.ndarray:
    """A fixed sample of the training fold (as the data come, not oversampled), sorted."""
    n = min(cfg.train.bn_calibration_images, len(index.train))
    rng = np.random.default_rng([cfg.seed, 0xB7])
    return np.sort(rng.choice(index.train, n, replace=False)) if n else index.train[:0]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Loader | None, ctx: Context) -> None:
    """Precise batch norm: recompute every BatchNorm's statistics with the current weights.

    Early in training the running averages lag weights that still move fast, and evaluation
    with them predicts one class; recomputed averages fix that (Wu & Johnson, "Rethinking
    Batch Normalization", 2021). Each rank measures its part, then the ranks average.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if loader is None or not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the calibration batches
    model.train()
    for x, _y, _rows in loader:
        model(x.to(ctx.device, non_blocking=True))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
        if ctx.distributed:
            for buf in (m.running_mean, m.running_var):
                torch.distributed.all_reduce(buf)
                buf /= ctx.world_size


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


# --------------------------------------------------------------------------- one epoch


def train_one_epoch(t: Training, loader: Loader, epoch: int, n_steps: int, cfg: TrainConfig,
                    grad_clip: float, progress: StepProgress) -> dict[str, float]:  # fmt: skip
    """One pass over this rank's part of the epoch; returns loss and throughput.

    The loss is summed on the device and read only at the log interval: ``loss.item()`` every
    step would make the host wait for the GPU every step.
    """
    t.net.train()
    loss_sum = torch.zeros((), device=t.device)
    seen, t0 = 0, time.perf_counter()
    progress.start_epoch(epoch, n_steps)
    for step, (x, y, _rows) in enumerate(loader):
        if step >= n_steps:
            break
        if t.device.type == "cuda" and cfg.channels_last is not False:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = (
            torch.autocast(t.device.type, dtype=t.amp_dtype) if t.amp_dtype else nullcontext()
        )
        with autocast:
            loss = t.criterion(t.net(x), y)
        t.optimizer.zero_grad(set_to_none=True)
        _backward_and_step(t, loss, grad_clip)
        loss_sum += loss.detach() * len(y)
        seen += len(y)
        if (step + 1) % cfg.log_every == 0 or step + 1 == n_steps:
            rate = seen / max(time.perf_counter() - t0, 1e-9)
            progress.step(epoch, step + 1, n_steps, loss_sum.item() / seen, rate)
    seconds = time.perf_counter() - t0
    return {
        "train_loss": loss_sum.item() / max(seen, 1),
        "train_images": seen,
        "train_images_per_s": seen / max(seconds, 1e-9),
        "lr": t.scheduler.get_last_lr()[0],
    }


def _backward_and_step(t: Training, loss: torch.Tensor, grad_clip: float) -> None:
    if t.scaler is not None:
        t.scaler.scale(loss).backward()
        t.scaler.unscale_(t.optimizer)
    else:
        loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(t.model.parameters(), grad_clip)
    if t.scaler is not None:
        t.scaler.step(t.optimizer)
        t.scaler.update()
    else:
        t.optimizer.step()
    t.scheduler.step()


@dataclass
class WellProfiles:
    """Mean embedding and input statistics of the profiled wells of a fold (rank 0)."""

    first_rows: np.ndarray  # a store row of each well (its first in the fold), ascending
    counts: np.ndarray  # the well's images in the fold
    embeddings: np.ndarray  # (W, D)
    features: np.ndarray  # (W, F)
    wells_in_fold: int


@dataclass
class FoldResult:
    """A model's scores on one fold, and the profiles of its wells when asked (rank 0)."""

    metrics: dict[str, Any]
    profiles: WellProfiles | None = None


@dataclass
class _Pass:
    """One rank's sums over its part of a fold (see :func:`evaluate`)."""

    image: ImageSums
    wells: WellSums  # probabilities per well, all wells
    well_labels: np.ndarray  # per well id
    well_cm: np.ndarray  # (K, K) confusion of the wells closed on this rank
    profiled: np.ndarray | None  # bool per well id: wells whose profiles are kept
    profiles: WellSums | None = None
    closed: list[tuple[np.ndarray, ...]] = field(default_factory=list)  # closed profiled wells

    def add(self, rows: np.ndarray, probs: np.ndarray, emb: np.ndarray, feats: np.ndarray,
            labels: np.ndarray, wells: np.ndarray) -> None:  # fmt: skip
        self.image.add(labels[rows], probs)
        ids = wells[rows]
        closed = self.wells.add(ids, probs)
        if closed is not None:
            k = self.well_cm.shape[0]
            self.well_cm += well_confusion(self.well_labels[closed[0]], closed[2], k)
        if self.profiled is None:
            return
        if self.profiles is None:  # widths known with the first batch
            self.profiles = WellSums(self.wells.expected, [emb.shape[1], feats.shape[1]])
        keep = self.profiled[ids]
        closed = self.profiles.add(ids[keep], emb[keep], feats[keep])
        if closed is not None:
            self.closed.append(closed)


def evaluate(model: nn.Module, loader: Loader, rows: np.ndarray, data: Data, ctx: Context,
             top_k: int, *, profiled: np.ndarray | None = None,
             part: OutputPart | None = None) -> FoldResult | None:  # fmt: skip
    """Score ``model`` on a fold (``rows``, the rows ``loader`` covers across ranks).

    Each rank adds up its images (confusion, top-k hits, log loss) and closes each well whose
    images it saw (mean probability -> the wells' confusion); ranks then add their sums (one
    all-reduce) and rank 0 merges the few wells split between two ranks. No probability or
    embedding goes to rank 0; the per-image outputs go to ``part`` (this rank's file).
    ``profiled`` (bool per well id) keeps those wells' mean embeddings and input statistics.
    Returns the result on rank 0, None on the others.
    """
    rows = np.unique(rows)
    k, wells = len(data.index.classes), data.index.well_ids
    labels = data.index.labels
    expected = np.bincount(wells[rows], minlength=int(wells.max()) + 1)
    sums = _Pass(ImageSums(k, top_k), WellSums(expected, [k]), well_labels(rows, labels, wells, k),
                 np.zeros((k, k), np.int64), profiled)  # fmt: skip
    for r, probs, emb, feats in iter_infer(model, loader, ctx.device):
        sums.add(r, probs, emb, feats, labels, wells)
        if part is not None:
            part.write(r, labels[r], probs, emb)
    opened = ctx.gather_to_main(
        (sums.wells.open_wells(), sums.profiles.open_wells() if sums.profiles else None,
         sums.closed)
    )  # fmt: skip
    if ctx.is_main:  # the wells split between ranks, whole again
        split = merge_open([o[0] for o in opened])
        sums.well_cm += well_confusion(sums.well_labels[split[0]], split[2], k)
    total = ctx.sum(np.concatenate([sums.image.vector(), sums.well_cm.ravel()]))
    if not ctx.is_main:
        return None
    image = sums.image.load(total[: k * k + 2])
    metrics = scores_from_sums(image, data.index.classes, total[k * k + 2 :].reshape(k, k))
    profiles = _profiles(opened, rows, wells) if profiled is not None else None
    return FoldResult(metrics, profiles)


def _profiles(opened: list[tuple], rows: np.ndarray, wells: np.ndarray) -> WellProfiles:
    """Rank 0: the profiled wells' means, from every rank's closed and split wells, in the
    order of their first image in the fold."""
    parts = [c for o in opened for c in o[2]]
    split = [o[1] for o in opened if o[1] is not None]
    if split:
        parts.append(merge_open(split))
    ids, first = np.unique(wells[rows], return_index=True)
    if not parts:
        return WellProfiles(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 0)),
                            np.zeros((0, 0)), len(ids))  # fmt: skip
    got, counts, emb, feat = (np.concatenate(c) for c in zip(*parts))
    first_row = rows[first][np.searchsorted(ids, got)]
    order = np.argsort(first_row)
    return WellProfiles(first_row[order], counts[order], emb[order], feat[order], len(ids))


def checkpoint_state(
    t: Training, data: Data, cfg: Config, record: dict[str, Any]
) -> dict[str, Any]:
    return {
        "model": t.model.state_dict(),
        "optimizer": t.optimizer.state_dict(),
        "scheduler": t.scheduler.state_dict(),
        "scaler": t.scaler.state_dict() if t.scaler is not None else None,
        "rng": rng_state(),
        "config": config_to_dict(cfg),
        "classes": data.index.classes,
        "label_column": cfg.data.label_column,
        "channels": data.store.channels,
        "store_digest": data.store.attrs.get(DIGEST),  # which store generation (resume, evaluate)
        "image_size": cfg.loader.image_size,
        "norm": data.norm.to_dict(),
        "metrics": {k: v for k, v in record.items() if np.isscalar(v)},
    }


def end_epoch(run: RunDir, saver: CheckpointSaver, t: Training, data: Data, cfg: Config,
              record: dict[str, Any], val: FoldResult) -> dict[str, Any]:  # fmt: skip
    """Rank 0: log the epoch's scores, checkpoint it, and keep it as the result if best."""
    metrics = val.metrics
    record.update({k: v for k, v in metrics.items() if np.isscalar(v)})
    # The metrics line goes first: a crash before the checkpoint reruns this epoch, and the
    # trim at resume then keeps exactly one line for it.
    run.log_epoch(record)
    best = float(metrics.get(cfg.train.best_metric, float("nan")))
    if saver.is_better(best):
        run.write_selection(record["epoch"], metrics)
    saver.save(checkpoint_state(t, data, cfg, record), record["epoch"], best)
    return record


def finish(run: RunDir, t: Training, data: Data, cfg: Config, ctx: Context) -> dict[str, Any]:
    """Score the chosen model (``best.pt``) once on the test fold, write both folds' per-image
    outputs, and profile the headline fold's wells.

    Every rank takes part (each fold is split across ranks); rank 0 writes the result.
    """
    done = ctx.broadcast(ctx.is_main and run.read_result().get("fold") == "test")
    if done:
        return run.read_result() if ctx.is_main else {}
    chosen = load_checkpoint(run.eval_checkpoint())  # rank 0's file: the run dir is shared
    t.model.load_state_dict(chosen["model"])
    results = score_folds(run, t.net, data, cfg, ctx)
    if not ctx.is_main:
        return {}
    scores = {"val": run.read_result()["validation"]}  # the epoch's: what chose the model
    if "test" in results:
        scores["test"] = results["test"].metrics
    headline = results["test" if "test" in results else "val"]
    extra = {"selected_by": f"validation {cfg.train.best_metric}",
             "profiling": profile(headline.profiles, data, cfg)}  # fmt: skip
    return run.write_final(int(chosen["epoch"]), scores, extra)


def score_folds(run: RunDir, model: nn.Module, data: Data, cfg: Config,
                ctx: Context) -> dict[str, FoldResult]:  # fmt: skip
    """Evaluate ``model`` on the validation and test folds, each rank streaming its images'
    outputs to its part, which rank 0 then merges into the fold's files; the headline fold
    (test, else validation) keeps well profiles. Results on rank 0 ({} on the others)."""
    folds = [(f, loader, getattr(data.index, f))
             for f, loader in (("val", data.val_loader), ("test", data.test_loader)) if loader]  # fmt: skip
    headline = folds[-1][0]
    results = {}
    for fold, loader, rows in folds:
        part = run.part_writer(fold, ctx.rank)
        try:
            wells = profile_sample(rows, data, cfg) if fold == headline else None
            result = evaluate(model, loader, rows, data, ctx, cfg.eval.top_k,
                              profiled=wells, part=part)  # fmt: skip
        except BaseException:
            part.abort()
            raise
        part.close()
        ctx.barrier()  # every rank's part is complete
        if ctx.is_main:
            run.write_outputs(fold, ctx.world_size, data.index.classes, data.store.metadata_rows())
            results[fold] = result
    return results


def profile_sample(rows: np.ndarray, data: Data, cfg: Config) -> np.ndarray:
    """Bool per well id: the fold's wells to profile (all, or ``sampling.sample_wells``)."""
    wells = data.index.well_ids
    ids, first = np.unique(wells[np.unique(rows)], return_index=True)
    mask = np.zeros(int(wells.max()) + 1, bool)
    treatment, negcon = treatments(data.store, np.unique(rows)[first], cfg.data.label_column)
    mask[ids[sample_wells(treatment, negcon, cfg.seed)]] = True
    return mask


def profile(profiles: WellProfiles | None, data: Data, cfg: Config) -> dict[str, Any]:
    """Phenotypic activity (copairs mAP) of the chosen fold's well profiles."""
    if profiles is None or not len(profiles.first_rows):
        return {"skipped": "no outputs to profile"}
    return profile_wells(data.store, profiles.first_rows, profiles.embeddings, profiles.features,
                         cfg.data.label_column, cfg.seed, profiles.counts,
                         of=profiles.wells_in_fold)  # fmt: skip


# --------------------------------------------------------------------------- the loop


def train_loop(cfg: Config, ctx: Context) -> dict[str, Any]:
    """Train ``cfg`` as one rank of ``ctx``; returns the result (the chosen model's scores)."""
    seed_everything(cfg.seed + ctx.rank)
    run = RunDir(cfg.run_dir)
    data = build_data(cfg, ctx)
    schedule = plan_schedule(cfg, len(data.train_loader), ctx.world_size)
    t = build_training(cfg, data, schedule, ctx)
    saver = CheckpointSaver(run, cfg.train.best_metric, cfg.best_mode, cfg.train.keep_best)
    start = resume(run, t, data, cfg, saver)  # refuses before any run file is written
    workers = ctx.gather(ctx.process())
    if ctx.is_main:
        summary = {**describe(data.store), **data.index.summary, "schedule": asdict(schedule)}
        run.create(config_to_dict(cfg), data.index.classes, cfg.data.label_column, summary)
        run.begin(start, workers)
    tracker = tracking.start(cfg, run) if ctx.is_main else None  # None unless configured
    check_storage_shared(run, ctx)
    wrap(t, cfg.train, ctx)
    progress = StepProgress(run, schedule.epochs, enabled=ctx.is_main, console=ctx.console,
                            bar=interactive())  # fmt: skip
    progress.message(schedule.describe() + (f"; resuming at epoch {start + 1}" if start else ""))
    for epoch in range(start, schedule.epochs):
        t0 = time.perf_counter()
        data.train_loader.set_epoch(epoch)
        stats = train_one_epoch(t, data.train_loader, epoch, schedule.steps_per_epoch, cfg.train,
                                cfg.optim.grad_clip, progress)  # fmt: skip
        recalibrate_bn(t.model, data.calibration_loader, ctx)
        val = evaluate(t.net, data.val_loader, data.index.val, data, ctx, cfg.eval.top_k)
        record: dict[str, Any] = {"epoch": epoch, "epochs": schedule.epochs,
                                  "world_size": ctx.world_size, **stats}  # fmt: skip
        if ctx.is_main:
            record["seconds"] = time.perf_counter() - t0
            end_epoch(run, saver, t, data, cfg, record, val)
            progress.end_epoch(record)
            if tracker is not None:
                tracker.log_epoch(record)
        ctx.barrier()
        if ctx.report is not None:
            scalars = {k: v for k, v in record.items() if isinstance(v, int | float)}
            ctx.report(scalars, run.last_checkpoint if ctx.is_main else None)
    ctx.barrier()
    result = finish(run, t, data, cfg, ctx)
    if tracker is not None:
        tracker.finish()
    return result


def evaluate_run(run: RunDir, device: str = "auto") -> dict[str, Any]:
    """Recompute both folds' outputs and ``metrics.json`` from the run's chosen checkpoint
    (``cellmorph evaluate``): the index is rebuilt from the checkpoint's own config."""
    with runlock.hold(run.path):  # it rewrites the run's outputs: not while the run trains
        ckpt = read_checkpoint(run.eval_checkpoint())
        ctx = Context(device=resolve_device(device), console=True)
        data = build_data(ckpt.config, ctx, training=False)
        # The folds are rebuilt from the store: it must be the one trained on (same rows).
        check_same_store(ckpt.state, data.store.attrs.get(DIGEST), ckpt.path)
        if data.index.classes != ckpt.classes or data.store.channels != ckpt.channels:
            raise CellmorphError(
                f"{ckpt.path}: the store {data.store.path} now gives classes "
                f"{data.index.classes[:5]}... and channels {data.store.channels}; the checkpoint "
                f"has {ckpt.classes[:5]}... and {ckpt.channels}"
            )
        model = model_from_checkpoint(ckpt).to(ctx.device)
        results = score_folds(run, model, data, ckpt.config, ctx)
        scores = {fold: r.metrics for fold, r in results.items()}
        headline = results["test" if "test" in results else "val"]
        extra = {"selected_by": f"validation {ckpt.config.train.best_metric}",
                 "checkpoint": ckpt.path.name,
                 "profiling": profile(headline.profiles, data, ckpt.config)}  # fmt: skip
        return run.write_final(ckpt.epoch, scores, extra)


def check_storage_shared(run: RunDir, ctx: Context) -> None:
    """Every rank must see rank 0's run directory: checkpoints and resume depend on it."""
    if ctx.world_size == 1:
        return
    marker = run.path / f".storage-check-{ctx.broadcast(uuid.uuid4().hex)}"
    if ctx.is_main:
        atomic.write_text(marker, "")
    ctx.barrier()
    seen = ctx.gather(marker.is_file())
    ctx.barrier()
    if ctx.is_main:
        marker.unlink(missing_ok=True)
    if not all(seen):
        blind = [r for r, ok in enumerate(seen) if not ok]
        if run.remote:
            raise CellmorphError(
                f"run_root: ranks {blind} cannot read rank 0's objects in {run.path}; give every "
                "node the same endpoint and credentials (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID...)"
            )
        raise CellmorphError(
            f"run_root: {run.path} is not shared between nodes (ranks {blind} cannot see rank "
            "0's files); point run_root at a shared filesystem (NFS, Lustre) or a bucket (s3://)"
        )


def run_local(cfg: Config) -> RunDir:
    """Train in this process without Ray (debugging, tests, the audit); returns the run."""
    with runlock.hold(RunDir(cfg.run_dir).path):  # this process is the run's one writer
        train_loop(cfg, local_context(cfg.ray.use_gpu))
    return RunDir(cfg.run_dir)
