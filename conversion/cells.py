"""Cell stores (``convert --crop-size S``): one row per nucleus, a crop of S x S pixels of every
channel centred on it (docs/architecture.md, "Cell stores").

Planning: the sites table stays as the probe left it; the cells are compact arrays
(:class:`conversion.locations.Cells`, 16 bytes a cell) read from ``--locations`` or found by the
nuclei finder. Sites without a nucleus go to quarantine ("no cells: ..."); a site whose pixels
the finder could not decode goes there with that reason. Metadata rows per cell are built a
shard at a time, when ``metadata.parquet`` is written.

Packing (:func:`pack_cells`): a shard's task carries its cells' centres and the distinct sites
they come from (a site's cells are contiguous); each site is decoded once, divided by its
illumination functions, binned (``bin`` x ``bin`` blocks averaged), and its cells cropped with
zeros past the field's edge. The crop's centre pixel is the one holding the nucleus centre
(native pixel ``round(x)``, binned pixel ``round(x) // bin``); it spans ``S // 2`` pixels before
it and ``S - S // 2 - 1`` after. A site that fails to decode fails the shard and leaves the
plan with its cells (:func:`conversion.pack.pack_all`).

The finder's nuclei are kept in the store's manifest (``.convert/nuclei-<digest>.npz``), so a
rerun after a kill does not segment every site again.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from cellmorph.config import ConvertConfig, NucleiConfig
from cellmorph.errors import CellmorphError
from cellmorph.store import files as sfiles
from cellmorph.store import write as swrite
from cellmorph.store.layout import PLATE
from conversion import locations, ownership, platestats
from conversion.locations import Cells
from conversion.manifest import DIRNAME, digest
from conversion.ownership import Owner
from conversion.shards import Mapper, ShardResult, corrected, write_shard
from conversion.tables import Inputs, quarantine_row, site_sources, store_metadata
from conversion.tiffs import BadImage, Source, read_site

FINDER = "cellmorph nuclei finder"
EDGE = "zero-padded"


@dataclass(frozen=True)
class CellShardTask:
    """Rows ``start .. start + len(xy)`` of a cell store: the cells' centres and their sites."""

    out: str
    index: int
    start: int
    key: str
    size: int  # the crop size S
    bin: int
    sites: list[tuple[list[Source], list[str]]]  # distinct sites: (sources, illumination files)
    counts: list[int]  # cells per site, in order
    xy: np.ndarray  # (cells, 2) float32 centres, native px
    groups: list[str]  # per site: plate and negative-control flag (platestats.group_keys)
    owner: Owner | None = None

    def describe(self) -> str:
        """The shard's rows and sites, in words (a dead pool worker's message)."""
        first = self.sites[0][0][0][0] if self.sites and self.sites[0][0] else "no file"
        last = self.start + len(self.xy) - 1
        return (f"shard {self.index} (rows {self.start}-{last}, {len(self.xy)} cell(s) of "
                f"{len(self.sites)} site(s) from {first})")  # fmt: skip


def binned(planes: list[np.ndarray], factor: int) -> np.ndarray:
    """(C, H // factor, W // factor) uint16: the mean of each factor x factor block (a partial
    block at the right or bottom edge is left out), rounded; the planes as they are for 1."""
    field = np.stack(planes)
    if factor > 1:
        c, h, w = field.shape
        h, w = h // factor, w // factor
        blocks = field[:, : h * factor, : w * factor].reshape(c, h, factor, w, factor)
        field = blocks.sum(axis=(2, 4), dtype=np.float32) / np.float32(factor * factor)
    if field.dtype == np.uint16:
        return field
    if field.dtype == np.uint8:
        return field.astype(np.uint16)
    return np.clip(np.rint(field), 0, 65535).astype(np.uint16)


def crop_cells(field: np.ndarray, xy: np.ndarray, factor: int, out: np.ndarray) -> None:
    """Crop ``out.shape[-1]`` px squares of ``field`` (C, H, W) around each centre into ``out``
    (zeros already): what lies past the field's edge stays zero."""
    size = out.shape[-1]
    h, w = field.shape[1:]
    cx, cy = (np.floor(xy[:, i].astype(np.float64) + 0.5).astype(np.int64) // factor
              for i in (0, 1))  # fmt: skip
    for i, (left, top) in enumerate(zip(cx - size // 2, cy - size // 2)):
        t0, l0 = max(int(top), 0), max(int(left), 0)
        t1, l1 = min(int(top) + size, h), min(int(left) + size, w)
        if t1 > t0 and l1 > l0:
            out[i, :, t0 - top : t1 - top, l0 - left : l1 - left] = field[:, t0:t1, l0:l1]


# The last site this process decoded, binned: (its key, (field, saturated, pixels)). A shard
# ends inside a site about as often as not (1024 cells hold ~10 sites), and the next shard
# starts with that site's other cells: with one worker it is not decoded a second time.
_last_site: list[tuple[Any, tuple[np.ndarray, np.ndarray, int]]] = []


def _files_key(paths: list[str]) -> tuple | None:
    """The files as they are now (path, size, mtime, inode), or None if one cannot be stat'ed
    (then the site is decoded, and its error reported, as without the cache)."""
    try:
        stats = [os.stat(p) for p in paths]
    except OSError:
        return None
    return tuple((p, s.st_size, s.st_mtime_ns, s.st_ino) for p, s in zip(paths, stats))


def site_field(sources: list[Source], illum: list[str],
               factor: int) -> tuple[np.ndarray, np.ndarray, int]:  # fmt: skip
    """One site decoded, corrected and binned: (field (C, H, W) uint16, pixels the correction
    saturated per channel, pixels divided per channel). The same site asked for again right
    after (the next shard's first cells) comes from memory, with the same counts, so a
    shard's record is the same whichever worker packed the shard before it."""
    files = _files_key([p for p, _ in sources] + list(illum))
    key = None if files is None else (tuple(sources), files, factor)
    if key is not None and _last_site and _last_site[0][0] == key:
        return _last_site[0][1]
    _last_site.clear()  # the old field goes before the new one is decoded (memory)
    saturated = np.zeros(len(sources), dtype=np.int64)
    planes = corrected(read_site(sources), illum, saturated)  # BadImage: not kept
    pixels = planes[0].size if illum else 0  # per channel, what was divided
    field = binned(planes, factor)
    field.flags.writeable = False
    if key is not None:
        _last_site.append((key, (field, saturated, pixels)))
    return field, saturated, pixels


def pack_cells(task: CellShardTask) -> ShardResult:
    """Pack one shard of cells: each site decoded once (:func:`site_field`), corrected, binned
    and cropped, then the block written and recorded (:func:`conversion.shards.write_shard`)."""
    arr = swrite.open_images(task.out)
    block = np.zeros((len(task.xy), *arr.shape[1:]), dtype=np.uint16)
    failures: dict[int, str] = {}
    saturated = np.zeros(arr.shape[1], dtype=np.int64)
    pixels, row = 0, 0
    for (sources, illum), count in zip(task.sites, task.counts):
        try:
            field, site_saturated, site_pixels = site_field(sources, illum, task.bin)
        except BadImage as e:
            failures[row] = str(e)  # the site's first cell: pack_all drops the whole site
        else:
            saturated += site_saturated
            pixels += site_pixels
            crop_cells(field, task.xy[row : row + count], task.bin, block[row : row + count])
        row += count
    if failures:
        return ShardResult(task.index, 0, failures)
    groups = [g for g, n in zip(task.groups, task.counts) for _ in range(n)]
    return write_shard(task, block, groups, saturated, pixels, histogram=True)


def _runs(site: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct sites of a sorted slice of cells and how many cells each has."""
    if len(site) == 0:
        return site, site
    starts = np.flatnonzero(np.r_[True, site[1:] != site[:-1]])
    return site[starts], np.diff(np.r_[starts, len(site)])


@dataclass(frozen=True)
class CellPlan:
    """The rows of a cell store, one per nucleus, and how to pack them (the questions
    :func:`conversion.pack.pack_all` and ``finish`` ask; :class:`conversion.pack.FieldPlan`
    answers them for fields)."""

    sites: pd.DataFrame  # the probe's survivors, sorted, with their "_key" (never copied)
    cells: Cells
    cfg: ConvertConfig
    illum: dict[str, list[str]]
    pages: list[int]
    extra_attrs: dict[str, Any]
    cache: tuple[str, bytes] | None = None  # the finder's nuclei, kept beside the manifest
    pack = staticmethod(pack_cells)

    def __len__(self) -> int:
        return len(self.cells)

    def without(self, bad: dict[str, str]) -> CellPlan:
        """The plan without the cells of the sites (by key) that failed to decode."""
        if not bad:
            return self
        rows = np.flatnonzero(self.sites["_key"].isin(bad).to_numpy())
        return replace(self, cells=self.cells.take(~np.isin(self.cells.site, rows)))

    def _span(
        self, index: int, shard: int, fp: str
    ) -> tuple[int, slice, np.ndarray, np.ndarray, str]:
        start = index * shard
        span = slice(start, min(start + shard, len(self.cells)))
        sites, counts = _runs(self.cells.site[span])
        keys = self.sites["_key"].iloc[sites].tolist()
        objs = hashlib.sha256(self.cells.obj[span].tobytes()).hexdigest()
        key = digest([fp, start, keys, counts.tolist(), objs])
        return start, span, sites, counts, key

    def shard_keys(self, shard: int, fp: str) -> Iterator[tuple[int, int, int, str]]:
        for index in range(-(-len(self.cells) // shard)):
            start, span, _, _, key = self._span(index, shard, fp)
            yield index, start, span.stop - start, key

    def tasks(self, out: str, shard: int, fp: str, owner: Owner | None,
              only: Iterable[int]) -> Iterator[CellShardTask]:  # fmt: skip
        channels, cfg = list(self.cfg.channels), self.cfg
        for index in sorted(only):
            start, span, sites, counts, key = self._span(index, shard, fp)
            part = self.sites.iloc[sites]
            plates = part[PLATE].astype(str)
            srcs = [(s, self.illum.get(p, []))
                    for s, p in zip(site_sources(part, channels, self.pages), plates)]  # fmt: skip
            xy = np.stack([self.cells.x[span], self.cells.y[span]], axis=1)
            groups = platestats.group_keys(part, PLATE, cfg.negcon)
            yield CellShardTask(out, index, start, key, int(cfg.crop_size or 0), cfg.bin, srcs,
                                counts.tolist(), xy, groups, owner)  # fmt: skip

    def site_key(self, row: int) -> str:
        return str(self.sites["_key"].iat[int(self.cells.site[row])])

    def metadata(self, start: int, stop: int, record: dict[str, Any]) -> pd.DataFrame:
        """One shard's rows: each cell's site columns, ObjectNumber and centre (native px)."""
        c = self.cells
        # Centres to 1/1000 px: the float32 plan's precision, written as decimals read back.
        extra = {"ObjectNumber": c.obj[start:stop].astype(np.int64),
                 "Location_Center_X": np.round(c.x[start:stop].astype(np.float64), 3),
                 "Location_Center_Y": np.round(c.y[start:stop].astype(np.float64), 3)}  # fmt: skip
        part = self.sites.iloc[c.site[start:stop]]
        return store_metadata(part, record, self.cfg.channels, extra)

    def attrs(self) -> dict[str, Any]:
        return self.extra_attrs

    def save(self, target: str) -> None:
        """Keep the finder's nuclei in the manifest folder (a rerun reads them back)."""
        if self.cache is not None:
            sfiles.write_bytes(target, f"{DIRNAME}/{self.cache[0]}", self.cache[1])


def check_locations(cfg: ConvertConfig) -> None:
    """``--locations`` must be there: stop before any TIFF is read."""
    if cfg.locations and sfiles.path_kind(cfg.locations) not in ("file", "folder"):
        raise CellmorphError(f"--locations {cfg.locations} not found")


def _cache_name(fp: str, nuclei: NucleiConfig) -> str:
    return f"nuclei-{digest([fp, nuclei.model_dump(mode='json', exclude={'workers'})])[:16]}.npz"


def _load_cache(out: str, name: str) -> tuple[Cells, dict[int, str]] | None:
    """The finder's nuclei saved by an earlier run of this job (in ``out`` or its staging)."""
    folders = [out] + ([str(ownership.staging(out))] if ownership.is_local(out) else [])
    for folder in folders:
        try:
            data = sfiles.read_file(folder, f"{DIRNAME}/{name}")
        except OSError:  # --out is a file, or not a folder yet
            data = None
        if data is not None:
            with np.load(io.BytesIO(data)) as z:
                failed = {int(k): v for k, v in json.loads(str(z["failed"])).items()}
                return Cells.build(z["site"], z["obj"], z["x"], z["y"]), failed
    return None


def _dump_cache(cells: Cells, failed: dict[int, str]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, site=cells.site, obj=cells.obj, x=cells.x, y=cells.y,
             failed=np.array(json.dumps(failed)))  # fmt: skip
    return buf.getvalue()


def _cells(fields: Any, fp: str, nuclei: NucleiConfig, run: Mapper,
           out: str) -> tuple[Cells, dict[int, str], dict[int, str], tuple | None]:  # fmt: skip
    """The plan's cells, the sites that failed (finder), per-site no-cells reasons, the cache."""
    cfg, sites = fields.cfg, fields.sites
    if cfg.locations:
        if sfiles.path_kind(cfg.locations) == "folder":
            cells, notes = locations.read_folder(cfg.locations, sites, run)
            return cells, {}, notes, None
        cells, dropped = locations.read_table(cfg.locations, sites, cfg)
        if dropped:
            print(f"note: {dropped} row(s) of {cfg.locations} belong to no site of this store "
                  "(quarantined sites, or sites not in the inputs)")  # fmt: skip
        return cells, {}, {}, None
    name = _cache_name(fp, nuclei)
    found = _load_cache(out, name)
    cells, failed = found or locations.find(sites, fields.pages, cfg, nuclei, run)
    return cells, failed, {}, (name, _dump_cache(cells, failed))


def plan_cells(fields: Any, fp: str, inputs: Inputs, nuclei: NucleiConfig, run: Mapper,
               out: str) -> tuple[CellPlan, str]:  # fmt: skip
    """A :class:`CellPlan` from a field plan, and the job's fingerprint (the sites', the crop
    settings and the cell table). Sites without cells join ``inputs.quarantine``."""
    cfg, sites = fields.cfg, fields.sites
    cells, failed, notes, cache = _cells(fields, fp, nuclei, run, out)
    where = cfg.locations or f"the nuclei finder ({nuclei.channel}, diameter {nuclei.diameter})"
    default = (f"no cells: {cfg.locations} lists no nuclei for this site" if cfg.locations
               else f"no cells: {where} found no nuclei")  # fmt: skip
    for row, reason in sorted(failed.items()):
        inputs.quarantine.append(quarantine_row(sites.iloc[row], reason))
    counts = np.zeros(len(sites), dtype=np.int64)
    for b in range(0, len(cells), 1 << 20):  # bincount casts all its input to int64 first
        counts += np.bincount(cells.site[b : b + (1 << 20)], minlength=len(sites))
    empty = [int(r) for r in np.flatnonzero(counts == 0) if int(r) not in failed]
    for row in empty:
        inputs.quarantine.append(quarantine_row(sites.iloc[row], notes.get(row, default)))
    size = int(cfg.crop_size or 0)
    crop = {"size": size, "bin": cfg.bin, "edge": EDGE, "locations": cfg.locations or FINDER}
    attrs = {
        "unit": "cell",
        "crop": crop,
        "sites_without_cells": len(empty),
        "sites": int(np.count_nonzero(counts)),
        "resize": {"size": size, "policy": f"{size} x {size} px around each nucleus centre "
                   f"after {cfg.bin} x {cfg.bin} binning, zeros past the field's edge"},
    }  # fmt: skip
    finder = None if cfg.locations else nuclei.model_dump(mode="json", exclude={"workers"})
    fp = digest([fp, crop, finder, cells.digest()])
    plan = CellPlan(sites, cells, cfg, fields.illum, fields.pages, attrs, cache)
    return plan, fp
