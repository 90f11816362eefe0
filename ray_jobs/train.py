"""``ray job submit ... -- python -m ray_jobs.train --config configs/demo.yaml [key=value ...]``

Builds the TorchTrainer from the config and runs it on the cluster this job was submitted to.
"""

from __future__ import annotations

import argparse
import sys

from cellmorph.config import load_config
from cellmorph.errors import run_main
from cellmorph.launch import run_ray_training


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ray_jobs.train", description=__doc__)
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. train.epochs=3")
    args = p.parse_args(argv)

    def body() -> int:
        run = run_ray_training(load_config(args.config, args.overrides))
        print(f"run: {run.path}")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
