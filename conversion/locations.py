"""Nucleus centres for a cell store (``convert --crop-size``): read from ``--locations``, or
found on the nuclear channel by :mod:`conversion.nuclei`'s finder; kept as compact arrays.

``--locations`` is either

- a folder in DeepProfiler's layout: ``<plate>/<well>-<site>-Nuclei.csv`` per site with
  ``Nuclei_Location_Center_X/Y`` (read in parallel through the conversion's mapper); a site
  without its file has no cells; or
- one CellProfiler object table (CSV or TSV): centres from ``Location_Center_X/Y`` (else
  ``AreaShape_Center_X/Y``), ``ObjectNumber``, and the site from ``Metadata_Plate/Well/Site``
  or from ``ImageNumber``: CellProfiler numbers image sets by the rows of the LoadData CSV it
  read, from 1. Read a block of rows at a time.

:class:`Cells` are four arrays: int32 site row (of the plan's sorted sites table), int32
ObjectNumber, float32 x and y in native pixels: 16 bytes a cell, 1.2 GB at the pilot's 75 M.
They are sorted by (site row, ObjectNumber): the sites are sorted by (plate, well, site), so a
site's cells are contiguous and in the store's order.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pandas as pd

from cellmorph.config import ConvertConfig, NucleiConfig
from cellmorph.errors import CellmorphError
from cellmorph.store.layout import KEYS, PLATE, SITE, WELL
from conversion.nuclei import SiteTask, run_site
from conversion.shards import Mapper
from conversion.tables import site_sources, sniff_separator
from conversion.tiffs import Source

# Per-site files: the object's prefix DeepProfiler writes, then CellProfiler's own names.
X_NAMES = ["Nuclei_Location_Center_X", "Location_Center_X", "AreaShape_Center_X"]
Y_NAMES = [n[:-1] + "Y" for n in X_NAMES]
# One CellProfiler table: its own names first (a merged table prefixes the object's name).
TABLE_X = ["Location_Center_X", "AreaShape_Center_X", "Nuclei_Location_Center_X"]
TABLE_Y = [n[:-1] + "Y" for n in TABLE_X]
OBJECT = "ObjectNumber"
IMAGE = "ImageNumber"
FILE_CHUNK = 256  # sites per task reading DeepProfiler files
FIND_CHUNK = 8  # sites per task of the finder (~0.3 s a site)
TABLE_ROWS = 1 << 20  # rows of a CellProfiler table read at a time
_CHECK_BLOCK = 1 << 20  # cells checked for order at a time


@dataclass(frozen=True)
class Cells:
    """One entry per nucleus: site row, ObjectNumber, centre x and y (native px)."""

    site: np.ndarray  # int32
    obj: np.ndarray  # int32
    x: np.ndarray  # float32
    y: np.ndarray  # float32

    @classmethod
    def build(cls, site: Any, obj: Any, x: Any, y: Any) -> Cells:
        return cls(np.asarray(site, np.int32), np.asarray(obj, np.int32),
                   np.asarray(x, np.float32), np.asarray(y, np.float32))  # fmt: skip

    @classmethod
    def concat(cls, parts: list[Cells]) -> Cells:
        if not parts:
            return cls.build([], [], [], [])
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in FIELDS))

    @classmethod
    def gather(cls, parts: list[Cells]) -> Cells:
        """:meth:`concat`, emptying ``parts``: one field at a time, so the peak is the parts
        and one joined field (20 bytes a cell), not the parts and all of it (32)."""
        fields = {}
        for f in FIELDS:
            fields[f] = np.concatenate([getattr(p, f) for p in parts] or [np.zeros(0)])
            for p in parts:
                object.__setattr__(p, f, None)
        parts.clear()
        return cls.build(*(fields[f] for f in FIELDS))

    def __len__(self) -> int:
        return len(self.site)

    def take(self, index: Any) -> Cells:
        return Cells(*(getattr(self, f)[index] for f in FIELDS))

    def in_order(self) -> bool:
        """Strictly increasing (site row, ObjectNumber), so also no nucleus twice; checked a
        block at a time (the arrays may be mapped files of 75 M cells)."""
        s, o = self.site, self.obj
        for b in range(0, max(len(s) - 1, 0), _CHECK_BLOCK):
            ss, oo = s[b : b + _CHECK_BLOCK + 1], o[b : b + _CHECK_BLOCK + 1]
            if not np.all((ss[1:] > ss[:-1]) | ((ss[1:] == ss[:-1]) & (oo[1:] > oo[:-1]))):
                return False
        return True

    def sorted(self, where: str, sites: pd.DataFrame) -> Cells:
        """Sorted by (site row, ObjectNumber); a nucleus listed twice stops, naming ``where``.
        A table out of order is sorted in memory (tables CellProfiler writes are in order)."""
        if self.in_order():
            return self
        cells = self.take(np.lexsort((self.obj, self.site)))
        twice = np.flatnonzero(
            (cells.site[1:] == cells.site[:-1]) & (cells.obj[1:] == cells.obj[:-1])
        )
        if len(twice):
            i = int(twice[0])
            site = "/".join(str(sites[k].iat[int(cells.site[i])]) for k in KEYS)
            raise CellmorphError(
                f"{where} lists ObjectNumber {int(cells.obj[i])} of site {site} more than once "
                f"({len(twice)} repeated nuclei): two tables merged, or two objects' rows?"
            )
        return cells

    def digest(self) -> str:
        h = hashlib.sha256()
        for f in FIELDS:
            h.update(np.ascontiguousarray(getattr(self, f)).data)
        return h.hexdigest()


FIELDS = ("site", "obj", "x", "y")


# ------------------------------------------------------------------ the plan on disk
# The pilot's 75 M cells are 16 bytes each in the plan (1.2 GB), held by the driver for the whole
# conversion, and joining the blocks a table is read in took that much again. Written to four
# files as the blocks come and mapped read-only afterwards, they are file pages the kernel can
# drop and read back, not private memory, and the peak while reading is one block. The files are
# unlinked as soon as they are mapped: a killed conversion leaves nothing behind.
_DTYPES = {"site": np.int32, "obj": np.int32, "x": np.float32, "y": np.float32}


class CellSpill:
    """``with CellSpill() as spill: spill.add(cells)...; plan = spill.cells()``."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="cellmorph-cells-")
        self._files = {f: open(os.path.join(self._dir, f), "wb") for f in FIELDS}  # noqa: SIM115

    def add(self, cells: Cells) -> None:
        for f, fh in self._files.items():
            np.ascontiguousarray(getattr(cells, f), _DTYPES[f]).tofile(fh)

    def cells(self) -> Cells:
        """Everything added, memory-mapped read-only (in the order it was added)."""
        arrays = []
        for f, fh in self._files.items():
            fh.close()
            n = os.path.getsize(fh.name) // np.dtype(_DTYPES[f]).itemsize
            mapped = np.memmap(fh.name, _DTYPES[f], mode="r", shape=(n,)) if n else None
            arrays.append(mapped if mapped is not None else np.zeros(0, _DTYPES[f]))
        self.close()  # the maps keep the pages; the names go
        return Cells(*arrays)

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> CellSpill:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def spilled(cells: Cells) -> Cells:
    """``cells`` as memory-mapped arrays (a plan built in memory: the finder's, a folder's)."""
    with CellSpill() as spill:
        spill.add(cells)
        return spill.cells()


def _pick(columns: list[str], names: list[str], where: str) -> str:
    found = next((n for n in names if n in columns), None)
    if found is None:
        alts = f" (or {', '.join(names[1:])})" if len(names) > 1 else ""
        raise CellmorphError(f"{where} lacks column {names[0]}{alts}")
    return found


def _numbers(df: pd.DataFrame, column: str, where: str) -> np.ndarray:
    values = pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise CellmorphError(
            f"{where}: column {column} holds {df[column].iloc[bad[0]]!r}, not a number "
            f"({len(bad)} such value(s))"
        )
    return values


# ------------------------------------------------------------------ DeepProfiler folder layout
def site_file(folder: str, plate: str, well: str, site: Any) -> str:
    return os.path.join(folder, str(plate), f"{well}-{site}-Nuclei.csv")


def read_site_file(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | str:
    """(ObjectNumber, x, y) of one DeepProfiler file; a string says why it is unusable (an
    empty file lists no nuclei; ObjectNumber is the row order when the file has none)."""
    try:
        df = pd.read_csv(path, keep_default_na=False, sep=sniff_separator(Path(path)))
    except pd.errors.EmptyDataError:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as e:
        return f"locations file {path} is not a readable CSV ({e})"
    df.columns = [str(c).strip() for c in df.columns]
    try:
        x, y = (_pick(list(df.columns), names, f"locations file {path}")
                for names in (X_NAMES, Y_NAMES))  # fmt: skip
        obj = _numbers(df, OBJECT, path) if OBJECT in df.columns else np.arange(1, len(df) + 1)
        return obj, _numbers(df, x, path), _numbers(df, y, path)
    except CellmorphError as e:
        return str(e)


def read_file_chunk(chunk: list[tuple[int, str]]) -> tuple[Cells, dict[int, str], str | None]:
    """Read a block of sites' files (a pool task): cells, the sites without a file, an error."""
    parts, missing = [], {}
    for row, path in chunk:
        if not os.path.isfile(path):
            missing[row] = f"no cells: no locations file {path}"
            continue
        got = read_site_file(path)
        if isinstance(got, str):
            return Cells.build([], [], [], []), {}, got
        obj, x, y = got
        order = np.argsort(obj, kind="stable")
        parts.append(Cells.build(np.full(len(obj), row), obj[order], x[order], y[order]))
    return Cells.concat(parts), missing, None


def read_folder(folder: str, sites: pd.DataFrame, run: Mapper) -> tuple[Cells, dict[int, str]]:
    """Every site's file under ``folder``: the cells, and a reason per site without a file."""
    paths = [site_file(folder, *k) for k in zip(*(sites[c].astype(str) for c in KEYS))]
    chunks = [list(zip(range(i, i + FILE_CHUNK), paths[i : i + FILE_CHUNK]))
              for i in range(0, len(paths), FILE_CHUNK)]  # fmt: skip
    parts, missing = [], {}
    for cells, absent, error in run(read_file_chunk, chunks):
        if error:
            raise CellmorphError(error)
        parts.append(cells)
        missing.update(absent)
    parts.sort(key=lambda c: int(c.site[0]) if len(c) else -1)  # chunks are runs of sites
    return spilled(Cells.gather(parts).sorted(f"--locations {folder}", sites)), missing


# ------------------------------------------------------------------ one CellProfiler table
def _site_index(sites: pd.DataFrame) -> pd.MultiIndex:
    return pd.MultiIndex.from_arrays([sites[PLATE].astype(str), sites[WELL].astype(str),
                                      sites[SITE].astype("int64")])  # fmt: skip


def _rows_of(keys: pd.DataFrame, index: pd.MultiIndex) -> np.ndarray:
    """Per row of text keys (plate, well, site), its site row in ``index`` (-1: none)."""
    plate, well = (keys[c].astype(str).str.strip() for c in (PLATE, WELL))
    site = keys[SITE].astype(str).str.strip()
    whole = site.str.fullmatch(r"\d+(\.0*)?").fillna(False).to_numpy(dtype=bool)
    number = np.where(whole, pd.to_numeric(site.str.partition(".")[0], errors="coerce"), -1)
    found = index.get_indexer(pd.MultiIndex.from_arrays([plate, well, number.astype("int64")]))
    return np.where(whole, found, -1)


def _image_rows(cfg: ConvertConfig, index: pd.MultiIndex, table: str) -> np.ndarray:
    """Site row per CellProfiler ImageNumber (entry 0 unused): the LoadData CSV's row order."""
    if not cfg.load_data:
        raise CellmorphError(
            f"--locations {table} names sites by ImageNumber, which only a LoadData CSV "
            "numbers: give --load-data, or a table with Metadata_Plate/Well/Site columns"
        )
    path = Path(cfg.load_data)
    keys = pd.read_csv(path, usecols=KEYS, dtype=str, keep_default_na=False,
                       encoding="utf-8-sig", sep=sniff_separator(path))  # fmt: skip
    return np.concatenate([[-1], _rows_of(keys, index)]).astype(np.int64)


def _table_sites(block: pd.DataFrame, image_rows: np.ndarray | None, index: pd.MultiIndex,
                 table: str) -> np.ndarray:  # fmt: skip
    if image_rows is None:
        return _rows_of(block, index)
    number = _numbers(block, IMAGE, table).astype(np.int64)
    bad = np.flatnonzero((number < 1) | (number >= len(image_rows)))
    if len(bad):
        raise CellmorphError(
            f"{table}: ImageNumber {number[bad[0]]} is not a row of LoadData CSV (it has "
            f"{len(image_rows) - 1} rows; CellProfiler numbers them from 1): is it the table of "
            "this LoadData CSV?"
        )
    return image_rows[number]


def read_table(table: str, sites: pd.DataFrame, cfg: ConvertConfig) -> tuple[Cells, int]:
    """A CellProfiler object table: the cells of the plan's sites, and how many rows belong to
    no site of the plan (quarantined sites, or sites not in the inputs)."""
    path = Path(table)
    sep = sniff_separator(path)
    header = [str(c).strip() for c in pd.read_csv(path, nrows=0, sep=sep, encoding="utf-8-sig")]
    where = f"--locations table {table}"
    x, y = (_pick(header, names, where) for names in (TABLE_X, TABLE_Y))
    _pick(header, [OBJECT], where)
    index = _site_index(sites)
    by_keys = all(k in header for k in KEYS)
    if not by_keys and IMAGE not in header:
        raise CellmorphError(f"{where} lacks columns {', '.join(KEYS)} (or {IMAGE})")
    image_rows = None if by_keys else _image_rows(cfg, index, table)
    use = [*(KEYS if by_keys else [IMAGE]), OBJECT, x, y]
    dropped = 0
    with CellSpill() as spill:
        for block in _blocks(path, sep, use):
            rows = _table_sites(block, image_rows, index, table)
            keep = rows >= 0
            dropped += int((~keep).sum())
            obj, cx, cy = (_numbers(block, c, table)[keep] for c in (OBJECT, x, y))
            spill.add(Cells.build(rows[keep], obj, cx, cy))
        cells = spill.cells().sorted(where, sites)
    return cells, dropped


def _blocks(path: Path, sep: str, use: list[str]) -> Iterator[pd.DataFrame]:
    """The table's columns ``use``, ``TABLE_ROWS`` rows at a time (keys as text)."""
    text = {c: str for c in use if c in KEYS}
    opts: dict[str, Any] = dict(keep_default_na=False, encoding="utf-8-sig", sep=sep)
    try:
        with pd.read_csv(path, usecols=lambda c: c.strip() in use, dtype=text,
                         chunksize=TABLE_ROWS, **opts) as reader:  # fmt: skip
            for block in reader:
                block.columns = [str(c).strip() for c in block.columns]
                yield block
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise CellmorphError(f"--locations table {path} is not a readable CSV ({e})") from None


# ------------------------------------------------------------------ the finder
def find_chunk(task: tuple[list[tuple[int, list[Source]]], NucleiConfig]) -> tuple[Cells, dict]:
    """Find the nuclei of a few sites (a pool task): their cells, and the sites that failed."""
    items, cfg = task
    parts, failed = [], {}
    for row, sources in items:
        res = run_site(SiteTask(("", "", ""), sources, cfg))
        if res.nuclei is None:
            failed[row] = res.reason
            continue
        n = len(res.nuclei)
        parts.append(Cells.build(np.full(n, row), np.arange(1, n + 1), res.nuclei[:, 0],
                                 res.nuclei[:, 1]))  # fmt: skip
    return Cells.concat(parts), failed


def find(sites: pd.DataFrame, pages: list[int], cfg: ConvertConfig, nuclei: NucleiConfig,
         run: Mapper) -> tuple[Cells, dict[int, str]]:  # fmt: skip
    """Every site's nuclei on ``nuclei.channel``: the cells, and the sites that failed."""
    if nuclei.channel not in cfg.channels:
        raise CellmorphError(
            f"nuclei.channel {nuclei.channel} is not one of convert.channels "
            f"({','.join(cfg.channels)}): the finder needs the nuclear stain"
        )
    page = [pages[list(cfg.channels).index(nuclei.channel)]]

    def tasks() -> Iterator[tuple[list[tuple[int, list[Source]]], NucleiConfig]]:
        for start in range(0, len(sites), FIND_CHUNK * 64):  # sources built a block at a time
            part = sites.iloc[start : start + FIND_CHUNK * 64]
            items = list(enumerate(site_sources(part, [nuclei.channel], page), start))
            yield from ((items[i : i + FIND_CHUNK], nuclei)
                        for i in range(0, len(items), FIND_CHUNK))  # fmt: skip

    parts, failed = [], {}
    for cells, bad in run(find_chunk, tasks()):
        parts.append(cells)
        failed.update(bad)
    parts.sort(key=lambda c: int(c.site[0]) if len(c) else -1)  # in order: no sort needed
    return spilled(Cells.gather(parts).sorted("the nuclei finder", sites)), failed
