"""The end of a conversion: metadata.parquet, quarantine.csv, channel statistics from a
sample of stored images, then ``complete: true`` (and the reasons a summary prints)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import zarr

from cellmorph.config import ConvertConfig
from cellmorph.errors import CellmorphError
from cellmorph.loaders import stats as sstats
from cellmorph.store import files as sfiles
from cellmorph.store import layout as slayout
from cellmorph.store import write as swrite
from conversion.layouts import summarize_reasons
from conversion.manifest import Manifest
from conversion.shards import (
    SATURATED,
    read_rows,
)
from conversion.tables import (
    Inputs,
    quarantine_row,
)


def finish(out: str, plan: Any, inputs: Inputs, cfg: ConvertConfig) -> None:
    """Write metadata, quarantine and statistics, then mark the store complete (last): that
    write also records ``store_digest`` over every attribute and ``images/zarr.json``."""
    manifest = Manifest(out)
    arr = zarr.open_array(store=sfiles.zarr_store(out, True), path=slayout.IMAGES, mode="r",
                          zarr_format=3)  # fmt: skip
    shard = int(arr.shards[0])
    sums: list[dict[str, Any]] = []
    saturated = {"saturated": np.zeros(len(cfg.channels), dtype=np.int64), "pixels": 0}

    def parts() -> Iterator[pd.DataFrame]:  # one shard's rows at a time
        for start in range(0, len(plan), shard):
            record = manifest.shard(start // shard)
            if record is None:  # cannot happen after pack_all; never write rows without one
                raise CellmorphError(f"{out}: shard {start // shard} has no record; convert again")
            sums.append(record["sums"])
            for k in saturated:
                saturated[k] += record.get(k, 0)
            yield plan.metadata(start, start + shard, record)

    quarantine = quarantine_rows(inputs, manifest.bad())
    swrite.write_metadata(out, parts())
    swrite.write_quarantine(out, quarantine)
    rows = np.unique(np.linspace(0, len(plan) - 1, min(len(plan), cfg.stats_images)).astype(int))
    attrs = store_stats(sums, read_rows(out, arr, rows), cfg)
    if cfg.illum_dir:
        attrs["illumination_saturated"] = saturation(cfg.channels, **saturated)
    swrite.write_attrs(  # one write: complete and the digest binding the stats with the rest
        out, {**attrs, "images": len(plan), "quarantined": len(quarantine), "complete": True}
    )


def saturation(channels: list[str], saturated: np.ndarray, pixels: int) -> dict[str, Any]:
    """Per channel, the pixels the illumination correction saturated and their fraction."""
    return {
        ch: {"pixels": int(n), "fraction": float(n) / pixels if pixels else 0.0}
        for ch, n in zip(channels, saturated)
    }


def saturation_warning(saturated: dict[str, Any] | None) -> str | None:
    """One line naming each channel whose pixels the correction saturated, with the fraction."""
    hit = {ch: v for ch, v in (saturated or {}).items() if v["pixels"]}
    if not hit:
        return None
    parts = ", ".join(
        f"{ch} {100 * v['fraction']:.3g}% ({v['pixels']} pixels)" for ch, v in hit.items()
    )
    return (
        f"warning: the illumination correction saturated pixels at {SATURATED}: {parts}; those "
        "pixels lost their values: check that the functions are rescaled to ~1"
    )


def quarantine_rows(inputs: Inputs, bad: dict[str, str]) -> list[dict[str, Any]]:
    """The table checks' quarantine, then the sites that failed to decode while packing."""
    failed = inputs.sites.loc[inputs.sites["_key"].isin(bad)] if bad else inputs.sites.iloc[:0]
    return list(inputs.quarantine) + [
        quarantine_row(row, bad[row["_key"]]) for _, row in failed.iterrows()
    ]


def store_stats(sums: list[dict[str, Any]], sample: np.ndarray,
                cfg: ConvertConfig) -> dict[str, Any]:  # fmt: skip
    """``stats`` (mean and std over every image from the shards' ``sums``, percentiles from the
    ``sample``), ``plate_stats`` and ``negcon`` attrs."""
    channels = list(cfg.channels)
    per_plate = sstats.plate_stats_from_sums(sums, channels, sample.shape[-1] * sample.shape[-2])
    stats = sstats.channel_stats(sample, channels)
    for name, exact in sstats.pooled_stats(per_plate, channels).items():
        stats[name].update(exact)
    return {"stats": stats, "plate_stats": per_plate, "negcon": cfg.negcon}


def stored_reasons(out: str, top: int = 5) -> list[dict[str, Any]]:
    """The most frequent kinds of reason in a store's quarantine.csv, with counts and fixes."""
    table = slayout.read_quarantine(sfiles.read_file(out, slayout.QUARANTINE))
    return summarize_reasons(table["reason"], top)
