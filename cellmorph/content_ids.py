"""Content ids: one id per distinct image, from the store's per-image checksums.

Rows whose images are identical (equal checksums: copies of one file, or an oversampled copy
written twice) get one id, so that the index can count a validation image that also sits in
training. At 75 M cells factorizing the checksum strings alone took ~115 bytes a row; a 64-bit
key per row does the work, with exact comparison only where keys collide.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from cellmorph.store.layout import CHECKSUM

__all__ = ["content_ids"]


def content_ids(metadata: pd.DataFrame) -> np.ndarray | None:
    """Equal ids for rows with identical image checksums, numbered by first appearance (as
    ``pd.factorize``); rows without one are unique, numbered after them by row."""
    if CHECKSUM not in metadata.columns:
        return None
    column = metadata[CHECKSUM]
    text = _as_text(column)
    if text is None:  # not text: the values themselves
        codes, uniques = pd.factorize(column)
        codes = codes.astype(np.int64)
        blank = codes < 0
        codes[blank] = len(uniques) + np.flatnonzero(blank)
        return codes
    # A 64-bit key per row instead of factorizing 75 M unique strings (~115 bytes a row):
    # equal checksums have equal keys, so only rows whose key is shared are compared exactly.
    null = text.is_null().to_numpy(zero_copy_only=False)
    keys = np.empty(len(column), dtype=np.uint64)
    start = 0
    for chunk in text.chunks:
        keys[start : start + len(chunk)] = _text_keys(chunk)
        start += len(chunk)
    keys[null] = 0
    sorted_keys = np.sort(keys[~null] if null.any() else keys)
    shared = np.unique(sorted_keys[1:][sorted_keys[1:] == sorted_keys[:-1]])
    del sorted_keys
    suspect = np.zeros(len(keys), dtype=bool)
    for b in range(0, len(keys), _BLOCK):  # membership a block at a time: no 8-byte index
        part = keys[b : b + _BLOCK]
        at = np.minimum(np.searchsorted(shared, part), max(len(shared) - 1, 0))
        suspect[b : b + _BLOCK] = shared[at] == part if len(shared) else False
    del keys
    suspect &= ~null
    first = ~null  # the first row of each checksum
    rows = np.flatnonzero(suspect)
    if len(rows):
        codes, _ = pd.factorize(column.iloc[rows])  # rows ascending: first appearance
        _, at = np.unique(codes, return_index=True)
        same_as = rows[at[codes]]
        first[rows] = same_as == rows
    ids = np.cumsum(first) - 1  # a first row's id: the first rows before it
    if len(rows):
        ids[rows] = ids[same_as]
    ids[null] = np.count_nonzero(first) + np.flatnonzero(null)
    return ids


_BLOCK = 1 << 16
_KEY_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd: multiplying by it is a bijection of uint64


def _as_text(column: pd.Series) -> pa.ChunkedArray | None:
    """The column as Arrow large strings (the mapped store's own chunks, not a copy), or None
    when it is not all text."""
    try:
        arr = pa.array(column, from_pandas=True)
    except (pa.ArrowException, TypeError, ValueError):
        return None
    arr = arr if isinstance(arr, pa.ChunkedArray) else pa.chunked_array([arr])
    if pa.types.is_dictionary(arr.type):
        arr = pa.chunked_array([c.dictionary_decode() for c in arr.chunks], arr.type.value_type)
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        return None
    return arr.cast(pa.large_string())


def _text_keys(chunk: pa.LargeStringArray) -> np.ndarray:
    """uint64 per string from its first 16 bytes (zero-padded), folded: equal strings, equal
    keys; all 16 characters of a checksum count. Nulls get some key (the caller masks them)."""
    offsets = np.frombuffer(chunk.buffers()[1], np.int64)[chunk.offset :][: len(chunk) + 1]
    data = np.frombuffer(chunk.buffers()[2] or b"\0", np.uint8)
    out = np.empty(len(chunk), dtype=np.uint64)
    span = np.arange(16)
    for b in range(0, len(chunk), _BLOCK):
        at = offsets[b : b + _BLOCK + 1]
        index = at[:-1, None] + span
        bytes_ = np.where(index < at[1:, None], data[np.minimum(index, len(data) - 1)], 0)
        words = np.ascontiguousarray(bytes_, dtype=np.uint8).view("<u8")
        out[b : b + _BLOCK] = words[:, 0] ^ (words[:, 1] * _KEY_MIX)
    return out
