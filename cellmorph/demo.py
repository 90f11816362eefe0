"""The main job on the embedded default: synthetic plate → store → Ray Train → audit → report."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from cellmorph.config import Config, load_config

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def run_demo(cfg: Config, *, audit: bool = True) -> dict[str, Any]:
    """Run every stage once; each stage skips work that is already done (rerun = no-op)."""
    from cellmorph.audit import audit as run_audit
    from cellmorph.launch import run_ray_training
    from cellmorph.report import build_report
    from cellmorph.synth import generate_plate
    from conversion.pack import convert

    t0 = time.perf_counter()
    print("[1/5] synthetic plate")
    csv = generate_plate(cfg.synth)
    print(f"[2/5] convert {csv} → {cfg.data.store}")
    convert(cfg.convert.model_copy(update={"load_data": str(csv)}), cfg.data.store)
    print(f"[3/5] train {cfg.name} with Ray Train ({cfg.ray.num_workers} workers)")
    run_dir = run_ray_training(cfg)
    if audit:
        print("[4/5] leakage audit (the original study's protocol on the same data)")
        run_audit(cfg, reuse_default_run=run_dir, train=run_ray_training)
    print("[5/5] report")
    report = build_report(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    summary = {
        "report": str(report),
        "accuracy": metrics["accuracy"],
        "balanced_accuracy": metrics["balanced_accuracy"],
        "macro_f1": metrics["macro_f1"],
        "chance": metrics["chance"],
        "well_accuracy": metrics.get("well_accuracy"),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(
        f"\nreport: {report}\n"
        f"validation (grouped by well, {metrics.get('n_images', '?')} images): "
        f"accuracy {summary['accuracy']:.3f}, balanced accuracy "
        f"{summary['balanced_accuracy']:.3f}, macro-F1 {summary['macro_f1']:.3f}; "
        f"chance {summary['chance']:.3f}  ({summary['seconds']:.0f} s)"
    )
    return summary


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job on a synthetic plate (what `make demo` runs)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--no-audit", action="store_true", help="skip the leakage audit")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. train.epochs=3")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    run_demo(load_config(args.config, args.overrides), audit=not args.no_audit)
    return 0
