"""Tables of sites: reading CSV/TSV files with explicit NA handling, and the rows both input
layouts produce: one site per row, and per channel its file as two compact columns, the folder
(``_dir_<Ch>``, categorical: a plate's sites share a few folders) and the file name
(``_file_<Ch>``, Arrow text). Python objects per site (a list of path tuples, a path string
per channel) would take ~2 KB a site: 6 GB for the JUMP pilot's 3 M sites."""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from pandas.api.types import union_categoricals

from cellmorph.errors import CellmorphError
from cellmorph.store.layout import CHECKSUM, CHUNK_CRC, KEYS, PLATE, SITE, WELL

DIR, FILE = "_dir_", "_file_"
BLOCK_ROWS = 200_000
__all__ = ["BLOCK_ROWS", "DIR", "FILE", "KEYS", "Inputs", "as_text", "check_header", "compact_text",
           "drop_rows", "quarantine_row", "read_csv", "require_columns", "set_sources",
           "site_paths", "site_sources", "sniff_separator", "split_paths", "store_metadata"]  # fmt: skip


@dataclass
class Inputs:
    """Sites that passed the table checks, and the quarantine rows of those that did not."""

    sites: pd.DataFrame
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    description: dict[str, Any] = field(default_factory=dict)
    # Per channel, the page of its file that holds it (-1: the file's only plane).
    pages: list[int] = field(default_factory=list)


def set_sources(
    df: pd.DataFrame,
    channels: Sequence[str],
    paths: dict[str, pd.Series | tuple[np.ndarray, np.ndarray]],
) -> None:
    """Store each channel's files as folder and name columns, in place: from full paths
    (``""``: no file), or already split as ``(folders ending in "/", names)``."""
    for ch in channels:
        split = paths[ch]
        if not isinstance(split, tuple):
            split = split_paths(split)
        df[DIR + ch] = pd.Categorical(np.asarray(split[0], dtype=object))
        df[FILE + ch] = pd.array(np.asarray(split[1], dtype=object), dtype="str")


def compact_text(df: pd.DataFrame, columns: Iterable[str]) -> None:
    """Text columns that repeat (a plate's name, a compound's SMILES in every site of its wells)
    as categories, in place: codes per row instead of a string per row. Keys stay text."""
    for c in columns:
        col = df[c]
        if c in KEYS or isinstance(col.dtype, pd.CategoricalDtype):
            continue
        if pd.api.types.is_string_dtype(col) and col.nunique(dropna=False) <= len(col) // 2:
            df[c] = col.astype("category")


def as_text(df: pd.DataFrame) -> pd.DataFrame:
    """Categorical columns back to text (what metadata.parquet holds)."""
    cats = [c for c in df.columns if isinstance(df[c].dtype, pd.CategoricalDtype)]
    return df.astype({c: "str" for c in cats}) if cats else df


def split_paths(paths: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(folder with its trailing "/", name) of each path: the folder + the name is the path."""
    if len(paths) == 0:  # rpartition of nothing has no columns
        return np.array([], dtype=object), np.array([], dtype=object)
    parts = paths.fillna("").astype("str").str.rpartition("/")
    return (parts[0] + parts[1]).to_numpy(dtype=object), parts[2].to_numpy(dtype=object)


def site_paths(df: pd.DataFrame, channels: Sequence[str]) -> list[np.ndarray]:
    """Per channel, the full path of every row's file (object arrays: build them per chunk)."""
    return [
        df[DIR + ch].astype(object).to_numpy() + df[FILE + ch].astype(object).to_numpy()
        for ch in channels
    ]


def site_sources(df: pd.DataFrame, channels: Sequence[str], pages: Sequence[int]) -> list[list]:
    """Every row's ``[(path, page), ...]`` in channel order (what the TIFF reader takes)."""
    return [list(zip(row, pages)) for row in zip(*site_paths(df, channels))]


def _row_paths(row: pd.Series) -> list[str]:
    out = []
    for col in row.index:
        if isinstance(col, str) and col.startswith(DIR):
            path = str(row[col]) + str(row.get(FILE + col[len(DIR) :], ""))
            if path:
                out.append(path)
    return out


def sniff_separator(path: Path) -> str:
    """Tab or comma, from the header line's content (the pilot's ``.txt``/``.tsv`` are tabs)."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        header = f.readline()
    return "\t" if header.count("\t") > header.count(",") else ","


def read_csv(
    path: str | Path,
    what: str,
    strings: Iterable[str] = (),
    all_strings: bool = False,
    categories: Callable[[str], bool] | None = None,
    block: Callable[[pd.DataFrame], pd.DataFrame] | None = None,
) -> pd.DataFrame:
    """Read a CSV or TSV (decided by content) or stop with a message naming it.

    NA handling is explicit: no cell is read as missing (``NA``, ``None``, ``null``, ``#N/A``
    are text; an empty cell is ""). ``Metadata_*`` columns and ``strings`` stay text (plate
    ``0001`` keeps its zeros); other columns keep pandas' type inference (a column of numbers is
    numeric); ``all_strings`` reads every column as text; columns ``categories`` picks are read
    as categories of text (few distinct values in millions of rows). ``block`` reads the file
    ``BLOCK_ROWS`` rows at a time and compacts each block before the next is read (millions of
    rows of file paths as text would not fit); categorical columns are then whole again.
    """
    p = Path(path)
    if not p.is_file():
        raise CellmorphError(f"{what} not found: {p}")
    keep = set(strings)
    opts: dict[str, Any] = dict(keep_default_na=False, na_values=[], encoding="utf-8-sig")
    try:
        opts["sep"] = sniff_separator(p)
        check_header(p, what, opts["sep"])
        header = pd.read_csv(p, nrows=0, **opts).columns
        text = [
            c
            for c in header
            if all_strings or c.strip().startswith("Metadata_") or c.strip() in keep
        ]
        dtypes = {c: str for c in text}
        dtypes.update({c: "category" for c in header if categories and categories(c.strip())})
        if block is None:
            df = pd.read_csv(p, dtype=dtypes, **opts)
        else:
            with pd.read_csv(p, dtype=dtypes, chunksize=BLOCK_ROWS, **opts) as reader:
                df = _concat([_released(block(part)) for part in reader])
    except pd.errors.EmptyDataError:
        raise CellmorphError(f"{what} {p} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise CellmorphError(f"{what} {p} is not a readable CSV or TSV ({e})") from None
    df.columns = [str(c).strip() for c in df.columns]
    return df


def check_header(path: Path, what: str, sep: str) -> None:
    """Stop on a column named twice (after trimming spaces): pandas would read the second as
    ``<name>.1`` and every reader would take the first without a word, whichever is right."""
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        header = next(csv.reader(f, delimiter=sep), [])
    seen: dict[str, int] = {}
    for i, name in enumerate(header, start=1):
        first = seen.setdefault(name.strip(), i)
        if first != i:
            raise CellmorphError(
                f"{what} {path} names column {name.strip()!r} twice (columns {first} and {i}); "
                "which one holds the data cannot be guessed: rename or remove one"
            )


def _released(block: pd.DataFrame) -> pd.DataFrame:
    # Arrow's allocator keeps what a block's text columns freed; hand it back before the next
    # block (measured: ~3% less peak memory reading a 1 M-row CSV).
    pa.default_memory_pool().release_unused()
    return block


def _concat(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """The blocks as one table; categorical columns stay categorical (codes, not text: concat
    of blocks whose categories differ would turn every row back into a Python string)."""
    if not parts:
        raise pd.errors.EmptyDataError
    columns = list(parts[0].columns)
    categorical = [
        c for c in columns if any(isinstance(p[c].dtype, pd.CategoricalDtype) for p in parts)
    ]  # a column is categorical if any block made it so (blocks decide alone)
    whole = {c: union_categoricals([p[c].astype("category") for p in parts]) for c in categorical}
    df = pd.concat([p.drop(columns=categorical) for p in parts], ignore_index=True)
    for c in categorical:
        df[c] = whole[c]
    return df[columns]


def require_columns(df: pd.DataFrame, columns: list[str], where: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise CellmorphError(f"{where} lacks required column(s): {', '.join(missing)}")


def quarantine_row(row: pd.Series, reason: str) -> dict[str, Any]:
    return {
        "source": ";".join(dict.fromkeys(_row_paths(row))),
        "plate": row.get(PLATE),
        "well": row.get(WELL),
        "site": row.get(SITE),
        "reason": reason,
    }


def drop_rows(inputs: Inputs, bad: pd.Series, reasons: pd.Series) -> None:
    """Move the rows flagged in ``bad`` to quarantine with their reason."""
    sites = inputs.sites
    if not bad.any():  # no copy of a table of millions of rows for nothing
        return
    for i in sites.index[bad.to_numpy()]:
        inputs.quarantine.append(quarantine_row(sites.loc[i], str(reasons[i])))
    inputs.sites = sites.loc[~bad.to_numpy()].reset_index(drop=True)


def store_metadata(part: pd.DataFrame, record: dict[str, Any], channels: Sequence[str],
                   extra: dict[str, Any] | None = None) -> pd.DataFrame:  # fmt: skip
    """metadata.parquet's rows for one shard: the keys, then ``extra`` (a cell store's
    ObjectNumber and centre), the metadata and sources of each row's site, and each image's
    checksum and chunk crc from the shard's record."""
    sources = [f"source_{ch}" for ch in channels]
    other = [c for c in part.columns if c not in KEYS + sources and not c.startswith("_")]
    paths = dict(zip(sources, site_paths(part, channels)))
    rows = as_text(part[KEYS + other])
    if extra:  # after the keys, so a cell's identity reads left to right
        rows = rows.reset_index(drop=True)
        for i, (name, values) in enumerate(extra.items()):
            rows.insert(len(KEYS) + i, name, values)
    return rows.assign(**paths, **{CHECKSUM: record["checksums"], CHUNK_CRC: record["chunk_crcs"]})
