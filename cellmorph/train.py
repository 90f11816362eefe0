"""The training loop: one ``train_loop(cfg, ctx)`` for local runs and for Ray Train workers.

Reads top to bottom: data -> model and optimizer -> resume -> for each epoch: train, evaluate,
hand the result to the run directory -> the result. Rank 0 owns the run directory; every rank
computes the same index and epoch permutation, so ranks agree without talking.
"""

from __future__ import annotations

import time
import uuid
from contextlib import nullcontext
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from torch import nn

from cellmorph import atomic, runlock, tracking
from cellmorph.checkpoint import (
    CheckpointSaver,
    check_same_store,
    load_checkpoint,
    read_checkpoint,
    rng_state,
)
from cellmorph.config import (
    Config,
    TrainConfig,
    config_to_dict,
    resolve_from_store,
)
from cellmorph.distributed import Context, interactive, local_context
from cellmorph.errors import CellmorphError
from cellmorph.evaluation import (
    FoldResult,
    model_from_checkpoint,
    resolve_amp,
    resolve_device,
    score,
)
from cellmorph.loaders import Loader
from cellmorph.profiles import profile
from cellmorph.progress import StepProgress
from cellmorph.rundir import RunDir
from cellmorph.store.files import check_outside_store
from cellmorph.store.layout import DIGEST
from cellmorph.store.verify import describe
from cellmorph.train_setup import (
    Data,
    Training,
    build_data,
    build_training,
    plan_schedule,
    resume,
    seed_everything,
    wrap,
)

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


def evaluate(model: nn.Module, loader: Loader, rows: np.ndarray, data: Data, ctx: Context,
             cfg: Config) -> FoldResult | None:  # fmt: skip
    """Score ``model`` on a fold with the autocast training uses (rank 0 gets the result)."""
    amp, _ = resolve_amp(cfg.train.amp, ctx.device)
    return score(model, loader, rows, data.fold, ctx, cfg.eval.top_k, amp)


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
    """Score the chosen model (``best.pt``) once on the test fold, write both folds' outputs,
    and profile their wells.

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
    extra = {"selected_by": f"validation {cfg.train.best_metric}",
             "profiling": profile_folds(run, data, cfg, list(results))}  # fmt: skip
    return run.write_final(int(chosen["epoch"]), scores, extra, data.store.unit)


def score_folds(run: RunDir, model: nn.Module, data: Data, cfg: Config,
                ctx: Context) -> dict[str, FoldResult]:  # fmt: skip
    """Score ``model`` on the validation and test folds, writing each fold's per-image and
    per-well outputs into the run directory. Results on rank 0 ({} on the others)."""
    amp, _ = resolve_amp(cfg.train.amp, ctx.device)
    results = {}
    for fold, loader in (("val", data.val_loader), ("test", data.test_loader)):
        if loader is None:
            continue
        out = run.outputs(fold)
        if ctx.is_main:
            out.remove_stale()
        ctx.barrier()
        result = score(model, loader, getattr(data.index, fold), data.fold, ctx, cfg.eval.top_k,
                       amp, out, data.store)  # fmt: skip
        if result is not None:
            results[fold] = result
    return results


def profile_folds(run: RunDir, data: Data, cfg: Config, folds: list[str]) -> dict[str, Any]:
    """The well profiles (``profiles.parquet``) of every held-out fold (validation and test)
    and their phenotypic activity: they hold enough wells per treatment for most treatments to
    be scored; training wells, which the model has seen, never count."""
    name = " + ".join({"val": "validation", "test": "test"}[f] for f in folds) + " wells"
    label = data.index.summary["label_column"]  # resolved when the data was built
    return profile([run.outputs(f) for f in folds], label, data.store.attrs.get("negcon", ""),
                   cfg.seed, name, run.profiles)  # fmt: skip


# --------------------------------------------------------------------------- the loop


def train_loop(cfg: Config, ctx: Context) -> dict[str, Any]:
    """Train ``cfg`` as one rank of ``ctx``; returns the result (the chosen model's scores)."""
    seed_everything(cfg.seed + ctx.rank)
    cfg = resolve_from_store(cfg)  # config.yaml and checkpoints record the column and size used
    run = RunDir(cfg.run_dir)
    data = build_data(cfg, ctx)
    schedule = plan_schedule(cfg, len(data.train_loader), ctx.world_size)
    t = build_training(cfg, data, schedule, ctx)
    saver = CheckpointSaver(run, cfg.train.best_metric, cfg.best_mode, cfg.train.keep_best)
    start = resume(run, t, data, cfg, saver)  # refuses before any run file is written
    workers = ctx.gather(ctx.process())
    if ctx.is_main:
        summary = {**describe(data.store), "unit": data.store.unit, **data.index.summary,
                   "schedule": asdict(schedule)}  # fmt: skip
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
        val = evaluate(t.net, data.val_loader, data.index.val, data, ctx, cfg)
        record: dict[str, Any] = {"epoch": epoch, "epochs": schedule.epochs,
                                  "run_fraction": (epoch + 1) / schedule.epochs,
                                  "world_size": ctx.world_size, **stats}  # fmt: skip
        if ctx.is_main:
            record["seconds"] = time.perf_counter() - t0
            end_epoch(run, saver, t, data, cfg, record, val)
            progress.end_epoch(record)
            if tracker is not None:
                tracker.log_epoch(record)
        ctx.barrier()
        if epoch + 1 < schedule.epochs:  # the last epoch reports once the run is finished
            report(ctx, record)
    ctx.barrier()
    result = finish(run, t, data, cfg, ctx)
    report(ctx, record if start < schedule.epochs else {})
    if tracker is not None:
        tracker.finish()
    return result


def report(ctx: Context, record: dict[str, Any]) -> None:
    """An epoch's scores to Ray (Tune's scheduler ranks trials by them). The last epoch's go
    after the test fold was scored: a sweep that stops a trial then loses nothing."""
    if ctx.report is not None and record:
        ctx.report({k: v for k, v in record.items() if isinstance(v, int | float)})


def evaluate_run(run: RunDir, device: str = "auto") -> dict[str, Any]:
    """Recompute both folds' outputs and ``metrics.json`` from the run's chosen checkpoint
    (``cellmorph evaluate``): the index is rebuilt from the checkpoint's own config."""
    with runlock.hold(run.path):  # it rewrites the run's outputs: not while the run trains
        return _evaluate_run(run, device)


def _evaluate_run(run: RunDir, device: str) -> dict[str, Any]:
    ckpt = read_checkpoint(run.eval_checkpoint())
    ctx = Context(device=resolve_device(device), console=True)
    data = build_data(ckpt.config, ctx, training=False)
    # The folds are rebuilt from the store: it must be the one trained on (same rows).
    check_same_store(ckpt.state, data.store.attrs.get(DIGEST), ckpt.path)
    if data.index.classes != ckpt.classes or data.store.channels != ckpt.channels:
        raise CellmorphError(
            f"{ckpt.path}: the store {data.store.path} now gives classes "
            f"{data.index.classes[:5]}... and channels {data.store.channels}; the checkpoint has "
            f"{ckpt.classes[:5]}... and {ckpt.channels}"
        )
    model = model_from_checkpoint(ckpt).to(ctx.device)
    results = score_folds(run, model, data, ckpt.config, ctx)
    scores = {fold: r.metrics for fold, r in results.items()}
    extra = {"selected_by": f"validation {ckpt.config.train.best_metric}",
             "checkpoint": ckpt.path.name,
             "profiling": profile_folds(run, data, ckpt.config, list(results))}  # fmt: skip
    return run.write_final(ckpt.epoch, scores, extra, data.store.unit)


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
    check_outside_store(cfg.run_root, cfg.data.store, "run_root")  # as preflight does
    with runlock.hold(RunDir(cfg.run_dir).path):  # this process is the run's one writer
        train_loop(cfg, local_context(cfg.ray.use_gpu))
    return RunDir(cfg.run_dir)
