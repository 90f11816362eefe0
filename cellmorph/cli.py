"""The ``cellmorph`` command: argument parsing and one library call per subcommand.

This is a launcher: it imports the library, the library never imports it. Each handler imports
what its command needs when it runs, so ``cellmorph convert`` does not pay for torch or Ray.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cellmorph.errors import run_main

if TYPE_CHECKING:
    from cellmorph.rundir import RunDir

DEFAULT_DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


# --------------------------------------------------------------------------- handlers


def cmd_synth(args: argparse.Namespace) -> int:
    import pandas as pd

    from cellmorph.config import Config, validate
    from cellmorph.synth import CHANNELS, generate_plate

    fields = ("seed", "plates", "rows", "cols", "sites", "size", "nucleus_diameter",
              "cells_per_field")  # fmt: skip
    given = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    if args.texture_only:
        given["texture_only"] = True
    cfg = validate(Config, {"synth": {"out": args.out, **given}}, "invalid option").synth
    # A folder may hold only this very plate, unless --overwrite: its TIFFs would be replaced.
    replace = "all" if args.overwrite else "same"
    csv_path = generate_plate(cfg, progress=not args.quiet, replace=replace)
    df = pd.read_csv(csv_path)
    print(csv_path)
    print(
        f"{len(df)} sites ({len(df) * len(CHANNELS)} TIFFs), {df['Metadata_Plate'].nunique()} "
        f"plates, {df.groupby(['Metadata_Plate', 'Metadata_Well']).ngroups} wells"
    )
    counts = df.groupby("Metadata_pert_iname").agg(
        sites=("Metadata_Site", "size"), wells_per_plate=("Metadata_Well", "nunique")
    )
    print(counts.sort_values("sites", ascending=False).to_string())
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from cellmorph.config import load_config
    from cellmorph.launch import resolve_paths

    cfg = resolve_paths(load_config(args.config, args.overrides))
    if args.local:
        from cellmorph.train import run_local

        run = run_local(cfg)
    else:
        from cellmorph.launch import run_ray_training

        run = run_ray_training(cfg)
    from cellmorph.progress import result_line

    print(result_line(run.read_result(), cfg.data))
    print(f"run: {run.path}  (report: cellmorph evaluate {run.path} --report-only)")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from cellmorph.sweep import load_sweep, run_sweep

    print(f"sweep: {run_sweep(*load_sweep(args.config, args.overrides))}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from cellmorph.config import load_config
    from cellmorph.demo import run_demo

    run_demo(load_config(args.config, args.overrides), audit=not args.no_audit)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from cellmorph.outputs import EMBEDDINGS, PREDICTIONS, PROFILES, SITES, WELLS
    from cellmorph.predict import predict

    overrides = {
        "eval_batch_size": args.batch_size,
        "kind": args.loader,
        "num_workers": args.num_workers,
    }
    summary = predict(
        args.checkpoint, args.store, args.out, device=args.device, loader_overrides=overrides
    )
    cells = summary.get("unit") == "cell"
    files = [PREDICTIONS, EMBEDDINGS, WELLS, *([SITES, PROFILES] if cells else [PROFILES])]
    print(
        f"predicted {summary['images']} {'cells' if cells else 'images'} in {summary['wells']} "
        f"wells -> {summary['out']}/{{{','.join(files)}}}"
    )
    if "metrics" in summary:
        m = summary["metrics"]
        levels = "".join(f"{lvl}-level balanced accuracy {m[f'{lvl}_balanced_accuracy']:.3f}, "
                         for lvl in ("well", "site") if cells and f"{lvl}_balanced_accuracy" in m)  # fmt: skip
        print(f"against the store's labels: {levels}{'cell-level ' if cells else ''}balanced "
              f"accuracy {m['balanced_accuracy']:.3f}, accuracy {m['accuracy']:.3f}, macro-F1 "
              f"{m['macro_f1']:.3f}")  # fmt: skip
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cellmorph.rundir import RunDir

    run = RunDir(args.run_dir).require()
    if not args.report_only:
        from cellmorph.config import config_from_dict
        from cellmorph.progress import result_line
        from cellmorph.train import evaluate_run

        m = evaluate_run(run, device=args.device)
        print(result_line(m, config_from_dict(run.read_config()).data))
    print(f"report: {publish_report(run)}")
    return 0


def publish_report(run: RunDir) -> Path:
    """Build the run's report, then log it to the run's MLflow run when it has one."""
    from cellmorph.report import build_report
    from cellmorph.tracking import log_report

    page = build_report(run)
    log_report(run)
    return page


def cmd_audit(args: argparse.Namespace) -> int:
    from cellmorph.audit import audit, format_table
    from cellmorph.config import load_config
    from cellmorph.launch import resolve_paths
    from cellmorph.rundir import RunDir

    cfg = resolve_paths(load_config(args.config, args.overrides))
    reuse = RunDir(args.reuse_run).require() if args.reuse_run else None
    result = audit(cfg, reuse_default_run=reuse)
    print(format_table(result))
    print(f"report: {publish_report(RunDir(result['protocols'][1]['run_dir']))}")
    return 0


# --------------------------------------------------------------------------- parsers


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low`` (argparse prints one line naming the option)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is less than {low}")
        return value

    return parse


def _add_synth(sub: argparse._SubParsersAction) -> None:
    from cellmorph.config import SynthConfig

    d = SynthConfig()
    p = sub.add_parser("synth", help="write a synthetic Cell Painting plate (TIFFs + LoadData CSV)")
    p.add_argument("out", help="output folder (load_data.csv and <plate>/Images/ go here)")
    p.add_argument("--seed", type=int, help=f"random seed (default {d.seed})")
    p.add_argument("--plates", type=int, help=f"number of plates (default {d.plates})")
    p.add_argument("--rows", type=int, help=f"well rows per plate, <= 16 (default {d.rows})")
    p.add_argument("--cols", type=int, help=f"well columns per plate, <= 24 (default {d.cols})")
    p.add_argument("--sites", type=int, help=f"fields per well (default {d.sites})")
    p.add_argument(
        "--size", type=int, help=f"image side in px; the pilot's is 1080 (default {d.size})"
    )
    p.add_argument(
        "--nucleus-diameter", type=float,
        help="real scale: nucleus diameter in px, fixed whatever --size (the pilot's: 29.8 at "
        "1080); default: thumbnail scale, cells grow with --size",
    )  # fmt: skip
    p.add_argument(
        "--cells-per-field", type=float,
        help=f"real scale: cells per 1080 x 1080 px (default {d.cells_per_field:g})",
    )  # fmt: skip
    p.add_argument(
        "--texture-only", action="store_true",
        help="real scale: treatments differ only in 1-4 px texture, not in size or intensity",
    )  # fmt: skip
    p.add_argument(
        "--overwrite", action="store_true",
        help="write into a folder that holds other files or another plate (same names replaced)",
    )  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_synth)


def _add_config_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--config", default=default, help="YAML config (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. train.epochs=3")


def _add_training(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (Ray Train, or --local in this process)")
    p.add_argument("--local", action="store_true", help="train in this process, without Ray")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "tune", help="a Ray Tune sweep (ASHA) over the training config named in a sweep file"
    )
    p.add_argument("--config", required=True, help="sweep YAML, e.g. configs/sweep.yaml")
    p.add_argument(
        "overrides", nargs="*",
        help="sweep keys (num_samples=8) and base config keys (data.store=..., train.epochs=3)",
    )  # fmt: skip
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("demo", help="the main job on a synthetic plate (what `make demo` runs)")
    p.add_argument("--no-audit", action="store_true", help="skip the leakage audit")
    _add_config_args(p, str(DEFAULT_DEMO_CONFIG))
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "audit", help="train the original study's leaky protocol and the default side by side"
    )
    p.add_argument("--reuse-run", help="an already trained run of this config (not retrained)")
    _add_config_args(p)
    p.set_defaults(func=cmd_audit)


def _add_inference(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="per-image predictions and embeddings for a store")
    p.add_argument("--checkpoint", required=True, help="a run's checkpoints/best.pt")
    p.add_argument("--store", required=True, help="store.zarr to predict (labels not needed)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--batch-size", type=_int_at_least(1), help="images per batch (default: eval batch size)"
    )
    p.add_argument("--loader", choices=["torch", "dali"], help="override the loader kind")
    p.add_argument("--num-workers", type=_int_at_least(0), help="loader worker processes")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "evaluate",
        help="recompute validation outputs from a run's best checkpoint and rebuild its report",
    )
    p.add_argument("run_dir", help="runs/<name>")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--report-only", action="store_true", help="only redraw the report")
    p.set_defaults(func=cmd_evaluate)


def build_parser() -> argparse.ArgumentParser:
    from conversion.cli import add_parser as add_conversion

    parser = argparse.ArgumentParser(
        prog="cellmorph", description="Train perturbation classifiers on Cell Painting images."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_synth(sub)
    add_conversion(sub)
    _add_training(sub)
    _add_inference(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return run_main(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
