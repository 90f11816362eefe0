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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from cellmorph import atomic
from cellmorph.checkpoint import (
    CheckpointSaver,
    check_compatible,
    load_checkpoint,
    restore_rng,
    rng_state,
)
from cellmorph.config import Config, OptimConfig, TrainConfig, config_to_dict
from cellmorph.distributed import Context, interactive, local_context
from cellmorph.errors import CellmorphError
from cellmorph.index import Index, build_index, check_batch_size
from cellmorph.loaders import Loader, build_loader
from cellmorph.loaders.transform import normalization
from cellmorph.metrics import compute_metrics
from cellmorph.model import CellNet, build_model
from cellmorph.predict import infer
from cellmorph.progress import StepProgress
from cellmorph.rundir import RunDir, ValOutputs
from cellmorph.store import DIGEST, Store, describe, open_store, well_ids

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


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms and biases (decaying them only hurts)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr)


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
    train_loader: Loader
    val_loader: Loader
    norm: tuple[np.ndarray, np.ndarray]  # saved with checkpoints: predict reuses it


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


def build_data(cfg: Config, ctx: Context) -> Data:
    store = open_store(cfg.data.store)
    index = build_index(store.metadata, cfg.data)
    check_batch_size(cfg.loader.batch_size, index)
    norm = normalization(store, cfg.loader)
    loaders = [
        build_loader(store, rows, index.labels, cfg.loader, train=train, device=ctx.device,
                     seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size, norm=norm)
        for rows, train in ((index.train_order, True), (index.val, False))
    ]  # fmt: skip
    return Data(store, index, loaders[0], loaders[1], norm)


def steps_per_epoch(cfg: TrainConfig, loader: Loader) -> int:
    n = len(loader)
    return min(n, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else n


def build_training(cfg: Config, data: Data, ctx: Context) -> Training:
    model = build_model(cfg.model, len(data.store.channels), len(data.index.classes))
    model = model.to(ctx.device)
    if ctx.device.type == "cuda" and cfg.train.channels_last is not False:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim)
    total = steps_per_epoch(cfg.train, data.train_loader) * cfg.train.epochs
    warmup = int(cfg.optim.warmup_epochs * steps_per_epoch(cfg.train, data.train_loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, cfg.optim.min_lr_ratio)
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


def train_one_epoch(t: Training, loader: Loader, epoch: int, cfg: TrainConfig,
                    grad_clip: float, progress: StepProgress) -> dict[str, float]:  # fmt: skip
    """One pass over this rank's part of the epoch; returns loss and throughput.

    The loss is summed on the device and read only at the log interval: ``loss.item()`` every
    step would make the host wait for the GPU every step.
    """
    t.net.train()
    n_steps = steps_per_epoch(cfg, loader)
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


def evaluate(model: nn.Module, loader: Loader, data: Data, ctx: Context) -> ValOutputs | None:
    """The validation outputs of every rank, on rank 0 (None on the others)."""
    parts = ctx.gather(infer(model, loader, ctx.device))
    if not ctx.is_main:
        return None
    rows, probs, embs = (np.concatenate([p[i] for p in parts]) for i in range(3))
    return ValOutputs(rows, probs, embs, data.index.labels[rows])


def score(val: ValOutputs, data: Data, cfg: Config) -> dict[str, Any]:
    wells = well_ids(data.store.metadata)[val.rows]
    return compute_metrics(val.labels, val.probs, data.index.classes, wells=wells,
                           top_k=cfg.eval.top_k)  # fmt: skip


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
        "norm": {"mean": data.norm[0].tolist(), "std": data.norm[1].tolist()},
        "metrics": {k: v for k, v in record.items() if np.isscalar(v)},
    }


def end_epoch(run: RunDir, saver: CheckpointSaver, t: Training, data: Data, cfg: Config,
              record: dict[str, Any], val: ValOutputs) -> dict[str, Any]:  # fmt: skip
    """Rank 0: score the epoch, log it, checkpoint it, and keep it as the result if best."""
    metrics = score(val, data, cfg)
    record.update({k: v for k, v in metrics.items() if np.isscalar(v)})
    # The metrics line goes first: a crash before the checkpoint reruns this epoch, and the
    # trim at resume then keeps exactly one line for it.
    run.log_epoch(record)
    if saver.is_better(float(metrics.get(cfg.train.best_metric, float("nan")))):
        result = {"epoch": record["epoch"], **metrics}
        run.write_result(result, val, data.index.classes, data.store.metadata)
    saver.save(checkpoint_state(t, data, cfg, record), record["epoch"],
               float(metrics.get(cfg.train.best_metric, float("nan"))))  # fmt: skip
    return record


# --------------------------------------------------------------------------- the loop


def train_loop(cfg: Config, ctx: Context) -> dict[str, Any]:
    """Train ``cfg`` as one rank of ``ctx``; returns the result (the best epoch's metrics)."""
    seed_everything(cfg.seed + ctx.rank)
    run = RunDir(cfg.run_dir)
    data = build_data(cfg, ctx)
    t = build_training(cfg, data, ctx)
    saver = CheckpointSaver(run, cfg.train.best_metric, cfg.best_mode, cfg.train.keep_best)
    start = resume(run, t, data, cfg, saver)  # refuses before any run file is written
    workers = ctx.gather(ctx.process())
    if ctx.is_main:
        summary = {**describe(data.store), **data.index.summary}
        summary.pop("class_counts", None)
        run.create(config_to_dict(cfg), data.index.classes, cfg.data.label_column, summary)
        run.begin(start, workers)
    check_storage_shared(run, ctx)
    wrap(t, cfg.train, ctx)
    progress = StepProgress(run, cfg.train.epochs, enabled=ctx.is_main, console=ctx.console,
                            bar=interactive())  # fmt: skip
    if start > 0:
        progress.message(f"resuming {run.name} at epoch {start + 1} ({run.last_checkpoint})")
    for epoch in range(start, cfg.train.epochs):
        t0 = time.perf_counter()
        data.train_loader.set_epoch(epoch)
        stats = train_one_epoch(t, data.train_loader, epoch, cfg.train, cfg.optim.grad_clip,
                                progress)  # fmt: skip
        val = evaluate(t.net, data.val_loader, data, ctx)
        record: dict[str, Any] = {"epoch": epoch, "world_size": ctx.world_size, **stats}
        if ctx.is_main:
            record["seconds"] = time.perf_counter() - t0
            end_epoch(run, saver, t, data, cfg, record, val)
            progress.end_epoch(record)
        ctx.barrier()
        if ctx.report is not None:
            scalars = {k: v for k, v in record.items() if isinstance(v, int | float)}
            ctx.report(scalars, run.last_checkpoint if ctx.is_main else None)
    return run.read_result() if ctx.is_main else {}


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
        raise CellmorphError(
            f"run_root: {run.path} is not shared between nodes (ranks {blind} cannot see rank "
            "0's files); point run_root at a shared filesystem (NFS, Lustre, a mounted bucket)"
        )


def run_local(cfg: Config) -> RunDir:
    """Train in this process without Ray (debugging, tests, the audit); returns the run."""
    train_loop(cfg, local_context(cfg.ray.use_gpu))
    return RunDir(cfg.run_dir)
