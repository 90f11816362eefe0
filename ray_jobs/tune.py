"""``ray job submit ... -- python -m ray_jobs.tune --config configs/sweep.yaml [key=value ...]``

Runs a Ray Tune sweep (ASHA) over the base training config named in the sweep file.
"""

from __future__ import annotations

import argparse
import sys

from cellmorph.errors import CellmorphError
from cellmorph.sweep import load_sweep, run_sweep


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ray_jobs.tune", description=__doc__)
    p.add_argument("--config", required=True, help="sweep YAML (configs/sweep.yaml)")
    p.add_argument("overrides", nargs="*", help="dotlist overrides of the sweep file")
    args = p.parse_args(argv)
    try:
        out = run_sweep(*load_sweep(args.config, args.overrides))
    except CellmorphError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"sweep: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
