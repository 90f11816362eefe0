"""Plan, pack and finish a store: the one conversion routine every entry point calls.

1. Plan: read the layout (structural checks), probe every TIFF header in parallel (missing,
   unreadable, truncated, mismatched channels go to quarantine), sort the survivors by
   (plate, well, site) and give each a row. The plan's fingerprint identifies the job.
2. Pack: one task per shard decodes, corrects, resizes and writes its rows in one write, then
   records itself in the manifest. Tasks run inline, in a process pool, or as Ray tasks; they
   produce the same bytes because a shard's content depends only on the plan.
3. A site whose pixels fail to decode although its header was fine is only found while packing:
   it is quarantined, the plan is recomputed without it (later rows move up), and the shards
   whose content changed are packed again. No row ever holds a placeholder image.
4. Finish: metadata.parquet (row i == images[i], with checksums), quarantine.csv, channel
   statistics from a sample of stored images, then ``complete: true``.

One convert writes a store at a time and its writers never outlive it
(:mod:`conversion.ownership`); ``--overwrite`` of a finished store builds the new one beside it
and swaps it in when complete, so readers of the old one never see a mix. ``--out`` must be
absent, empty or a cellmorph store, and never holds an input.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import zarr
from tqdm import tqdm

from cellmorph.config import ConvertConfig, NucleiConfig
from cellmorph.errors import CellmorphError
from cellmorph.loaders import stats as sstats
from cellmorph.store import files as sfiles
from cellmorph.store import layout as slayout
from cellmorph.store import write as swrite
from cellmorph.store.layout import PLATE
from conversion import cells, ownership, platestats
from conversion.layouts import check_settings, load_inputs, no_valid_sites, summarize_reasons
from conversion.manifest import Manifest, digest
from conversion.ownership import Owner
from conversion.shards import IN_FLIGHT_PER_WORKER as IN_FLIGHT_PER_WORKER
from conversion.shards import (
    SATURATED,
    Mapper,
    ShardResult,
    corrected,
    illum_function,
    read_rows,
    write_shard,
)
from conversion.shards import ProcessMapper as ProcessMapper
from conversion.shards import describe_task as describe_task
from conversion.shards import inline_map as inline_map
from conversion.tables import (
    DIR,
    KEYS,
    Inputs,
    quarantine_row,
    site_sources,
    store_metadata,
)
from conversion.tiffs import BadImage, Source, probe_site, read_site, resize

PROBE_CHUNK = 64
HASH_ROWS = 1 << 18
# An illumination function is a gain map: CellProfiler rescales its functions to a median (or
# robust minimum) of 1. A median below ILLUM_MIN_MEDIAN multiplies most pixels by more than 10
# (a function left in CellProfiler's 0-1 intensity units, never rescaled, is ~0.01): bright
# cells saturate at 65535. A minimum below ILLUM_MIN_RATIO of the median is a pocket of
# near-zero values that makes its pixels over 100 times brighter than the rest of the field.
ILLUM_MIN_MEDIAN = 0.1
ILLUM_MIN_RATIO = 0.01


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


ProbeItem = tuple[int, list[Source], list[str], tuple[int, int] | None, int, int]


def probe_chunk(chunk: list[ProbeItem]) -> list:
    """Probe sites' headers: (row, (digest of the files' paths, sizes and mtimes, dtype)) on
    success, (row, reason) on failure."""
    out = []
    for row, sources, names, illum_shape, size, max_pixels in chunk:
        try:
            infos = probe_site(sources, names, max_pixels)
            first = next(iter(infos.values()))
            if illum_shape and (first.height, first.width) != illum_shape:
                raise BadImage(
                    f"image shape {first.height}x{first.width} != illumination function "
                    f"shape {illum_shape[0]}x{illum_shape[1]}"
                )
            if min(first.height, first.width) < size:
                # Upsampling invents pixels: a 4x4 thumbnail must not pass for a field of cells.
                raise BadImage(
                    f"image {first.height}x{first.width} is smaller than --size {size} "
                    f"({sources[0][0]}; it would be upsampled)"
                )
            stats = [[p, i.size, i.mtime_ns] for p, i in infos.items()]
            out.append((row, (digest(stats)[:16], first.dtype)))  # 16 characters, not a list
        except BadImage as e:
            out.append((row, str(e)))
    return out


def illum_files(cfg: ConvertConfig, plates: Iterable[str]) -> dict[str, list[str]]:
    """``<plate>_Illum<Ch>.npy`` for every plate and channel, or stop naming the missing file."""
    if not cfg.illum_dir:
        return {}
    found = {}
    for plate in sorted(set(plates)):
        paths = [Path(cfg.illum_dir) / f"{plate}_Illum{ch}.npy" for ch in cfg.channels]
        for p in paths:
            if not p.is_file():
                raise CellmorphError(f"illumination function not found: {p}")
        found[plate] = [str(p) for p in paths]
    return found


def check_illum(path: str) -> tuple[int, ...]:
    """Stop on a function that cannot divide: a zero saturates the channel, a NaN blanks it."""
    try:
        fn = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:  # truncated, not .npy, pickled objects
        raise CellmorphError(
            f"illumination function {path} is not a readable .npy array ({e}); recompute or "
            "copy it again"
        ) from None
    if not np.issubdtype(fn.dtype, np.number):
        raise CellmorphError(f"illumination function {path} holds {fn.dtype}, not numbers")
    bad_values = int(np.count_nonzero(~np.isfinite(fn)))
    if bad_values:
        raise CellmorphError(
            f"illumination function {path} has {bad_values} NaN or infinite value(s) of {fn.size}: "
            "dividing by it would blank the channel (recompute it)"
        )
    not_positive = int(np.count_nonzero(fn <= 0))
    if not_positive:
        raise CellmorphError(
            f"illumination function {path} has {not_positive} zero or negative value(s) of "
            f"{fn.size}: dividing by it would saturate the channel (recompute it)"
        )
    _check_illum_scale(path, np.asarray(fn, dtype=np.float64))
    return tuple(fn.shape)


def _check_illum_scale(path: str, fn: np.ndarray) -> None:
    """Stop on a function whose values would saturate pixels (:data:`ILLUM_MIN_MEDIAN`)."""
    median, low = float(np.median(fn)), float(fn.min())
    if median < ILLUM_MIN_MEDIAN:
        raise CellmorphError(
            f"illumination function {path} has median {median:.3g}: dividing by it multiplies "
            f"pixels by ~{1 / median:.3g} and saturates bright ones at {SATURATED}. "
            "CellProfiler's functions are rescaled to ~1 (CorrectIlluminationCalculate, "
            "rescale: Yes); recompute or rescale it"
        )
    if low < ILLUM_MIN_RATIO * median:
        raise CellmorphError(
            f"illumination function {path} has minimum {low:.3g}, below {ILLUM_MIN_RATIO} of "
            f"its median {median:.3g}: those pixels would be {median / low:.3g} times brighter "
            f"than the rest of the field and saturate at {SATURATED}; recompute it"
        )


def _illum_shape(paths: list[str]) -> tuple[int, int]:
    shapes = {check_illum(p) for p in paths}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise CellmorphError(f"illumination functions {paths} are not 2-D arrays of one shape")
    return next(iter(shapes))


def probe_all(inputs: Inputs, cfg: ConvertConfig, illum: dict, mapper: Mapper) -> pd.DataFrame:
    """Probe every site; move failures to quarantine; return survivors with a ``_stat`` column."""
    sites = inputs.sites
    n = len(sites)
    stat = np.zeros(n, dtype="S16")  # per site: 16 bytes, not a Python string and tuple
    dtype_code = np.full(n, -1, dtype=np.int8)
    dtypes: dict[str, int] = {}
    failures: dict[int, str] = {}
    shapes = {plate: _illum_shape(paths) for plate, paths in illum.items()}  # stop before probing
    chunks = _probe_chunks(sites, inputs.pages, cfg, shapes)
    with tqdm(total=n, unit="site", desc="check TIFFs", leave=False) as bar:
        for res in mapper(probe_chunk, chunks):
            for row, result in res:
                if isinstance(result, str):
                    failures[row] = result
                else:
                    stat[row] = result[0].encode()
                    dtype_code[row] = dtypes.setdefault(result[1], len(dtypes))
            bar.update(len(res))
    failures.update(_mixed_bit_depths(dtype_code, dtypes))
    ok = np.ones(n, dtype=bool)
    ok[list(failures)] = False
    for i in sorted(failures):
        inputs.quarantine.append(quarantine_row(sites.iloc[i], failures[i]))
    survivors = sites.loc[ok].copy()
    survivors["_stat"] = pd.array(stat[ok].astype(str), dtype="str")
    survivors = survivors.sort_values(KEYS, kind="mergesort").reset_index(drop=True)
    pa.default_memory_pool().release_unused()  # the copies' text buffers: back to the system
    return survivors


def _probe_chunks(sites: pd.DataFrame, pages: list[int], cfg: ConvertConfig,
                  shapes: dict[str, tuple[int, int]]) -> Iterator[list[ProbeItem]]:  # fmt: skip
    """The probe's work items, ``PROBE_CHUNK`` sites each, built a block of rows at a time."""
    channels = list(cfg.channels)  # one list for every site (millions of copies otherwise)
    block = PROBE_CHUNK * 64
    for start in range(0, len(sites), block):
        part = sites.iloc[start : start + block]
        items = [
            (start + i, src, channels, shapes.get(plate), cfg.size, cfg.max_pixels)
            for i, (src, plate) in enumerate(
                zip(site_sources(part, channels, pages), part[PLATE].astype(str))
            )
        ]
        yield from (items[i : i + PROBE_CHUNK] for i in range(0, len(items), PROBE_CHUNK))


def _mixed_bit_depths(codes: np.ndarray, dtypes: dict[str, int]) -> dict[int, str]:
    """Failures for the sites of a pixel type other than the common one.

    8-bit sites among 16-bit ones would be stored unscaled next to them (max 255 vs ~3,400),
    so their cells would look black; the majority type wins (16-bit on a tie).
    """
    if len(dtypes) < 2:
        return {}
    names = sorted(dtypes, key=dtypes.get)
    counts = np.bincount(codes[codes >= 0], minlength=len(names))
    top = counts.max()
    keep = "uint16" if counts[dtypes.get("uint16", 0)] == top and "uint16" in dtypes else None
    if keep is None:
        keep = max(names, key=lambda d: (counts[dtypes[d]], -dtypes[d]))
    total = int(counts.sum())
    return {
        int(i): f"{names[codes[i]]} TIFFs among {keep} sites ({counts[dtypes[keep]]} of {total} "
        f"sites are {keep}): their pixel scale differs"
        for i in np.flatnonzero((codes >= 0) & (codes != dtypes[keep]))
    }


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


def _attrs(inputs: Inputs, cfg: ConvertConfig) -> dict[str, Any]:
    return {
        "complete": False,
        "source": inputs.description,
        "label_column": None if cfg.allow_unlabeled else cfg.label_column,
        "resize": {
            "size": cfg.size,
            "policy": "center-crop to square, antialiased bilinear (Pillow)",
        },
        "illumination": "divide by <plate>_Illum<Ch>.npy" if cfg.illum_dir else None,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def out_kind(out: str) -> str:
    """What ``--out`` holds: absent, empty, store (a finished cellmorph store), started (a
    conversion that has not finished, or a store of another format), file, or other."""
    kind = sfiles.path_kind(out)
    if kind != "folder":
        return kind
    names = sfiles.folder_names(out)
    if not names - {slayout.QUARANTINE}:  # empty, or what a stop with no valid sites left
        return "empty"
    try:
        attrs = dict(
            zarr.open_group(store=sfiles.zarr_store(out, True), mode="r", zarr_format=3).attrs
        )
    except slayout.ZARR_ERRORS:  # anything unreadable as a zarr group is not ours to delete
        attrs = {}
    if "cellmorph_format" not in attrs:
        return "started" if Manifest(out).header() is not None else "other"
    done = attrs.get("complete") is True and attrs["cellmorph_format"] == slayout.FORMAT_VERSION
    return "store" if done else "started"


def older_format(out: str | Path) -> bool:
    """True when ``out`` holds a store of an earlier cellmorph format (readers refuse it)."""
    out = str(out).removeprefix("file://")
    try:
        attrs = dict(
            zarr.open_group(store=sfiles.zarr_store(out, True), mode="r", zarr_format=3).attrs
        )
    except slayout.ZARR_ERRORS:  # absent or unreadable: nothing of ours to upgrade
        return False
    version = attrs.get("cellmorph_format")
    return isinstance(version, int) and version < slayout.FORMAT_VERSION


def local_out(out: str) -> str:
    """``--out`` as the path to write. A link is followed (swap the folder, never the link),
    and so are ``.`` and ``..`` (``s.zarr/images/..`` is ``s.zarr``: its writer's folder and
    the swap must be beside the store, not inside it); a loop of links stops with one line."""
    if not ownership.is_local(out):
        return out
    try:
        real = os.path.realpath(out, strict=True)
    except FileNotFoundError:  # not there yet (or a link to a store still to be written)
        real = os.path.realpath(out)
    except OSError as e:  # ELOOP, ENOTDIR: no folder can ever be written there
        raise CellmorphError(f"--out {out}: cannot be a store path ({e.strerror})") from None
    dots = any(part in (".", "..") for part in Path(out).parts) or out.rstrip("/").endswith("/.")
    return real if os.path.islink(out) or dots else out


def check_out(out: str, kind: str) -> None:
    """``--out`` must be absent, empty or a cellmorph store: cellmorph deletes nothing else."""
    if kind == "file":
        raise CellmorphError(f"--out {out} is a file; give the path of a store folder")
    if kind == "other":
        ownership.refuse_if_busy(out)  # another convert may be creating it right now
        raise CellmorphError(
            f"--out {out} exists and is not a cellmorph store; cellmorph never deletes it "
            "(--overwrite replaces only stores): choose another --out"
        )


def check_inputs_outside(out: str, paths: Iterable[str]) -> None:
    """No input may live inside ``--out``: replacing the store would delete it."""
    if not ownership.is_local(out) or not os.path.exists(out):
        return  # nothing can be inside a folder that does not exist
    root = os.path.realpath(out)
    for p in dict.fromkeys(str(p) for p in paths if p):
        real = os.path.realpath(p)
        if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
            raise CellmorphError(
                f"--out {out} holds the input {p}; the store must be written elsewhere"
            )


def input_paths(cfg: ConvertConfig, sites: pd.DataFrame | None = None) -> list[str]:
    """The inputs named by the settings, and the folders of every TIFF."""
    named = [cfg.load_data, cfg.images, cfg.metadata, cfg.join, cfg.illum_dir, cfg.locations,
             cfg.barcode_platemap, cfg.platemap_dir, *(cfg.external_metadata or [])]  # fmt: skip
    folders: list[str] = []
    if sites is not None and len(sites):
        dirs = {d for c in sites.columns if c.startswith(DIR)
                for d in sites[c].astype("category").cat.categories}  # fmt: skip
        folders = sorted({os.path.dirname(d + "x") or "." for d in dirs})
    return [str(p) for p in named if p] + folders


def prepare(out: str, fp: str, n: int, inputs: Inputs, cfg: ConvertConfig, overwrite: bool,
            owner: Owner | None, extra: dict[str, Any] | None = None) -> tuple[str, str]:  # fmt: skip
    """Decide between fresh, resume and done, and where to build: ``(state, target)``.

    ``--overwrite`` of a finished local store builds at the staging path beside it (resuming a
    killed overwrite of the same job there) and :func:`convert` swaps it in when complete."""
    kind = out_kind(out)
    check_out(out, kind)
    header = Manifest(out).header()
    if header is not None and header.get("fingerprint") == fp and not overwrite:
        return ("done" if kind == "store" else "resume"), out
    if kind == "started" and older_format(out) and not overwrite:
        raise CellmorphError(
            f"{out} holds a store of an older cellmorph format, which this version cannot "
            "read; convert again with --overwrite"
        )
    if kind in ("store", "started") and not overwrite:
        raise CellmorphError(
            f"{out} holds a conversion of different inputs or settings (or a store written "
            "by another cellmorph version); choose a new --out or pass --overwrite"
        )
    target = out
    if overwrite and kind == "store" and owner is not None:
        target = str(ownership.staging(out))
        header = Manifest(target).header()
        if header is not None and header.get("fingerprint") == fp:  # a killed overwrite
            return ("done" if out_kind(target) == "store" else "resume"), target
    _create(target, fp, n, inputs, cfg, extra or {})
    return "fresh", target


def _create(target: str, fp: str, n: int, inputs: Inputs, cfg: ConvertConfig,
            extra: dict[str, Any]) -> None:  # fmt: skip
    if sfiles.path_kind(target) != "absent":
        sfiles.remove_folder(target)
    attrs = {**_attrs(inputs, cfg), **extra}  # a cell store's unit, crop and resize
    swrite.create_images(target, n, list(cfg.channels), cfg.size, cfg.codec, cfg.shard_size, attrs)
    Manifest(target).write_header({"fingerprint": fp, "images": n, "shard_size": cfg.shard_size})


def _current_plan(sites: pd.DataFrame, bad: dict[str, str]) -> pd.DataFrame:
    return sites.loc[~sites["_key"].isin(bad)].reset_index(drop=True)


def _fit_array(out: str, n: int) -> int:
    """Resize ``images`` to the plan's length; returns the shard length."""
    arr = zarr.open_array(
        store=sfiles.zarr_store(out), path=slayout.IMAGES, mode="r+", zarr_format=3
    )
    if arr.shape[0] != n:
        arr.resize((n, *arr.shape[1:]))
    return int(arr.shards[0])


def pack_all(units: Any, out: str, fp: str, mapper: Mapper,
             owner: Owner | None = None) -> tuple[Any, int]:  # fmt: skip
    """Pack every shard not yet recorded; repeat while decode failures reshape the plan.

    ``units`` is a :class:`FieldPlan` or a :class:`conversion.cells.CellPlan`; returns the final
    plan (without the sites that failed to decode) and the rows written by this run."""
    manifest = Manifest(out)
    written = 0
    while True:
        bad = manifest.bad()
        plan = units.without(bad)
        if len(plan) == 0:  # every site failed to decode: the caller stops with the reasons
            return plan, written
        shard = _fit_array(out, len(plan))
        spans = {  # the shards not recorded with this plan's content: (start, rows)
            index: (start, rows)
            for index, start, rows, key in plan.shard_keys(shard, fp)
            if (manifest.shard(index) or {}).get("key") != key
        }
        done_images = len(plan) - sum(rows for _, rows in spans.values())
        tasks = plan.tasks(out, shard, fp, owner, only=spans)
        new_bad = {}
        with tqdm(
            total=len(plan), initial=done_images, unit="img", desc="convert", smoothing=0.1
        ) as bar:
            for res in mapper(plan.pack, tasks):
                if res.abandoned:  # cannot happen while we hold the lock; never write past it
                    raise CellmorphError(f"{out}: another convert took over this store")
                start, rows = spans[res.index]
                bar.update(rows)
                written += res.count
                for row, reason in res.failures.items():
                    new_bad[plan.site_key(start + row)] = reason
        if not new_bad:
            return plan, written
        manifest.write_bad({**bad, **new_bad})


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


def convert(
    cfg: ConvertConfig,
    out: str | Path,
    overwrite: bool = False,
    mapper: Mapper | None = None,
    nuclei: NucleiConfig | None = None,
) -> dict[str, Any]:
    """Convert the inputs ``cfg`` describes into the store at ``out`` (resumable, idempotent).

    ``mapper`` runs tasks (default: inline for one worker, a process pool otherwise); the Ray
    job passes one that runs each shard as a Ray task. Holds the store's writer lock throughout.
    With ``cfg.crop_size`` the store holds one crop per nucleus (:mod:`conversion.cells`);
    ``nuclei`` configures the finder used when ``cfg.locations`` is not given.
    """
    t0 = time.perf_counter()
    check_settings(cfg)
    # file:// is a local path; zarr's fsspec store would not create its folders.
    out = str(out).removeprefix("file://")
    if not out.strip():
        raise CellmorphError("--out is empty; give the path of the store to write")
    out = local_out(out)
    check_out(out, out_kind(out))  # before reading anything
    check_inputs_outside(out, input_paths(cfg))
    cells.check_locations(cfg)
    with ownership.hold(out) as owner:
        pool = ProcessMapper(cfg.workers) if mapper is None and cfg.workers > 1 else None
        try:
            run = mapper or pool or inline_map
            return _convert(cfg, out, overwrite, run, owner, t0, nuclei or NucleiConfig())
        finally:
            if pool is not None:
                pool.close()


def _unit(cfg: ConvertConfig) -> str:
    return "cell" if cfg.crop_size else "field"


def _convert(cfg: ConvertConfig, out: str, overwrite: bool, run: Mapper, owner: Owner | None,
             t0: float, nuclei: NucleiConfig) -> dict[str, Any]:  # fmt: skip
    # The codec the store gets, before the fingerprint: "auto" is "zstd" for fields, so their
    # stores and reruns are those of before "auto" existed.
    cfg = cfg.model_copy(update={"codec": swrite.store_codec(cfg.codec, _unit(cfg))})
    inputs = load_inputs(cfg)
    if len(inputs.sites) == 0:  # stop before reading a single TIFF
        _stop_all_quarantined(out, inputs)
    illum = illum_files(cfg, inputs.sites[PLATE].astype(str))
    # A cell's crop may pass the field's edge (zeros): any field that bins to a pixel will do.
    probe_cfg = cfg.model_copy(update={"size": cfg.bin}) if cfg.crop_size else cfg
    sites = probe_all(inputs, probe_cfg, illum, run)
    if len(sites) == 0:
        _stop_all_quarantined(out, inputs)
    if ownership.is_local(out) and os.path.exists(out):  # else nothing can be inside it
        check_inputs_outside(out, input_paths(cfg, sites))
    sites["_key"] = site_keys(sites)
    inputs.sites = sites
    fp = fingerprint(sites, cfg, illum)
    units: Any = FieldPlan(sites, cfg, illum, inputs.pages)
    if cfg.crop_size:  # one row per nucleus: locations read or found, sites without any listed
        units, fp = cells.plan_cells(units, fp, inputs, nuclei, run, out)
        cfg = cfg.model_copy(update={"size": cfg.crop_size})  # the stored image size
        if len(units) == 0:
            _stop_all_quarantined(out, inputs)
    phases = {"plan_s": time.perf_counter() - t0}
    state, target = prepare(out, fp, len(units), inputs, cfg, overwrite, owner, units.attrs())
    written = 0
    if state != "done":
        units.save(target)
        t1 = time.perf_counter()
        plan, written = pack_all(units, target, fp, run, owner)
        if len(plan) == 0:
            _stop_none_decoded(target, inputs)
        t2 = time.perf_counter()
        finish(target, plan, inputs, cfg)
        phases.update(pack_s=t2 - t1, finish_s=time.perf_counter() - t2)
    replaced = ownership.swap_in(Path(target), Path(out)) if target != out else None
    unfinished = owner is not None and ownership.staging(out).exists()
    group = zarr.open_group(store=sfiles.zarr_store(out, True), mode="r", zarr_format=3)
    saturated = group.attrs.get("illumination_saturated")
    warning = saturation_warning(saturated)
    if warning:  # on every run, also "nothing to do": the store keeps those pixels
        print(warning, file=sys.stderr)
    return {
        "illumination_saturated": saturated,
        "unit": group.attrs.get("unit", "field"),
        "sites_without_cells": group.attrs.get("sites_without_cells"),
        "sites": group.attrs.get("sites"),  # a cell store: the sites its cells come from
        "store": out,
        "images": int(group.attrs["images"]),
        "written": written,
        "quarantined": int(group.attrs["quarantined"]),
        "seconds": round(time.perf_counter() - t0, 3),
        "nothing_to_do": state == "done" and replaced is None,
        "replaced": replaced,
        "unfinished_overwrite": str(ownership.staging(out)) if unfinished else None,
        "phases": {k: round(v, 3) for k, v in phases.items()},
        "quarantine_reasons": stored_reasons(out),
    }


def stored_reasons(out: str, top: int = 5) -> list[dict[str, Any]]:
    """The most frequent kinds of reason in a store's quarantine.csv, with counts and fixes."""
    table = slayout.read_quarantine(sfiles.read_file(out, slayout.QUARANTINE))
    return summarize_reasons(table["reason"], top)


def _stop_none_decoded(target: str, inputs: Inputs) -> None:
    """Every site passed the header probe and failed to decode: write quarantine.csv beside the
    unfinished store (a rerun stops the same way), then stop with the reasons."""
    quarantine = quarantine_rows(inputs, Manifest(target).bad())
    swrite.write_quarantine(target, quarantine)
    raise no_valid_sites(quarantine, f"{target}/{slayout.QUARANTINE}")


def _stop_all_quarantined(out: str, inputs: Inputs) -> None:
    """Write quarantine.csv (no store), then stop with the reasons and the options that fix them."""
    present = sfiles.folder_names(out) if sfiles.path_kind(out) == "folder" else set()
    if present - {slayout.QUARANTINE}:  # never touch what is already there (another store?)
        raise no_valid_sites(inputs.quarantine, None)
    sfiles.make_folder(out)
    swrite.write_quarantine(out, inputs.quarantine)
    raise no_valid_sites(inputs.quarantine, f"{out}/{slayout.QUARANTINE}")
