"""``ray job submit ... -- python -m ray_jobs.tune --config configs/sweep.yaml [key=value ...]``

Runs a Ray Tune sweep (ASHA) over the base training config named in the sweep file. The
overrides set the sweep file's keys (``num_samples=8``) or the base config's
(``data.store=$PWD/data/demo/store.zarr run_root=$PWD/runs``); inside ``ray job submit
--working-dir`` paths must be absolute (the job runs in a copy of the upload).
"""

from __future__ import annotations

import argparse
import sys

from cellmorph.errors import run_main
from cellmorph.sweep import load_sweep, run_sweep


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ray_jobs.tune", description=__doc__)
    p.add_argument("--config", required=True, help="sweep YAML (configs/sweep.yaml)")
    p.add_argument(
        "overrides", nargs="*",
        help="sweep keys (num_samples=8) and base config keys (data.store=..., train.epochs=3)",
    )  # fmt: skip
    args = p.parse_args(argv)

    def body() -> int:
        print(f"sweep: {run_sweep(*load_sweep(args.config, args.overrides))}")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
