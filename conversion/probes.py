"""The plan's first look at the inputs: every TIFF header probed in parallel (missing,
unreadable, truncated, mismatched channels quarantined), and the illumination functions checked
(:mod:`conversion.pack` runs them)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm import tqdm

from cellmorph.config import ConvertConfig
from cellmorph.errors import CellmorphError
from cellmorph.store.layout import PLATE
from conversion.manifest import digest
from conversion.shards import (
    SATURATED,
    Mapper,
)
from conversion.tables import (
    KEYS,
    Inputs,
    quarantine_row,
    site_sources,
)
from conversion.tiffs import BadImage, Source, probe_site

PROBE_CHUNK = 64
# An illumination function is a gain map: CellProfiler rescales its functions to a median (or
# robust minimum) of 1. A median below ILLUM_MIN_MEDIAN multiplies most pixels by more than 10
# (a function left in CellProfiler's 0-1 intensity units, never rescaled, is ~0.01): bright
# cells saturate at 65535. A minimum below ILLUM_MIN_RATIO of the median is a pocket of
# near-zero values that makes its pixels over 100 times brighter than the rest of the field.
ILLUM_MIN_MEDIAN = 0.1
ILLUM_MIN_RATIO = 0.01


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
