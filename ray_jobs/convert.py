"""``python -m ray_jobs.convert``: the conversion with one Ray task per shard.

Same arguments as ``cellmorph convert`` (plus ``--address``). The driver plans, the tasks run
:func:`conversion.fieldplan.pack_shard` (and the header probes), the driver finishes the store; the
bytes are the same as a local run's. ``--out`` may be a local (shared) path or any URL zarr's
fsspec stores accept (``s3://bucket/store.zarr``).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from cellmorph.errors import run_main
from conversion.cli import (
    add_convert_arguments,
    config_from_args,
    convert_nuclei_from_args,
    print_summary,
)

T = TypeVar("T")
R = TypeVar("R")


def ray_map(fn: Callable[[T], R], tasks: Iterable[T]) -> Iterator[R]:
    """Run each task as a Ray task (one CPU each); yield results as they finish.

    A few tasks per cluster CPU are in flight at a time: each carries its sites' paths, and
    submitting every shard at once would hold the whole plan in the object store."""
    import ray

    from conversion.shards import IN_FLIGHT_PER_WORKER

    remote = ray.remote(num_cpus=1, max_retries=3)(fn)
    window = max(1, int(ray.cluster_resources().get("CPU", 1))) * IN_FLIGHT_PER_WORKER
    todo = iter(tasks)
    pending = [remote.remote(t) for t in itertools.islice(todo, window)]
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            pending += [remote.remote(t) for t in itertools.islice(todo, 1)]
            yield ray.get(done[0])
    finally:
        for ref in pending:
            ray.cancel(ref)


def build_parser() -> argparse.ArgumentParser:
    """``cellmorph convert``'s options (the cell store's too) and ``--address``."""
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.convert", description=__doc__)
    add_convert_arguments(parser)
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        import ray

        from conversion.pack import convert

        cfg = config_from_args(args)
        nuclei = convert_nuclei_from_args(args)
        if not ray.is_initialized():
            ray.init(address=args.address)
        summary = convert(cfg, args.out, overwrite=args.overwrite, mapper=ray_map, nuclei=nuclei)
        print_summary(summary)
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
