"""Which stored images count as which plate and as negative controls, for the per-plate
statistics (``cellmorph.loaders.stats.sums_by_group`` / ``plate_stats_from_sums``).

Each shard writer sums, per (plate, negative control or not) group of its images, the pixel
values and their squares in both the linear and the ``log1p`` space; ``finish`` pools the
shards' sums into each plate's mean and std (all wells, and negative-control wells alone). The
sums are a few numbers per group, so the manifest stays small at millions of images, and no
image is read twice.
"""

from __future__ import annotations

import pandas as pd

from cellmorph.loaders import stats as sstats
from cellmorph.store.layout import parse_negcon


def group_keys(plan: pd.DataFrame, plate_column: str, negcon: str) -> list[str]:
    """One ``plate<SEP>0|1`` key per planned site (1 = a negative-control well)."""
    spec = parse_negcon(negcon)
    plates = plan[plate_column].astype(str).tolist()
    if spec is None or spec[0] not in plan.columns:
        return [sstats.group_key(p, False) for p in plates]
    flags = (plan[spec[0]].astype(str).str.strip() == spec[1]).tolist()
    return [sstats.group_key(p, f) for p, f in zip(plates, flags)]
