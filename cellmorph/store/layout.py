"""The store's layout and metadata schema: names every writer and reader agrees on.

A zarr v3 group::

    store.zarr/
      zarr.json            attrs: cellmorph_format, channels, stats, plate_stats, size, codec,
                           source, created, generation, metadata_digest, store_digest
      images/              (N, C, H, W) uint16, one image per inner chunk, S images per shard;
                           each chunk ends with the crc32c of its compressed bytes
      metadata.parquet     one row per image, row i == images[i], with each image's checksum
                           and its chunk's crc32c
      quarantine.csv       every rejected input and why (may be empty, always present)

Integrity (format 4): zarr.json binds ``metadata.parquet`` (``metadata_digest``: its bytes, the
channel names and the array shape), the metadata binds every chunk to its row (``chunk_crc32c``)
and every chunk carries its own crc32c. ``store_digest``, written by every writer call after the
attributes it changes, binds the store's own description: each field of ``images/zarr.json``
(dtype, shape, chunking, codecs) and each other attribute (channels, statistics, the metadata
digest...), so an edit of either names the field it changed. This module holds only names and the pure functions
over them (checksums, digests, well ids); it imports neither zarr nor pyarrow.

Each image's checksum is xxh3-64 of its pixels (format 4; blake2b-64 in format 3): a content
key for :mod:`cellmorph.content_ids` and the end-to-end check of ``inspect --verify``, which
needs no cryptographic hash. blake2b took ~0.15 ms a 96 px crop of 5 channels, a tenth of a
cell store's whole conversion; xxh3 takes ~0.007 ms (docs/benchmarks.md, "Cell stores").
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import xxhash

from cellmorph.errors import CellmorphError

# What zarr raises for a group or array whose zarr.json it cannot use (bad JSON, a node of
# another kind, a missing node, malformed metadata: zarr's own errors subclass ValueError,
# malformed fields raise TypeError/KeyError). Anything else is a bug and keeps its traceback.
ZARR_ERRORS = (ValueError, TypeError, KeyError, OSError)

if TYPE_CHECKING:
    import pandas as pd

# 2: a crc32c after every chunk, every chunk written, metadata bound by a digest in the attrs.
# 3: attrs.store_digest binds images/zarr.json and every other attribute.
# 4: the image checksum is xxh3-64 (was blake2b-64): ~20x faster to write and to verify.
FORMAT_VERSION = 4
IMAGES = "images"
METADATA = "metadata.parquet"
QUARANTINE = "quarantine.csv"
QUARANTINE_COLUMNS = ["source", "plate", "well", "site", "reason"]

# The metadata schema. Label columns are free-form (Metadata_pert_iname, ...).
PLATE = "Metadata_Plate"
WELL = "Metadata_Well"
SITE = "Metadata_Site"
KEYS = [PLATE, WELL, SITE]  # one image per (plate, well, site)
CHECKSUM = "checksum"  # of the stored uint16 bytes of each image (image_checksum)
CHUNK_CRC = "chunk_crc32c"  # the crc32c ending each image's chunk in its shard file
REQUIRED_COLUMNS = [*KEYS, CHECKSUM]
STORE_ROW = "store_row"  # the row number of an image in outputs (predictions, embeddings)
GENERATION = "generation"  # attrs: a new id each time a store is created
DIGEST = "metadata_digest"  # attrs: binds metadata.parquet to the channels and the array
STORE_DIGEST = "store_digest"  # attrs: binds images/zarr.json and every other attribute
ARRAY_META = f"{IMAGES}/zarr.json"  # the images array's zarr metadata, as the store holds it
# Rows per parquet row group of metadata.parquet: readers stream it a row group at a time.
METADATA_ROW_GROUP = 65_536


class StoreError(CellmorphError):
    """A store that cannot be read as a cellmorph store; the message names the path or key."""


def image_checksum(img: np.ndarray) -> str:
    """Checksum of the stored uint16 bytes of one image (little-endian, C order)."""
    data = np.ascontiguousarray(img, dtype="<u2")
    return xxhash.xxh3_64_hexdigest(data)  # hashed in place, not copied


def metadata_digest(data: bytes, channels: list[str], shape: tuple[int, ...]) -> str:
    """Binds metadata.parquet's bytes (row order and content) to the channels and the array."""
    return digest_blocks([data], channels, shape)


def digest_blocks(blocks: Iterable[bytes], channels: list[str], shape: tuple[int, ...]) -> str:
    """:func:`metadata_digest` of a file read in blocks."""
    h = hashlib.blake2b(digest_size=16)
    for block in blocks:
        h.update(block)
    h.update(json.dumps({"channels": list(channels), "shape": list(shape)}).encode())
    return h.hexdigest()


def _field_digest(value: object) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def store_digest(array_meta: dict, attrs: dict) -> dict[str, dict[str, str]]:
    """One digest per field of ``images/zarr.json`` and per attribute (but this one), so a
    reader can say which changed. Over parsed JSON: the file's formatting does not count."""
    fields = {k: v for k, v in attrs.items() if k != STORE_DIGEST}
    return {
        ARRAY_META: {k: _field_digest(v) for k, v in array_meta.items()},
        "zarr.json": {k: _field_digest(v) for k, v in fields.items()},
    }


def digest_changes(recorded: object, array_meta: dict, attrs: dict) -> list[str]:
    """What differs from ``recorded`` (``attrs.store_digest``): ``images/zarr.json data_type``,
    ``attrs.stats``...; [] when nothing does."""
    if not isinstance(recorded, dict):
        return [f"attrs.{STORE_DIGEST} (absent or not a mapping)"]
    now = store_digest(array_meta, attrs)
    changes = []
    for part, prefix in ((ARRAY_META, f"{ARRAY_META} "), ("zarr.json", "attrs.")):
        then = recorded.get(part) if isinstance(recorded.get(part), dict) else {}
        changes += [f"{prefix}{k}" for k in sorted({*then, *now[part]})
                    if then.get(k) != now[part].get(k)]  # fmt: skip
    return changes


def file_blocks(f: io.IOBase, size: int = 8 << 20) -> Iterable[bytes]:
    f.seek(0)
    while block := f.read(size):
        yield block


def well_ids(metadata: pd.DataFrame) -> np.ndarray:
    """One string per image naming its well: ``plate/well``."""
    missing = [c for c in (PLATE, WELL) if c not in metadata.columns]
    if missing:
        raise StoreError(f"metadata lacks column(s) {missing} that name an image's well")
    plate = metadata[PLATE].astype(str).to_numpy().astype(str)
    well = metadata[WELL].astype(str).to_numpy().astype(str)
    return np.char.add(np.char.add(plate, "/"), well)


def well_codes(metadata: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The one well id of every image: ``(codes, names)``; ``codes`` (int32 per row, int64
    past 2**31 plate-well pairs) index
    ``names`` (``plate/well``), ordered by plate, then well, so ids never depend on row order.

    The index (splits), evaluation, prediction and profiling all use these ids."""
    import pandas as pd

    parts = []
    for column in (PLATE, WELL):
        if column not in metadata.columns:
            raise StoreError(f"metadata: required column {column!r} is missing")
        codes, uniques = pd.factorize(metadata[column], sort=True)
        if (codes < 0).any():
            raise StoreError(f"metadata: {int((codes < 0).sum())} row(s) have no {column}")
        parts.append((codes, np.asarray([str(u) for u in uniques], object)))
    (plate, plates), (well, wells) = parts
    return well_codes_from(plate, plates, well, wells)


def well_codes_from(
    plate: np.ndarray, plates: np.ndarray, well: np.ndarray, wells: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`well_codes` from each row's sorted plate and well codes (``pd.factorize(...,
    sort=True)``) and their names: the ids are the used (plate, well) pairs in sorted order."""
    n = len(plates) * len(wells)
    # int32 where every pair fits: 4 bytes a row, not 8 (75 M rows at the pilot).
    wide = np.int32 if n <= np.iinfo(np.int32).max else np.int64
    key = plate.astype(wide)
    key *= len(wells)
    key += well
    # The used pairs by a count over all pairs: pd.factorize would size a hash table by the
    # rows (~2 GB at 75 M), np.unique would sort them. Pairs beyond the rows (a well name per
    # row, never seen in a store) fall back to the sort.
    if n <= max(len(key), 1 << 20):
        seen = np.zeros(n, dtype=bool)  # a block at a time: bincount casts keys to int64
        for b in range(0, len(key), 1 << 20):
            seen[key[b : b + (1 << 20)]] = True
        used = np.flatnonzero(seen)
        ids = np.full(n, -1, dtype=wide)
        ids[used] = np.arange(len(used))
        codes = ids[key]
    else:
        used, codes = np.unique(key, return_inverse=True)
        codes = codes.astype(wide, copy=False)
    names = np.char.add(np.char.add(plates[used // len(wells)].astype(str), "/"),
                        wells[used % len(wells)].astype(str))  # fmt: skip
    return codes, names.astype(object)


def parse_negcon(spec: str | None) -> tuple[str, str] | None:
    """``"COLUMN=VALUE"`` (``convert.negcon``, recorded in the store's attrs) -> (column,
    value); ``""`` or None -> None: the store names no negative controls."""
    if not spec:
        return None
    column, sep, value = spec.partition("=")
    if not sep or not column.strip():
        raise CellmorphError(f"convert.negcon {spec!r} is not of the form COLUMN=VALUE")
    return column.strip(), value.strip()


def read_quarantine(data: bytes | None, where: str = QUARANTINE) -> pd.DataFrame:
    """quarantine.csv as text: a plate named ``NA`` or a reason ``None`` stay what they are."""
    import pandas as pd

    if not data:
        return pd.DataFrame(columns=QUARANTINE_COLUMNS)
    try:
        return pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, na_values=[])
    except (ValueError, UnicodeDecodeError) as e:  # pandas' ParserError is a ValueError
        raise StoreError(f"{where} is not a readable CSV ({e})") from None
