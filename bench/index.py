"""Index build on a synthetic JUMP-sized metadata table (3,000,000 rows, no images).

Layout like the CPJUMP1 compound plates: 384 wells per plate, 300 compounds each in the same
well position on every plate, the other 84 positions DMSO (the largest class), 9 sites per well,
a few images missing (quarantined). Times ``build_index`` (grouped by well + oversample, top-50
classes as in the original study) against baselines measured in the same run:

- ``groupby_s``: pandas alone grouping the table by (plate, well) and label — the floor any
  index build pays to look at the rows once;
- ``sklearn_rows_s`` (``--naive``): scikit-learn's StratifiedGroupKFold fed every row with the
  wells as groups (what a straightforward implementation does). Off by default: it takes
  minutes and gigabytes at 3M rows.

Prints one JSON object. Run: ``.venv/bin/python bench/index.py [--rows N] [--naive]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
import tracemalloc

import numpy as np
import pandas as pd

from cellmorph.config import DataConfig
from cellmorph.index import build_index, epoch_indices

WELLS_PER_PLATE = 384
COMPOUNDS = 300
SITES = 9


def synthetic_metadata(rows: int, seed: int = 0) -> pd.DataFrame:
    """A plates x wells x sites table of about ``rows`` rows with fixed compound positions."""
    rng = np.random.default_rng(seed)
    plates = -(-rows // (WELLS_PER_PLATE * SITES))
    names = np.array([f"cmpd-{i:03d}" for i in range(COMPOUNDS)], dtype=object)
    layout = np.array(["DMSO"] * WELLS_PER_PLATE, dtype=object)
    layout[rng.permutation(WELLS_PER_PLATE)[:COMPOUNDS]] = names  # same map on every plate
    wells = np.array([f"{'ABCDEFGHIJKLMNOP'[i // 24]}{i % 24 + 1:02d}" for i in range(384)])
    n = plates * WELLS_PER_PLATE * SITES
    i = np.arange(n)
    well = (i // SITES) % WELLS_PER_PLATE
    df = pd.DataFrame(
        {
            "Metadata_Plate": pd.Categorical.from_codes(
                i // (SITES * WELLS_PER_PLATE), [f"BR{p:05d}" for p in range(plates)]
            ).astype(str),
            "Metadata_Well": wells[well],
            "Metadata_Site": (i % SITES + 1).astype(np.int16),
            "Metadata_pert_iname": layout[well],
            "checksum": pd.Series(rng.integers(0, 2**63, n)).map("{:016x}".format),
        }
    )
    drop = rng.choice(n, size=n - rows, replace=False) if n > rows else []
    return df.drop(index=drop).reset_index(drop=True)


def _groupby_baseline(md: pd.DataFrame) -> float:
    t = time.perf_counter()
    md.groupby(["Metadata_Plate", "Metadata_Well", "Metadata_pert_iname"], sort=False).size()
    return time.perf_counter() - t


def _naive_sklearn(md: pd.DataFrame, labels: np.ndarray, cfg: DataConfig) -> float:
    """The same split done the straightforward way: every used row, wells as groups."""
    from sklearn.model_selection import StratifiedGroupKFold

    t = time.perf_counter()
    used = labels >= 0
    y = labels[used]
    groups = md.groupby(["Metadata_Plate", "Metadata_Well"], sort=False).ngroup().to_numpy()
    groups = groups[used]
    sgkf = StratifiedGroupKFold(round(1 / cfg.val_fraction), shuffle=True, random_state=0)
    next(iter(sgkf.split(np.zeros(len(y)), y, groups)))
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=3_000_000)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--split", choices=["grouped", "plate", "image"], default="grouped")
    ap.add_argument("--group-by", choices=["well", "plate"], default="well")
    ap.add_argument("--balance", default="oversample")
    ap.add_argument("--study", action="store_true", help="oversample_before_split (image)")
    ap.add_argument("--naive", action="store_true", help="also time sklearn fed every row")
    args = ap.parse_args()
    cfg = DataConfig(
        split="image" if args.study else args.split,
        group_by=args.group_by,
        balance=args.balance,
        top_k=args.top_k,
        oversample_before_split=args.study,
    )

    md = synthetic_metadata(args.rows)
    rss_table_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    groupby_s = _groupby_baseline(md)

    tracemalloc.start()
    t = time.perf_counter()
    index = build_index(md, cfg)
    seconds = time.perf_counter() - t
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    t = time.perf_counter()
    epoch_indices(
        index.train, 0, 0, rank=0, world_size=8, batch_size=256, repeats=index.train_repeats
    )
    epoch_s = time.perf_counter() - t

    out = {
        "rows": len(md),
        "plates": index.summary["plates"],
        "wells": index.summary["wells"],
        "classes": len(index.classes),
        "config": cfg.model_dump(exclude={"store", "val_plates"}),
        "seconds": round(seconds, 3),
        "traced_peak_mb": round(traced_peak / 2**20, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_after_table_mb": round(rss_table_mb, 1),
        "train": len(index.train),
        "val": len(index.val),
        "train_order": index.epoch_size,
        "val_wells_in_train": index.summary["val_wells_in_train"],
        "epoch_indices_s": round(epoch_s, 3),
        "groupby_baseline_s": round(groupby_s, 3),
        "ratio_to_groupby": round(seconds / groupby_s, 2),
        "goal": {"seconds": 30, "peak_mb": 4096},
    }
    if args.naive:
        out["sklearn_rows_s"] = round(_naive_sklearn(md, index.labels, cfg), 2)
        out["speedup_vs_sklearn_rows"] = round(out["sklearn_rows_s"] / seconds, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
