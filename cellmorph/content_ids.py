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

from cellmorph.codes import row_ids
from cellmorph.store.layout import CHECKSUM

__all__ = ["content_ids"]


def content_ids(metadata: pd.DataFrame) -> np.ndarray | None:
    """Equal ids for rows with identical image checksums, numbered by first appearance (as
    ``pd.factorize``); rows without one are unique, numbered after them by row.

    None when there is no checksum column, or when no two rows share a checksum (every cell
    of a cell store): then an image is its row, and no array is kept (4 bytes a row)."""
    if CHECKSUM not in metadata.columns:
        return None
    column = metadata[CHECKSUM]
    text = _as_text(column)
    if text is None:  # not text: the values themselves
        codes, uniques = pd.factorize(column)
        codes = codes.astype(row_ids(len(codes) + len(uniques)))
        blank = codes < 0
        codes[blank] = len(uniques) + np.flatnonzero(blank)
        return codes
    # A 64-bit key per row instead of factorizing 75 M unique strings (~115 bytes a row):
    # equal checksums have equal keys, so only rows whose key is shared are compared exactly.
    # The keys are sorted in place to find the shared ones, then hashed again a chunk at a
    # time for the membership test: one 8-byte array at the peak, not two.
    null = text.is_null().to_numpy(zero_copy_only=False)
    keys = np.empty(len(column), dtype=np.uint64)
    for start, chunk in _chunks(text):
        keys[start : start + len(chunk)] = _text_keys(chunk)
    keys[null] = 0
    keys.sort()
    rest = keys[int(np.count_nonzero(null)) :]  # the nulls' zeros sort first (a real 0 stays)
    shared = np.unique(rest[1:][rest[1:] == rest[:-1]])
    del keys, rest
    if len(shared) == 0:  # no two checksums alike: an image's id would be its row
        return None
    suspect = np.zeros(len(column), dtype=bool)
    for start, chunk in _chunks(text):  # membership a block at a time: no 8-byte index
        for b in range(0, len(chunk), _BLOCK):
            part = _text_keys(chunk.slice(b, _BLOCK))
            at = np.minimum(np.searchsorted(shared, part), max(len(shared) - 1, 0))
            suspect[start + b : start + b + len(part)] = (
                shared[at] == part if len(shared) else False
            )
    suspect &= ~null
    first = ~null  # the first row of each checksum
    rows = np.flatnonzero(suspect)
    if len(rows):
        codes, _ = pd.factorize(column.iloc[rows])  # rows ascending: first appearance
        _, at = np.unique(codes, return_index=True)
        same_as = rows[at[codes]]
        first[rows] = same_as == rows
    # a first row's id: the first rows before it (int32 up to 2**31 rows, 4 bytes a row)
    ids = np.cumsum(first, dtype=row_ids(len(first)))
    ids -= 1
    if len(rows):
        ids[rows] = ids[same_as]
    ids[null] = np.count_nonzero(first) + np.flatnonzero(null)
    return ids


def _chunks(text: pa.ChunkedArray) -> list[tuple[int, pa.Array]]:
    """(first row, chunk) of each chunk of ``text``."""
    starts = np.cumsum([0] + [len(c) for c in text.chunks[:-1]])
    return list(zip(starts.tolist(), text.chunks))


_BLOCK = 1 << 16
_KEY_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd: multiplying by it is a bijection of uint64


def _as_text(column: pd.Series) -> pa.ChunkedArray | None:
    """The column as Arrow strings (the mapped store's own chunks, not a copy: a cast to
    large strings copied the text and its offsets, 24 bytes a checksum), or None when it is not
    all text."""
    try:
        arr = pa.array(column, from_pandas=True)
    except (pa.ArrowException, TypeError, ValueError):
        return None
    arr = arr if isinstance(arr, pa.ChunkedArray) else pa.chunked_array([arr])
    if pa.types.is_dictionary(arr.type):
        arr = pa.chunked_array([c.dictionary_decode() for c in arr.chunks], arr.type.value_type)
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        return None
    return arr


def _text_keys(chunk: pa.StringArray | pa.LargeStringArray) -> np.ndarray:
    """uint64 per string from its first 16 bytes (zero-padded), folded: equal strings, equal
    keys; all 16 characters of a checksum count. Nulls get some key (the caller masks them)."""
    width = np.int64 if pa.types.is_large_string(chunk.type) else np.int32
    offsets = np.frombuffer(chunk.buffers()[1], width)[chunk.offset :][: len(chunk) + 1]
    data = np.frombuffer(chunk.buffers()[2] or b"\0", np.uint8)
    out = np.empty(len(chunk), dtype=np.uint64)
    span = np.arange(16)
    for b in range(0, len(chunk), _BLOCK):
        at = offsets[b : b + _BLOCK + 1].astype(np.int64)
        index = at[:-1, None] + span
        bytes_ = np.where(index < at[1:, None], data[np.minimum(index, len(data) - 1)], 0)
        words = np.ascontiguousarray(bytes_, dtype=np.uint8).view("<u8")
        out[b : b + _BLOCK] = words[:, 0] ^ (words[:, 1] * _KEY_MIX)
    return out
