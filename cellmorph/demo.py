"""The main job on the embedded default: synthetic plate -> store -> Ray Train -> audit -> report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cellmorph.config import Config
from cellmorph.progress import result_line


def run_demo(cfg: Config, *, audit: bool = True) -> dict[str, Any]:
    """Run every stage once; each stage skips work that is already done (rerun = no-op)."""
    from cellmorph.audit import audit as run_audit
    from cellmorph.launch import resolve_paths, run_ray_training
    from cellmorph.report import build_report
    from cellmorph.tracking import log_report

    t0 = time.perf_counter()
    steps = 5 if audit else 4
    print(f"[1/{steps}] synthetic plate -> {cfg.synth.out}")
    print(f"[2/{steps}] convert -> {cfg.data.store}")
    summary = prepare_store(cfg)
    print(f"      {summary['images']} images, {summary['quarantined']} quarantined")
    cfg = resolve_paths(cfg)
    print(f"[3/{steps}] train {cfg.name}: Ray Train, {cfg.ray.num_workers} workers, "
          f"{cfg.train.epochs} epochs or more (train.min_steps={cfg.train.min_steps})")  # fmt: skip
    run = run_ray_training(cfg)
    if audit:
        print(f"[4/{steps}] leakage audit: the original study's protocol on the same data")
        result = run_audit(cfg, reuse_default_run=run,
                           train=lambda c: run_ray_training(c, quiet=True))  # fmt: skip
        study, default = result["protocols"]
        print(f"      study protocol: balanced accuracy {study['balanced_accuracy']:.3f} with "
              f"{study['val_copies_in_train']} of {study['n_val_images']} validation images "
              f"copied in training; cellmorph: {default['balanced_accuracy']:.3f}, "
              f"{default['val_copies_in_train']} copies")  # fmt: skip
    print(f"[{steps}/{steps}] report")
    report = build_report(run)
    log_report(run)  # into the run's MLflow run, when it has one
    m = run.read_result()
    seconds = time.perf_counter() - t0
    print(f"\nreport: {report}\nlogs:   {run.logs}/ (Ray's driver log: logs/ray-driver.log)")
    print(result_line(m, cfg.data) + f"  ({seconds:.0f} s)")
    return {"report": str(report), "seconds": round(seconds, 1),
            **{k: m.get(k) for k in ("accuracy", "balanced_accuracy", "macro_f1", "chance",
                                     "well_accuracy")}}  # fmt: skip


def prepare_store(cfg: Config) -> dict[str, Any]:
    """Generate the synthetic plate and convert it, each only when not already done.

    The demo owns its store and rebuilds it when it is of an older format (readers refuse it)
    or older than the plate's CSV: conversion recognizes a finished store by its sites and
    files, not by their pixels, so a regenerated plate would otherwise keep the old pixels.
    """
    from cellmorph.store.layout import METADATA
    from cellmorph.synth import generate_plate
    from conversion.pack import convert, older_format

    csv = generate_plate(cfg.synth)
    built = Path(cfg.data.store) / METADATA
    stale = built.is_file() and built.stat().st_mtime_ns <= csv.stat().st_mtime_ns
    return convert(cfg.convert.model_copy(update={"load_data": str(csv)}), cfg.data.store,
                   overwrite=stale or older_format(cfg.data.store))  # fmt: skip
