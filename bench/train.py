"""Training throughput end to end through the real loader versus model-only, in one run.

Builds a small store (``cellmorph.synth`` plate packed by ``conversion.pack.convert``), then
times the same training step (``cellmorph.train.train_one_epoch``: forward, backward, grad
clip, AdamW, LR schedule; AMP and channels_last as ``train.py`` resolves them) fed two ways:

- ``model_only``: ``warmup + steps`` augmented batches read once and kept on the device;
- ``end_to_end``: the same number of batches through ``build_loader(..., train=True)`` with
  augmentation on, per loader variant (torch with each ``--workers`` value, DALI).

The first ``--warmup`` steps of every measurement are excluded (DataLoader worker start-up,
DALI pipeline build, allocator warm-up). Rounds interleave all variants and each keeps its
best, because the machine is shared. ``ratio`` = end_to_end / model_only (goal >= 0.9); on a
GPU the goal is also >= 15,000 images/s on one H100 at 128 px with bf16 and channels_last.

    .venv/bin/python bench/train.py                       # CPU defaults: batch 32, 128 px
    .venv/bin/python bench/train.py --device cuda         # batch 256, bf16, channels_last

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cellmorph.config import (
    ConvertConfig,
    DataConfig,
    LoaderConfig,
    ModelConfig,
    OptimConfig,
    SynthConfig,
    TrainConfig,
)
from cellmorph.evaluation import resolve_amp
from cellmorph.index import build_index
from cellmorph.loaders import build_loader
from cellmorph.model import build_model
from cellmorph.progress import StepProgress
from cellmorph.store import Store, open_store
from cellmorph.synth import generate_plate
from cellmorph.train import train_one_epoch
from cellmorph.train_setup import Training, build_optimizer, lr_factor
from conversion.pack import convert

RATIO_GOAL = 0.9
H100_GOAL_IMG_S = 15_000


# --------------------------------------------------------------------------- data


def build_store(root: Path, images: int, size: int, codec: str) -> Store:
    """A synthetic plate of ``images`` sites (4 per well) packed at ``size`` px."""
    wells = -(-images // 4)
    cols = min(24, wells)
    rows = -(-wells // cols)
    synth = SynthConfig(out=str(root / "raw"), plates=1, rows=rows, cols=cols, sites=4, size=size)
    csv = generate_plate(synth, progress=False)
    cfg = ConvertConfig(load_data=str(csv), size=size, codec=codec, shard_size=128, workers=1)
    convert(cfg, root / "store.zarr")
    return open_store(root / "store.zarr")


class Timed:
    """A loader view of exactly ``warmup + steps`` batches that times the steps after warm-up.

    The clock starts when the training loop asks for batch ``warmup`` (after a device
    synchronisation: the previous steps are finished) and stops when it asks for the batch after
    the last one (``train_one_epoch`` has read the epoch's loss, and the device is synchronised).
    """

    def __init__(self, batches: Callable[[], Iterable], warmup: int, steps: int):
        self.batches, self.warmup, self.steps = batches, warmup, steps
        self.device = torch.device("cpu")  # the trainer's device, synchronised at the clock
        self.images = 0
        self.seconds = float("nan")

    def __len__(self) -> int:
        return self.warmup + self.steps

    def __iter__(self) -> Iterator[Any]:
        t0, self.images = 0.0, 0
        it = iter(self.batches())
        for i in range(len(self)):
            batch = next(it)
            if i == self.warmup:
                self._sync()
                t0 = time.perf_counter()
            if i >= self.warmup:
                self.images += len(batch[1])
            yield batch
        self._sync()
        self.seconds = time.perf_counter() - t0
        # Run the loader's epoch to its end (exactly len(self) batches) so it shuts down cleanly.
        for _ in it:
            pass

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @property
    def rate(self) -> float:
        return self.images / self.seconds


# --------------------------------------------------------------------------- training step


class Trainer:
    """One model, optimizer and schedule, stepped by ``train_one_epoch`` over any batches."""

    def __init__(
        self, n_channels: int, n_classes: int, args: argparse.Namespace, device: torch.device
    ):
        self.device = device
        # The loss is read (a device synchronisation) only at the end of each measured epoch.
        self.cfg = TrainConfig(amp=args.amp, log_every=10**9)
        model = build_model(ModelConfig(width_mult=args.width_mult), n_channels, n_classes)
        model = model.to(device)
        if device.type == "cuda" and self.cfg.channels_last is not False:
            model = model.to(memory_format=torch.channels_last)
        optim = OptimConfig()
        optimizer = build_optimizer(model, optim, optim.lr)
        total = 10**6  # a long schedule: the LR barely moves during the benchmark
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, total, 0, 0.01)
        )
        dtype, use_scaler = resolve_amp(self.cfg.amp, device)
        net = torch.compile(model) if args.compile else model
        scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.t = Training(model, net, optimizer, scheduler, scaler, nn.CrossEntropyLoss(), dtype,
                          device)  # fmt: skip
        self.grad_clip = optim.grad_clip
        self.progress = StepProgress(None, 1, enabled=False, console=False, bar=False)

    def run(self, loader: Timed) -> float:
        loader.device = self.device
        train_one_epoch(self.t, loader, 0, len(loader), self.cfg, self.grad_clip, self.progress)
        return loader.rate


# --------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    """One end-to-end measurement: a loader config and the training process's torch threads."""

    cfg: LoaderConfig
    threads: int  # torch intra-op threads of the training (main) process


def loader_variants(args: argparse.Namespace, device: torch.device) -> dict[str, Variant]:
    """Variants named ``<kind>_w<workers>``, plus ``..._t<threads>`` on a CPU.

    On a CPU, loader workers and the model share the cores: each variant with workers is also
    measured with the training process limited to the cores the workers leave free, because
    intra-op threads that wait on a descheduled sibling stall the whole step.
    """
    base = LoaderConfig(
        batch_size=args.batch_size,
        image_size=args.image_size,
        reader_threads=args.reader_threads,
        dali_threads=args.reader_threads,
    )
    kinds = ["torch", "dali"] if args.loader == "both" else [args.loader]
    threads = torch.get_num_threads()
    out = {}
    for kind in kinds:
        for w in args.workers:
            if kind == "dali" and w == 0:
                continue  # DALI always runs its Python source in >= 1 worker process
            cfg = base.model_copy(update={"kind": kind, "num_workers": w})
            out[f"{kind}_w{w}"] = Variant(cfg, threads)
            spare = max(1, (os.cpu_count() or 1) - max(w, 1 if kind == "dali" else 0))
            if device.type == "cpu" and spare < threads:
                out[f"{kind}_w{w}_t{spare}"] = Variant(cfg, spare)
    return out


def make_loader(
    store: Store, rows: np.ndarray, labels: np.ndarray, cfg: LoaderConfig, device: torch.device
) -> Any:
    return build_loader(store, rows, labels, cfg, train=True, device=device, seed=0)


def resident_batches(loader: Any, n: int) -> list[tuple[torch.Tensor, ...]]:
    """``n`` augmented batches from ``loader``, kept on its device (the model-only input)."""
    loader.set_epoch(0)
    out = []
    for i, (x, y, rows) in enumerate(loader):
        if i < n:
            out.append((x.clone(), y.clone(), rows.clone()))
    if len(out) < n:
        raise RuntimeError(f"the loader gave {len(out)} batches, {n} needed")
    return out


def epoch_of(loader: Any, epoch: int) -> Callable[[], Iterable]:
    def batches() -> Iterable:
        loader.set_epoch(epoch)
        return loader

    return batches


def measure(args: argparse.Namespace, store: Store, device: torch.device) -> dict[str, Any]:
    """Interleaved rounds of model-only and every loader variant; best and all rates."""
    index = build_index(store.metadata, DataConfig(store=str(store.path)))
    n = args.warmup + args.steps
    # One epoch == exactly the measured batches, so each measurement runs one whole epoch.
    rows = np.resize(index.train_order, n * args.batch_size)
    variants = loader_variants(args, device)
    loaders: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name, v in variants.items():
        try:
            loaders[name] = make_loader(store, rows, index.labels, v.cfg, device)
        except Exception as e:  # DALI missing or unusable here: report, measure the rest
            errors[name] = f"{type(e).__name__}: {e}"
    base_cfg = LoaderConfig(batch_size=args.batch_size, image_size=args.image_size, num_workers=0)
    resident = resident_batches(make_loader(store, rows, index.labels, base_cfg, device), n)
    trainer = Trainer(len(store.channels), len(index.classes), args, device)

    default_threads = torch.get_num_threads()
    # Model-only at every thread count a variant uses: the baseline is the best of them.
    baselines = {
        "model_only" if t == default_threads else f"model_only_t{t}": t
        for t in sorted({default_threads, *(variants[k].threads for k in loaders)}, reverse=True)
    }
    rates: dict[str, list[float]] = {k: [] for k in [*baselines, *loaders]}
    for r in range(args.rounds):
        for name, threads in baselines.items():
            torch.set_num_threads(threads)
            rates[name].append(trainer.run(Timed(lambda: resident, args.warmup, args.steps)))
        for name, loader in list(loaders.items()):
            torch.set_num_threads(variants[name].threads)
            try:
                rates[name].append(trainer.run(Timed(epoch_of(loader, r), args.warmup, args.steps)))
            except Exception as e:
                errors[name] = f"{type(e).__name__}: {e}"
                rates.pop(name)
                loaders.pop(name)
            finally:
                torch.set_num_threads(default_threads)
    for loader in loaders.values():
        with suppress(Exception):
            loader.close()
    return {"rates": rates, "errors": errors, "classes": len(index.classes)}


# --------------------------------------------------------------------------- report


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"CPU {model} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def summarize(args: argparse.Namespace, device: torch.device, store: Store, m: dict) -> dict:
    best = {k: max(v) for k, v in m["rates"].items() if v}
    baselines = {k: best.pop(k) for k in list(best) if k.startswith("model_only")}
    model_only = max(baselines.values())
    ratio = {k: v / model_only for k, v in best.items()}
    top = max(ratio, key=ratio.get) if ratio else None
    dtype, _ = resolve_amp(args.amp, device)
    out: dict[str, Any] = {
        "device": device_name(device),
        "load_avg_1m": os.getloadavg()[0],
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "store": f"{len(store)} images, {store.shape[1]}x{store.shape[-1]}px, {args.codec}",
        "classes": m["classes"],
        "width_mult": args.width_mult,
        "amp": str(dtype).removeprefix("torch.") if dtype else "off",
        "channels_last": device.type == "cuda",
        "compile": args.compile,
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "rounds": args.rounds,
        "model_only_img_s": round(model_only, 1),
        "model_only_by_threads_img_s": {k: round(v, 1) for k, v in baselines.items()},
        "end_to_end_img_s": {k: round(v, 1) for k, v in best.items()},
        "ratio": {k: round(v, 3) for k, v in ratio.items()},
        "best_loader": top,
        "ratio_goal": RATIO_GOAL,
        "meets_ratio_goal": bool(top and ratio[top] >= RATIO_GOAL),
        "all_rounds_img_s": {k: [round(x, 1) for x in v] for k, v in m["rates"].items()},
        "errors": m["errors"],
    }
    if device.type == "cuda":
        out["h100_goal_img_s"] = H100_GOAL_IMG_S
        out["meets_h100_goal"] = bool(top and best[top] >= H100_GOAL_IMG_S)
    return out


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, torch.device]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=384, help="sites in the synthetic store")
    ap.add_argument("--store-size", type=int, default=160, help="px of the store images")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 32 CPU, 256 CUDA")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: 8 CPU, 60 CUDA)")
    ap.add_argument("--warmup", type=int, default=None, help="default: 2 CPU, 10 CUDA")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--width-mult", type=float, default=1.0)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--loader", choices=["torch", "dali", "both"], default="both")
    ap.add_argument("--workers", default=None, help="comma list (default: 0,1 CPU; 8 CUDA)")
    ap.add_argument("--reader-threads", type=int, default=None, help="default: 1 CPU, 2 CUDA")
    ap.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto")
    ap.add_argument(
        "--codec", choices=["zstd", "lz4"], default=None, help="default: zstd CPU, lz4 CUDA"
    )
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--dir", default=None, help="keep the store here (default: a temp dir)")
    args = ap.parse_args(argv)
    want = args.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA GPU on this machine")
    gpu = want == "cuda"
    defaults = {
        "batch_size": 256 if gpu else 32,
        "steps": 60 if gpu else 8,
        "warmup": 10 if gpu else 2,
        "workers": "8" if gpu else "0,1",
        # On 2 cores a second decode thread only competes with the model's threads.
        "reader_threads": 2 if gpu else 1,
        "codec": "lz4" if gpu else "zstd",
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.workers = [int(w) for w in str(args.workers).split(",")]
    if args.steps < 1 or args.warmup < 1:
        ap.error("--steps and --warmup must be >= 1")
    return args, torch.device("cuda", 0) if gpu else torch.device("cpu")


def main(argv: list[str] | None = None) -> None:
    args, device = parse_args(argv)
    tmp = Path(args.dir or tempfile.mkdtemp(prefix="cm-bench-train-"))
    t0 = time.perf_counter()
    try:
        store = build_store(tmp, args.images, args.store_size, args.codec)
        prep_s = time.perf_counter() - t0
        m = measure(args, store, device)
        report = summarize(args, device, store, m)
    finally:
        if args.dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    report["prep_s"] = round(prep_s, 1)
    report["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
