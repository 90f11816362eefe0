"""The training loop: one ``train_loop(cfg, ctx)`` for local runs and for Ray Train workers.

Reads top to bottom: data → model → optimizer/schedule → resume → epochs (train, evaluate,
checkpoint, report) → final outputs. Rank 0 owns the run directory; every rank computes the
same index and epoch permutation, so ranks agree without talking.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import socket
import time
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from cellmorph.checkpoint import load_checkpoint, save_checkpoint
from cellmorph.config import (
    Config,
    LoaderConfig,
    OptimConfig,
    TrainConfig,
    config_to_dict,
    dump_config,
)
from cellmorph.errors import CellmorphError
from cellmorph.index import Index, build_index, save_label_encoding
from cellmorph.loaders import build_loader
from cellmorph.loaders.augment import normalization
from cellmorph.metrics import compute_metrics
from cellmorph.model import CellNet, build_model
from cellmorph.predict import infer, write_val_outputs
from cellmorph.store import Store, describe, open_store

CHECKPOINTS = "checkpoints"


# --------------------------------------------------------------------------- context


@dataclass
class Context:
    """Where this process sits: rank, world, device, and how to report (Ray or not)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    report: Callable[[dict[str, Any], Path | None], None] | None = None
    wrap_model: Callable[[nn.Module], nn.Module] | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (on every rank)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def local_context(use_gpu: bool = False) -> Context:
    """A single-process context; the GPU only when asked for and present."""
    if use_gpu and not torch.cuda.is_available():
        raise CellmorphError("ray.use_gpu is true but torch sees no CUDA GPU on this machine")
    return Context(device=torch.device("cuda", 0) if use_gpu else torch.device("cpu"))


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


# --------------------------------------------------------------------------- checkpoints


def check_compatible(
    ckpt: dict[str, Any], classes: list[str], channels: list[str], src: Path
) -> None:
    """Refuse to resume or fine-tune across a change of classes or channels."""
    if list(ckpt.get("channels", [])) != list(channels):
        raise CellmorphError(
            f"{src}: checkpoint channels {ckpt.get('channels')} differ from the store's {channels}"
        )
    if list(ckpt.get("classes", [])) != list(classes):
        ck = ckpt.get("classes", [])
        raise CellmorphError(
            f"{src}: checkpoint has {len(ck)} classes {ck[:5]}... but this data has "
            f"{len(classes)} {classes[:5]}...; use a new run name to train from scratch"
        )


def update_best(
    best_k: list[tuple[float, int]], score: float, epoch: int, k: int
) -> tuple[list[tuple[float, int]], list[int]]:
    """The top-``k`` (score, epoch) list after ``epoch`` scored ``score``, best first (ties:
    the earlier epoch), and the epochs that fell out of it."""
    if k == 0 or math.isnan(score):
        return best_k, []
    ranked = sorted([*best_k, (score, epoch)], key=lambda t: (-t[0], t[1]))
    return ranked[:k], [e for _, e in ranked[k:]]


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state()[1].tolist(),
        "python": random.getstate()[1],
    }


def _restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.asarray(state["numpy"], dtype=np.uint32), 624, 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))


# --------------------------------------------------------------------------- one epoch


def train_one_epoch(
    model: nn.Module,
    loader: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    criterion: nn.Module,
    cfg: TrainConfig,
    grad_clip: float,
    amp: tuple[torch.dtype | None, torch.amp.GradScaler | None],
    device: torch.device,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """One pass over this rank's part of the epoch; returns loss and throughput."""
    model.train()
    dtype, scaler = amp
    total_loss, seen, t0 = 0.0, 0, time.perf_counter()
    n_batches = len(loader)
    if cfg.max_steps_per_epoch:
        n_batches = min(n_batches, cfg.max_steps_per_epoch)
    for step, (x, y, _rows) in enumerate(loader):
        if step >= n_batches:
            break
        if device.type == "cuda" and cfg.channels_last is not False:
            x = x.contiguous(memory_format=torch.channels_last)
        ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
        with ctx:
            loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        total_loss += loss.item() * len(y)
        seen += len(y)
        if (step + 1) % cfg.log_every == 0 or step + 1 == n_batches:
            rate = seen / max(time.perf_counter() - t0, 1e-9)
            eta = (n_batches - step - 1) * len(y) / max(rate, 1e-9)
            log(
                f"  step {step + 1}/{n_batches} loss {total_loss / seen:.4f} "
                f"lr {scheduler.get_last_lr()[0]:.2e} {rate:.1f} img/s eta {eta:.0f}s"
            )
    seconds = time.perf_counter() - t0
    return {
        "train_loss": total_loss / max(seen, 1),
        "train_images": seen,
        "train_images_per_s": seen / max(seconds, 1e-9),
        "lr": scheduler.get_last_lr()[0],
    }


def evaluate(model: nn.Module, loader: Any, device: torch.device) -> tuple[np.ndarray, ...]:
    """This rank's validation outputs: store rows, class probabilities, embeddings."""
    return infer(model, loader, device)


# --------------------------------------------------------------------------- the loop


def check_batch_size(cfg: LoaderConfig, index: Index) -> None:
    """A batch larger than the training fold would make every epoch mostly padding."""
    if cfg.batch_size > len(index.train_order):
        raise CellmorphError(
            f"loader.batch_size={cfg.batch_size} is larger than the training fold "
            f"({len(index.train_order)} images)"
        )


def _wells(store: Store, rows: np.ndarray) -> np.ndarray:
    md = store.metadata
    return (md["Metadata_Plate"].astype(str) + "/" + md["Metadata_Well"].astype(str)).to_numpy()[
        rows
    ]


def _check_storage_shared(run_dir: Path, ctx: Context) -> None:
    """Every rank must see rank 0's run directory: checkpoints and resume depend on it."""
    token = ctx.broadcast(uuid.uuid4().hex if ctx.is_main else None)
    marker = run_dir / f".storage-check-{token}"
    if ctx.is_main:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(socket.gethostname())
    ctx.barrier()
    seen = ctx.gather(marker.is_file())
    ctx.barrier()
    if ctx.is_main:
        marker.unlink(missing_ok=True)
    if not all(seen):
        blind = [r for r, ok in enumerate(seen) if not ok]
        raise CellmorphError(
            f"run_root: {run_dir} is not shared between nodes (ranks {blind} cannot see rank 0's "
            "files); point run_root at a shared filesystem (NFS, Lustre, a mounted bucket)"
        )


def _trim_metrics(path: Path, before_epoch: int) -> None:
    """Keep one line per epoch < ``before_epoch`` (the latest): a resumed run logs each once."""
    if not path.is_file():
        return
    latest: dict[int, str] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            epoch = int(json.loads(line).get("epoch", -1))
            if epoch < before_epoch:
                latest[epoch] = line
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(latest[e] + "\n" for e in sorted(latest)))
    os.replace(tmp, path)


def _prepare_run_dir(cfg: Config, store: Store, index: Index, ctx: Context) -> Path:
    run_dir = cfg.run_dir
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
        save_label_encoding(index.classes, cfg.data.label_column, run_dir / "classes.json")
        summary = {**describe(store), **index.summary}
        summary.pop("class_counts", None)
        (run_dir / "data_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    _check_storage_shared(run_dir, ctx)
    return run_dir


def train_loop(cfg: Config, ctx: Context) -> dict[str, Any]:
    """Train ``cfg`` in this process (one rank of ``ctx``); returns the final metrics."""
    log = print if ctx.is_main else (lambda _msg: None)
    torch.manual_seed(cfg.seed + ctx.rank)
    np.random.seed(cfg.seed + ctx.rank)
    random.seed(cfg.seed + ctx.rank)

    # --- data
    store = open_store(cfg.data.store)
    index = build_index(store.metadata, cfg.data)
    check_batch_size(cfg.loader, index)
    run_dir = _prepare_run_dir(cfg, store, index, ctx)
    norm = normalization(store, cfg.loader)  # saved with checkpoints: predict reuses it
    train_loader = build_loader(
        store, index.train_order, index.labels, cfg.loader, train=True, device=ctx.device,
        seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size,
    )  # fmt: skip
    val_loader = build_loader(
        store, index.val, index.labels, cfg.loader, train=False, device=ctx.device,
        seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size,
    )  # fmt: skip

    # --- model, optimizer, schedule
    model = build_model(cfg.model, len(store.channels), len(index.classes)).to(ctx.device)
    if ctx.device.type == "cuda" and cfg.train.channels_last is not False:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim)
    steps_per_epoch = len(train_loader)
    if cfg.train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch)
    total_steps = steps_per_epoch * cfg.train.epochs
    warmup = int(cfg.optim.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, cfg.optim.min_lr_ratio)
    )
    dtype, use_scaler = resolve_amp(cfg.train.amp, ctx.device)
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    weights = None
    if index.class_weights is not None:
        weights = torch.as_tensor(index.class_weights, dtype=torch.float32, device=ctx.device)
    criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.optim.label_smoothing)

    # --- resume (after a worker failure, or the same run name submitted again)
    start_epoch, best_k = 0, []
    last_path = run_dir / CHECKPOINTS / "last.pt"
    if last_path.is_file():
        ckpt = load_checkpoint(last_path)
        check_compatible(ckpt, index.classes, store.channels, last_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        _restore_rng(ckpt["rng"])
        start_epoch = int(ckpt["epoch"]) + 1
        best_k = [(float(s), int(e)) for s, e in ckpt.get("best_k", [])]
        log(f"resuming {run_dir.name} from epoch {start_epoch} ({last_path})")
        if ctx.is_main:  # a visible trace of every restart, for users and the failure test
            with (run_dir / "events.jsonl").open("a") as f:
                f.write(
                    json.dumps({"event": "resume", "epoch": start_epoch, "time": time.time()})
                    + "\n"
                )
    if ctx.is_main:
        _trim_metrics(run_dir / "metrics.jsonl", start_epoch)

    if cfg.train.compile:
        model = torch.compile(model)
    ddp_model = ctx.wrap_model(model) if ctx.wrap_model else model
    raw_model: CellNet = getattr(model, "_orig_mod", model)

    # --- epochs
    metrics: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.train.epochs):
        train_loader.set_epoch(epoch)
        log(f"epoch {epoch + 1}/{cfg.train.epochs}")
        stats = train_one_epoch(
            ddp_model, train_loader, optimizer, scheduler, criterion, cfg.train,
            cfg.optim.grad_clip, (dtype, scaler), ctx.device, log,
        )  # fmt: skip
        parts = ctx.gather(evaluate(ddp_model, val_loader, ctx.device))
        rows, probs, embs = (np.concatenate([p[i] for p in parts]) for i in range(3))
        record: dict[str, Any] = {"epoch": epoch, "world_size": ctx.world_size, **stats}
        if ctx.is_main:
            metrics = compute_metrics(
                index.labels[rows], probs, index.classes, wells=_wells(store, rows),
                top_k=cfg.eval.top_k,
            )  # fmt: skip
            record.update({k: v for k, v in metrics.items() if np.isscalar(v)})
            score = float(metrics.get(cfg.train.best_metric, float("nan")))
            best_k, dropped = update_best(best_k, score, epoch, cfg.train.keep_best)
            state = {
                "model": raw_model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "epoch": epoch,
                "best_k": [list(t) for t in best_k],
                "rng": _rng_state(),
                "config": config_to_dict(cfg),
                "classes": index.classes,
                "label_column": cfg.data.label_column,
                "channels": store.channels,
                "image_size": cfg.loader.image_size,
                "norm": {"mean": norm[0].tolist(), "std": norm[1].tolist()},
                "metrics": {k: v for k, v in record.items() if np.isscalar(v)},
            }
            ckpt_dir = run_dir / CHECKPOINTS
            if any(e == epoch for _, e in best_k):
                save_checkpoint(state, ckpt_dir / f"best-epoch{epoch:03d}.pt")
            for old in dropped:
                (ckpt_dir / f"best-epoch{old:03d}.pt").unlink(missing_ok=True)
            if best_k and best_k[0][1] == epoch:  # the new best: what evaluate/predict use
                save_checkpoint(state, ckpt_dir / "best.pt")
                write_val_outputs(
                    run_dir, rows, probs, embs, index.labels[rows], index.classes, store.metadata
                )
                (run_dir / "metrics.json").write_text(
                    json.dumps({"epoch": epoch, **metrics}, indent=2)
                )
            # The metrics line goes first: a crash before the checkpoint reruns this epoch,
            # and the trim on resume then keeps exactly one line for it.
            with (run_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
            save_checkpoint(state, last_path)
            log(
                f"  val acc {metrics['accuracy']:.3f} balanced {metrics['balanced_accuracy']:.3f} "
                f"macro-F1 {metrics['macro_f1']:.3f} (chance {metrics['chance']:.3f})"
            )
        ctx.barrier()
        if ctx.report is not None:
            scalars = {k: v for k, v in record.items() if isinstance(v, int | float)}
            ctx.report(scalars, last_path if ctx.is_main else None)

    if ctx.is_main:
        if not (run_dir / "metrics.json").is_file():  # keep_best=0: the last epoch is the result
            write_val_outputs(
                run_dir, rows, probs, embs, index.labels[rows], index.classes, store.metadata
            )
            (run_dir / "metrics.json").write_text(json.dumps({"epoch": epoch, **metrics}, indent=2))
        metrics = json.loads((run_dir / "metrics.json").read_text())
    return metrics


def run_local(cfg: Config) -> Path:
    """Train in this process without Ray (debugging, tests, the audit); returns the run dir."""
    train_loop(cfg, local_context(cfg.ray.use_gpu))
    return cfg.run_dir


# --------------------------------------------------------------------------- CLI


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (Ray Train, or --local in this process)")
    p.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("--local", action="store_true", help="train in this process, without Ray")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. train.epochs=3")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from cellmorph.config import load_config
    from cellmorph.launch import resolve_paths, run_ray_training

    cfg = resolve_paths(load_config(args.config, args.overrides))
    run_dir = run_local(cfg) if args.local else run_ray_training(cfg)
    print(f"run: {run_dir}")
    return 0
