"""cellmorph's recipe against the original study's, on one synthetic plate, same split, same time.

Both recipes train on the same training rows and are scored once on the same untouched test
fold (cellmorph's index: wells grouped, a test fold held out first). cellmorph's recipe is its
defaults (``cellmorph train`` with only ``data.store`` set, run in this process). The study's
recipe, as its notebook describes it: torchvision MobileNetV2 on an RGB rendering of the five
channels, its augmentations (flips, rotation), ImageNet normalization, Adam at 1e-4, batch 32,
cross-entropy; trained from scratch here as well (nothing is downloaded), for as long as
cellmorph's run took (the same CPU time budget).

Also measured: cellmorph's training throughput (its own ``metrics.jsonl``) against a plain
in-memory loop at the same settings (the same batches held as tensors, same model, optimizer
and schedule), so the pipeline's overhead is a ratio.

    .venv/bin/python bench/accuracy.py                      # 2 plates x 45 wells x 4 sites, 128 px
    .venv/bin/python bench/accuracy.py --rows 3 --cols 5 --quick   # a short run (minutes)
    .venv/bin/python bench/accuracy.py --rows 3 --cols 5 --render 48 --size 32 --smoke  # seconds

Prints one JSON object. Goal: cellmorph's test balanced accuracy >= the study's + 0.10.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cellmorph.config import Config, SynthConfig, load_config
from cellmorph.index import build_index
from cellmorph.loaders import build_loader
from cellmorph.metrics import compute_metrics
from cellmorph.report_cells import composite
from cellmorph.rundir import RunDir
from cellmorph.store import open_store, well_ids
from cellmorph.synth import generate_plate
from cellmorph.train import run_local
from cellmorph.train_setup import build_optimizer, lr_factor, plan_schedule
from conversion.pack import convert

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def make_store(root: Path, args: argparse.Namespace) -> Path:
    synth = SynthConfig(out=str(root / "raw"), seed=args.seed, plates=args.plates, rows=args.rows,
                        cols=args.cols, sites=args.sites, size=args.render)  # fmt: skip
    csv = generate_plate(synth, progress=False)
    store = root / "store.zarr"
    cfg = load_config(None, [f"convert.size={args.size}", "convert.workers=1"]).convert
    convert(cfg.model_copy(update={"load_data": str(csv)}), store)
    return store


def cellmorph_recipe(store: Path, root: Path, extra: list[str]) -> tuple[dict, float, Config]:
    cfg = load_config(None, [f"data.store={store}", f"run_root={root / 'runs'}", "name=cellmorph",
                             *extra])  # fmt: skip
    t0 = time.perf_counter()
    run = run_local(cfg)
    seconds = time.perf_counter() - t0
    result = run.read_result()
    return result, seconds, cfg


# ------------------------------------------------------------------------------ the study


def rgb_rendering(images: np.ndarray, channels: list[str]) -> torch.Tensor:
    """(N, C, H, W) uint16 -> (N, 3, H, W) float in [0, 1]: the report's colour composite."""
    return torch.from_numpy(
        np.stack([composite(im, channels).transpose(2, 0, 1) for im in images]).astype(np.float32)
    )


def study_augment(x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """torchvision-style RandomHorizontalFlip, RandomVerticalFlip, RandomRotation(20)."""
    import torchvision.transforms.v2.functional as TF

    out = []
    for im in x:
        if torch.rand(1, generator=rng) < 0.5:
            im = TF.horizontal_flip(im)
        if torch.rand(1, generator=rng) < 0.5:
            im = TF.vertical_flip(im)
        angle = float(torch.empty(1).uniform_(-20, 20, generator=rng))
        out.append(TF.rotate(im, angle))
    return torch.stack(out)


def study_recipe(store_path: Path, cfg: Config, budget_s: float, image_size: int) -> dict:
    from torchvision.models import mobilenet_v2

    store = open_store(store_path)
    index = build_index(store.metadata, cfg.data, warn=False)
    images = store.images[:]
    x = torch.nn.functional.interpolate(rgb_rendering(images, store.channels), size=image_size,
                                        mode="bilinear", antialias=True)  # fmt: skip
    x = (x - IMAGENET_MEAN) / IMAGENET_STD
    y = torch.as_tensor(index.labels).long()
    torch.manual_seed(cfg.seed)
    model = mobilenet_v2(weights=None, num_classes=len(index.classes))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    rng = torch.Generator().manual_seed(cfg.seed)
    train = torch.as_tensor(index.train_order)  # the same (oversampled) training rows
    t0, epochs, steps = time.perf_counter(), 0, 0
    while time.perf_counter() - t0 < budget_s:
        model.train()
        for batch in train[torch.randperm(len(train), generator=rng)].split(32):
            loss = loss_fn(model(study_augment(x[batch], rng)), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if time.perf_counter() - t0 >= budget_s:
                break
        epochs += 1
    model.eval()
    with torch.no_grad():
        probs = torch.cat([model(x[b]).softmax(1) for b in torch.as_tensor(index.test).split(128)])
    wells = well_ids(store.metadata)[index.test]
    m = compute_metrics(index.labels[index.test], probs.numpy(), index.classes, wells=wells)
    return {"balanced_accuracy": m["balanced_accuracy"], "accuracy": m["accuracy"],
            "well_balanced_accuracy": m["well_balanced_accuracy"], "macro_f1": m["macro_f1"],
            "epochs": epochs, "steps": steps, "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip


# ------------------------------------------------------------------------------ throughput


def plain_loop_images_per_s(store_path: Path, cfg: Config, steps: int) -> float:
    """The same model, optimizer, schedule and batches, held in memory: no loader at all."""
    from cellmorph.model import build_model

    store = open_store(store_path)
    index = build_index(store.metadata, cfg.data, warn=False)
    loader = build_loader(store, index.train, index.labels, cfg.loader, train=True,
                          device=torch.device("cpu"), seed=cfg.seed,
                          repeats=index.train_repeats)  # fmt: skip
    loader.set_epoch(0)
    batches = [(x.clone(), y.clone()) for (x, y, _), _ in zip(loader, range(steps))]
    model = build_model(cfg.model, len(store.channels), len(index.classes))
    schedule = plan_schedule(cfg, len(loader), 1)
    opt = build_optimizer(model, cfg.optim, schedule.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, schedule.total, schedule.warmup, cfg.optim.min_lr_ratio)
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    model.train()
    t0, seen = time.perf_counter(), 0
    for x, y in batches:
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
        seen += len(y)
    return seen / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--plates", type=int, default=2)
    p.add_argument("--rows", type=int, default=5)
    p.add_argument("--cols", type=int, default=9)
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--render", type=int, default=160, help="synthetic site size in px")
    p.add_argument("--size", type=int, default=128, help="stored size in px")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="64 px, 100 steps: a short run")
    p.add_argument("--smoke", action="store_true",
                   help="32 px, a narrow model, 2 steps: checks the script runs (seconds)")  # fmt: skip
    p.add_argument("--work", help="folder for the plate, store and runs (default: a temp dir)")
    args = p.parse_args()
    if not args.smoke:  # a smoke run keeps torch's default (OMP_NUM_THREADS)
        torch.set_num_threads(os.cpu_count() or 1)
    extra = ["loader.image_size=64", "train.min_steps=100", "train.epochs=2"] if args.quick else []
    if args.smoke:
        extra = ["loader.image_size=32", "model.width_mult=0.25", "train.epochs=1",
                 "train.max_steps_per_epoch=2", "loader.num_workers=0"]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="cellmorph-acc-") as tmp:
        root = Path(args.work or tmp)
        store = make_store(root, args)
        result, seconds, cfg = cellmorph_recipe(store, root, extra)
        study = study_recipe(store, cfg, seconds, cfg.loader.image_size)
        history = RunDir(cfg.run_dir).history()
        loader_rate = float(np.median([r["train_images_per_s"] for r in history]))
        plain = plain_loop_images_per_s(store, cfg, steps=min(20, len(history) * 2 + 4))
    ours = {k: result.get(k) for k in ("balanced_accuracy", "accuracy", "well_balanced_accuracy",
                                       "macro_f1")}  # fmt: skip
    out = {
        "plate": {
            "plates": args.plates,
            "wells": args.rows * args.cols,
            "sites": args.sites,
            "images": len(open_store(store)) if args.work else None,
            "size": args.size,
        },  # fmt: skip
        "split": {"fold_scored": result["fold"], "test_images": result.get("n_images")},
        "budget_s": round(seconds, 1),
        "cellmorph": {
            **ours,
            "epochs": len(history),
            "mean_map": ((result.get("profiling") or {}).get("embeddings") or {}).get("mean_map"),
        },  # fmt: skip
        "study": study,
        "delta_balanced_accuracy": round(ours["balanced_accuracy"] - study["balanced_accuracy"], 4),
        "goal_met": ours["balanced_accuracy"] >= study["balanced_accuracy"] + 0.10,
        "throughput": {
            "cellmorph_train_img_s": round(loader_rate, 1),
            "plain_in_memory_img_s": round(plain, 1),
            "ratio": round(loader_rate / plain, 3),
        },  # fmt: skip
        "machine": f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}",
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
