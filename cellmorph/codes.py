"""Compact integer codes for per-row columns of a large store (75 M cells).

``pd.factorize`` returns int64 codes for the whole column at once: 8 bytes a row (600 MB at
75 M cells) for a column with a few hundred distinct values. These helpers factorize a block of
rows at a time into the narrowest integer type that holds the codes, with the same numbering.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

__all__ = ["bincount", "factorize", "narrowest_signed", "repeat", "row_ids", "where"]

BLOCK = 1 << 20  # rows per block: the int64 temporaries stay at 8 MB


def narrowest_signed(n: int) -> type[np.signedinteger]:
    """The smallest signed integer type holding ``-1 .. n - 1``."""
    for t in (np.int8, np.int16, np.int32):
        if n <= np.iinfo(t).max:
            return t
    return np.int64


def row_ids(n: int) -> type[np.signedinteger]:
    """Row numbers of a table of ``n`` rows: int32 up to 2**31 rows."""
    return np.int32 if n <= np.iinfo(np.int32).max else np.int64


def factorize(values: pd.Series, *, sort: bool) -> tuple[np.ndarray, list[Any]]:
    """``pd.factorize(values, sort=sort)`` with codes in the narrowest signed type (-1 = missing).

    Unsorted codes number the values by first appearance, sorted codes by pandas' own order
    of the values, exactly as ``pd.factorize`` does.
    """
    n = len(values)
    codes = np.empty(n, dtype=np.int32 if n <= np.iinfo(np.int32).max else np.int64)
    lookup: dict[Any, int] = {}
    for b in range(0, n, BLOCK):
        block_codes, block_uniques = pd.factorize(values.iloc[b : b + BLOCK], sort=False)
        remap = np.empty(len(block_uniques) + 1, dtype=codes.dtype)  # last slot: missing
        remap[-1] = -1
        for i, value in enumerate(block_uniques):
            remap[i] = lookup.setdefault(value, len(lookup))
        codes[b : b + BLOCK] = remap[block_codes]
    uniques = list(lookup)
    if sort and uniques:
        # pandas sorts the distinct values (mixed types included) as pd.factorize would.
        rank, uniques_sorted = pd.factorize(pd.Index(uniques, dtype=values.dtype), sort=True)
        lut = np.append(rank, -1).astype(codes.dtype)
        for b in range(0, n, BLOCK):
            codes[b : b + BLOCK] = lut[codes[b : b + BLOCK]]
        uniques = list(uniques_sorted)
    narrow = narrowest_signed(len(uniques))
    return (codes.astype(narrow) if codes.dtype != narrow else codes), uniques


def where(mask: np.ndarray, *masks: np.ndarray) -> np.ndarray:
    """``np.flatnonzero(mask & masks[0] & ...)`` as int32 row numbers (int64 past 2**31), a
    block at a time: never the whole int64 result (8 bytes a row) nor the combined mask."""

    def block(b: int) -> np.ndarray:
        m = mask[b : b + BLOCK]
        for other in masks:
            m = m & other[b : b + BLOCK]
        return m

    starts = range(0, len(mask), BLOCK)
    sizes = [int(np.count_nonzero(block(b))) for b in starts]
    out = np.empty(sum(sizes), dtype=row_ids(len(mask)))
    at = 0
    for b, size in zip(starts, sizes):
        out[at : at + size] = np.flatnonzero(block(b)) + b
        at += size
    return out


def bincount(values: np.ndarray, minlength: int = 0) -> np.ndarray:
    """``np.bincount(values, minlength=minlength)`` a block at a time: numpy casts its whole
    input to int64 first (8 bytes a row, 600 MB at 75 M rows of int8 labels)."""
    out = np.zeros(minlength, dtype=np.int64)
    for b in range(0, len(values), BLOCK):
        part = np.bincount(values[b : b + BLOCK], minlength=len(out))
        if len(part) > len(out):
            part[: len(out)] += out
            out = part
        else:
            out += part
    return out


def repeat(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``np.repeat(values, counts)`` a block at a time: numpy casts ``counts`` to int64 first
    (8 bytes a row: 360 MB for the pilot's training fold of one-byte counts)."""
    if len(counts) != len(values):
        raise ValueError(f"{len(counts)} counts for {len(values)} values")
    out = np.empty(int(np.sum(counts, dtype=np.int64)), dtype=values.dtype)
    at = 0
    for b in range(0, len(values), BLOCK):
        part = np.repeat(values[b : b + BLOCK], counts[b : b + BLOCK])
        out[at : at + len(part)] = part
        at += len(part)
    return out
