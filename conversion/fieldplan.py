"""A field store's plan: one row per site, its keys and fingerprint, the shard tasks, and
the task a writer runs for one shard (:func:`pack_shard`; a cell store's is
:class:`conversion.cells.CellPlan`)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cellmorph.config import ConvertConfig
from cellmorph.store import layout as slayout
from cellmorph.store import write as swrite
from cellmorph.store.layout import PLATE
from conversion import platestats
from conversion.manifest import digest
from conversion.ownership import Owner
from conversion.shards import (
    ShardResult,
    corrected,
    illum_function,
    write_shard,
)
from conversion.tables import (
    KEYS,
    site_sources,
    store_metadata,
)
from conversion.tiffs import BadImage, Source, read_site, resize

HASH_ROWS = 1 << 18


@dataclass(frozen=True)
class ShardTask:
    """Everything one writer needs to pack rows ``start .. start + len(sites)`` of the store."""

    out: str
    index: int
    start: int
    key: str
    size: int
    sites: list[tuple[list[Source], list[str]]]  # (channel sources, illumination files or [])
    groups: list[str]  # per site: its plate and negative-control flag (platestats.group_keys)
    owner: Owner | None = None  # the run this task belongs to (None: an unlocked URL store)

    def describe(self) -> str:
        """The shard's rows and files, in words (a dead pool worker's message)."""
        files = [src[0][0] for src, _ in self.sites if src]
        span = f"{files[0]} .. {files[-1]}" if len(files) > 1 else (files or ["no file"])[0]
        last = self.start + len(self.sites) - 1
        return f"shard {self.index} (rows {self.start}-{last}, {len(self.sites)} site(s): {span})"


def load_site(
    sources: list[Source], illum: list[str], size: int, saturated: np.ndarray | None = None
) -> np.ndarray:
    """Decode one site, divide by its illumination functions, resize: (C, size, size) uint16
    (``saturated``: see :func:`conversion.shards.corrected`)."""
    return resize(corrected(read_site(sources), illum, saturated), size)


def pack_shard(task: ShardTask) -> ShardResult:
    """Pack one shard of sites: decode, correct and resize each, then write and record them
    (:func:`conversion.shards.write_shard`). A site that fails to decode fails the shard."""
    n = len(task.sites)
    arr = swrite.open_images(task.out)
    block = np.zeros((n, *arr.shape[1:]), dtype=np.uint16)
    failures: dict[int, str] = {}
    saturated = np.zeros(arr.shape[1], dtype=np.int64)
    pixels = 0
    for i, (sources, illum) in enumerate(task.sites):
        try:
            block[i] = load_site(sources, illum, task.size, saturated)
            pixels += illum_function(illum[0]).size if illum else 0  # per channel, divided
        except BadImage as e:
            failures[i] = str(e)
    if failures:
        return ShardResult(task.index, 0, failures)
    return write_shard(task, block, task.groups, saturated, pixels)


def site_keys(sites: pd.DataFrame) -> pd.Series:
    """``plate/well/site`` of every site (vectorized: millions of sites)."""
    plate, well, site = (sites[c].astype(str) for c in KEYS)
    return (plate + "/" + well + "/" + site).astype("str")  # Arrow text: ~30 bytes a site, not ~80


def fingerprint(sites: pd.DataFrame, cfg: ConvertConfig, illum: dict) -> str:
    """Identify the job: settings that change bytes, every site's metadata, files and stats."""
    # max_pixels changes which sites are stored, and the sites are hashed below.
    settings = cfg.model_dump(mode="json", exclude={"workers", "max_pixels"})
    columns = list(sites.columns)
    rows = hashlib.sha256()
    for c in columns:  # a column and a block of rows at a time: millions of sites as text
        for start in range(0, len(sites), HASH_ROWS):  # would not fit
            part = sites[c].iloc[start : start + HASH_ROWS]
            if not isinstance(part.dtype, pd.CategoricalDtype):  # these hash their categories
                part = part.astype(str)  # (the same hashes as their values, without the text)
            rows.update(pd.util.hash_pandas_object(part, index=False).to_numpy())
    illum_stats = {p: Path(p).stat().st_mtime_ns for ps in illum.values() for p in ps}
    return digest([slayout.FORMAT_VERSION, settings, columns, rows.hexdigest(), illum_stats])


def _shard_key(part: pd.DataFrame, sources: list[list], fp: str, start: int) -> str:
    """What a shard's record must carry to count as done: its rows' keys and files."""
    return digest([fp, start, part["_key"].tolist(), sources])


def shard_keys(plan: pd.DataFrame, shard: int, fp: str, cfg: ConvertConfig,
               pages: list[int]) -> Iterator[tuple[int, int, int, str]]:  # fmt: skip
    """``(index, start, rows, key)`` of every shard of the plan."""
    for index, start in enumerate(range(0, len(plan), shard)):
        part = plan.iloc[start : start + shard]
        sources = site_sources(part, cfg.channels, pages)
        yield index, start, len(part), _shard_key(part, sources, fp, start)


def shard_tasks(plan: pd.DataFrame, out: str, shard: int, fp: str, cfg: ConvertConfig,
                illum: dict, pages: list[int], owner: Owner | None = None,
                only: Iterable[int] | None = None) -> Iterator[ShardTask]:  # fmt: skip
    """The shards' tasks in order (``only``: these shards), each built when it is asked for."""
    indices = range(-(-len(plan) // shard)) if only is None else sorted(only)
    for index in indices:
        start = index * shard
        part = plan.iloc[start : start + shard]
        sources = site_sources(part, cfg.channels, pages)
        sites = [(s, illum.get(p, [])) for s, p in zip(sources, part[PLATE].astype(str))]
        groups = platestats.group_keys(part, PLATE, cfg.negcon)
        key = _shard_key(part, sources, fp, start)
        yield ShardTask(out, index, start, key, cfg.size, sites, groups, owner)


@dataclass(frozen=True)
class FieldPlan:
    """The rows of a field store, one per site, and how to pack them. :func:`pack_all` and
    :func:`finish` ask a plan only this; a cell store's (:class:`conversion.cells.CellPlan`)
    answers the same questions with one row per nucleus."""

    sites: pd.DataFrame  # the probe's survivors, sorted, with their "_key"
    cfg: ConvertConfig
    illum: dict[str, list[str]]
    pages: list[int]
    pack = staticmethod(pack_shard)  # what a mapper runs for one shard's task

    def __len__(self) -> int:
        return len(self.sites)

    def without(self, bad: dict[str, str]) -> FieldPlan:
        """The plan without the sites (by key) that failed to decode."""
        return replace(self, sites=_current_plan(self.sites, bad))

    def shard_keys(self, shard: int, fp: str) -> Iterator[tuple[int, int, int, str]]:
        return shard_keys(self.sites, shard, fp, self.cfg, self.pages)

    def tasks(self, out: str, shard: int, fp: str, owner: Owner | None,
              only: Iterable[int]) -> Iterator[ShardTask]:  # fmt: skip
        return shard_tasks(self.sites, out, shard, fp, self.cfg, self.illum, self.pages, owner,
                           only)  # fmt: skip

    def site_key(self, row: int) -> str:
        """The key of the site row ``row`` of the store comes from."""
        return str(self.sites.at[row, "_key"])

    def metadata(self, start: int, stop: int, record: dict[str, Any]) -> pd.DataFrame:
        return store_metadata(self.sites.iloc[start:stop], record, self.cfg.channels)

    def attrs(self) -> dict[str, Any]:
        return {"unit": "field"}

    def save(self, target: str) -> None:
        """Nothing to keep beside a field store's manifest (a cell plan keeps found nuclei)."""


def _current_plan(sites: pd.DataFrame, bad: dict[str, str]) -> pd.DataFrame:
    return sites.loc[~sites["_key"].isin(bad)].reset_index(drop=True)
