"""The reader side of the store: open one generation, check what it claims, hand out views.

:func:`open_store` checks the format, the attributes every reader relies on and the metadata's
digest, and returns a :class:`Store` bound to one generation of the folder
(:mod:`cellmorph.store.files`); the pixels are read by :class:`cellmorph.loaders.ShardReader`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.ipc as paipc
import pyarrow.parquet as pq
import zarr

from cellmorph import atomic, remote
from cellmorph.remote import AnyPath
from cellmorph.store.files import Folder, RemoteFolder, open_folder, zarr_store
from cellmorph.store.layout import (
    CHUNK_CRC,
    DIGEST,
    FORMAT_VERSION,
    GENERATION,
    IMAGES,
    METADATA,
    QUARANTINE,
    REQUIRED_COLUMNS,
    StoreError,
    digest_blocks,
    file_blocks,
    read_quarantine,
)

# Projected metadata shared by the processes of one node (memory-mapped Arrow files).
SHARED_CACHE = "cellmorph-metadata"
CACHE_MAX_AGE_S = 7 * 24 * 3600

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Store:
    """A read-only view of a finished store (one generation of its folder).

    ``metadata`` holds every column, or the columns a reader asked :func:`open_store` for;
    :meth:`metadata_rows` streams any columns of chosen rows from the verified file.
    """

    path: AnyPath
    images: zarr.Array
    metadata: pd.DataFrame
    attrs: dict[str, Any]
    quarantine: pd.DataFrame = field(repr=False)
    folder: Folder | None = field(default=None, repr=False, compare=False)
    metadata_file: IO[bytes] | None = field(default=None, repr=False, compare=False)

    @property
    def remote(self) -> bool:
        return isinstance(self.folder, RemoteFolder)

    @property
    def channels(self) -> list[str]:
        return list(self.attrs["channels"])

    @property
    def stats(self) -> dict[str, dict[str, float]]:
        return dict(self.attrs.get("stats", {}))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def chunk_crcs(self) -> np.ndarray:
        """uint32 per row: the crc32c its chunk must end with."""
        return self.metadata[CHUNK_CRC].to_numpy(np.uint32)

    def metadata_columns(self) -> list[str]:
        """Every column of metadata.parquet (also those this view did not load)."""
        if self.metadata_file is None:
            return list(self.metadata.columns)
        return list(pq.ParquetFile(self.metadata_file).schema_arrow.names)

    def metadata_rows(self, columns: Sequence[str] | None = None) -> MetadataRows:
        """A streaming reader of ``columns`` (None: all) for ascending rows (outputs)."""
        return MetadataRows(self, columns)


class MetadataRows:
    """Columns of metadata.parquet for ascending store rows, a row group at a time.

    Outputs that repeat the metadata (predictions, embeddings) take their rows in store order,
    so only one row group is in memory, not the whole table.
    """

    def __init__(self, store: Store, columns: Sequence[str] | None = None):
        self.names = list(columns) if columns is not None else store.metadata_columns()
        file = store.metadata_file
        self.file = pq.ParquetFile(file, pre_buffer=False) if file else None
        if self.file is None:
            self.frame = pa.Table.from_pandas(store.metadata[self.names], preserve_index=False)
            return
        meta = self.file.metadata
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        self.starts = np.cumsum([0, *sizes])  # row group g holds rows starts[g]..starts[g+1]
        self.group, self.table = -1, None

    def take(self, rows: np.ndarray) -> pa.Table:
        """The columns of ``rows`` (ascending) as an Arrow table."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.file is None:
            return self.frame.take(pa.array(rows))
        if len(rows) and (rows[0] < 0 or rows[-1] >= self.starts[-1]):
            raise StoreError(f"store rows {rows[0]}..{rows[-1]} outside 0..{self.starts[-1] - 1}")
        groups = np.searchsorted(self.starts, rows, side="right") - 1
        parts = []
        for g in np.unique(groups):  # usually the group already loaded, or the next one
            if g != self.group:
                self.group, self.table = int(g), self.file.read_row_group(int(g), self.names)
            parts.append(self.table.take(pa.array(rows[groups == g] - self.starts[g])))
        if not parts:
            fields = [self.file.schema_arrow.field(n) for n in self.names]
            return pa.Table.from_pylist([], schema=pa.schema(fields))
        return pa.concat_tables(parts)


def open_store(path: str | AnyPath, columns: Sequence[str] | None = None) -> Store:
    """Open a finished store for reading: format version, attributes, the metadata's digest
    and row count are checked; the returned view stays on this generation of the folder.

    ``columns``: the metadata columns this reader needs besides the ones every reader uses
    (keys, checksums, the negative-control column); absent ones are skipped. Those columns are
    shared by the processes of a node (a memory-mapped Arrow file in the temporary folder),
    so N training workers hold one copy. None loads every column into this process.
    ``path`` may be an object-store URL (``s3://bucket/plates.zarr``).
    """
    folder = open_folder(path)
    p = folder.path
    names = folder.names()
    if "zarr.json" not in names:
        raise StoreError(f"{p}: not a zarr store (no zarr.json)")
    attrs = folder.attrs()
    _check_format(p, attrs)
    images = _open_images(p, attrs)
    _check_attrs(p, attrs, images.shape)
    if METADATA not in names:
        raise StoreError(f"{p}: missing {METADATA}")
    file = folder.open_file(METADATA)
    metadata = _read_metadata(p, file, attrs, tuple(images.shape), columns)
    q = folder.read(QUARANTINE) if QUARANTINE in names else None
    quarantine = read_quarantine(q, f"{p}/{QUARANTINE}")
    return Store(p, images, metadata, attrs, quarantine, folder, file)


def _check_format(p: AnyPath, attrs: dict[str, Any]) -> None:
    version = attrs.get("cellmorph_format")
    if version is None:
        raise StoreError(f"{p}: a zarr group but not a cellmorph store (no attrs.cellmorph_format)")
    if isinstance(version, int) and version < FORMAT_VERSION:
        raise StoreError(
            f"{p}: store format {version} was written by an older cellmorph; this one reads "
            f"format {FORMAT_VERSION} (checksummed chunks): re-run the convert command that "
            "made it, with --overwrite"
        )
    if version != FORMAT_VERSION:
        raise StoreError(
            f"{p}: attrs.cellmorph_format is {version!r}, this cellmorph reads {FORMAT_VERSION}"
        )
    if attrs.get("complete") is False:
        raise StoreError(f"{p}: conversion has not finished (rerun the same convert command)")


def _open_images(p: AnyPath, attrs: dict[str, Any]) -> zarr.Array:
    try:
        group = zarr.open_group(zarr_store(p, read_only=True), mode="r", zarr_format=3)
        images = group[IMAGES] if IMAGES in group else None  # noqa: SIM401 (no Group.get)
    except remote.RemoteError:
        raise
    except Exception as e:  # zarr raises several types for unreadable groups
        raise StoreError(f"{p}: cannot open zarr group ({e})") from None
    if images is None:
        raise StoreError(f"{p}: no '{IMAGES}' array")
    if group.attrs.get(GENERATION) != attrs.get(GENERATION):
        raise StoreError(f"{p} was replaced while being opened (convert --overwrite?); try again")
    return images


def _check_attrs(p: AnyPath, attrs: dict[str, Any], shape: tuple[int, ...]) -> None:
    """The attributes every reader relies on, checked against the array (edited by hand?)."""
    ch = attrs.get("channels")
    if not isinstance(ch, list) or not all(isinstance(c, str) and c.strip() for c in ch):
        raise StoreError(f"{p}: attrs.channels must be a list of channel names, got {ch!r}")
    if len(set(ch)) != len(ch) or len(ch) != shape[1]:
        raise StoreError(
            f"{p}: attrs.channels {ch} does not name the {shape[1]} channels of images "
            "once each (edited by hand?); convert again with --overwrite"
        )
    if len(shape) != 4:
        raise StoreError(f"{p}: images has shape {shape}, expected (N, C, H, W)")


def _read_metadata(p: AnyPath, file: IO[bytes], attrs: dict[str, Any], shape: tuple[int, ...],
                   columns: Sequence[str] | None) -> pd.DataFrame:  # fmt: skip
    if attrs.get(DIGEST) != digest_blocks(file_blocks(file), attrs["channels"], shape):
        raise StoreError(
            f"{p}: {METADATA}, attrs.channels or the images array changed after conversion "
            "(attrs.metadata_digest differs: rows reordered, edited, truncated or replaced); "
            "convert again with --overwrite"
        )
    try:
        file.seek(0)
        if columns is None:
            metadata = pd.read_parquet(file)
        else:
            metadata = _shared_columns(file, attrs, columns)
    except StoreError:
        raise
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise StoreError(f"{p}: cannot read {METADATA} ({e})") from None
    if len(metadata) != shape[0]:
        raise StoreError(f"{p}: {METADATA} has {len(metadata)} rows but images has {shape[0]}")
    missing = [c for c in [*REQUIRED_COLUMNS, CHUNK_CRC] if c not in metadata.columns]
    if missing:
        raise StoreError(f"{p}: {METADATA} lacks required column(s) {', '.join(missing)}")
    return metadata


def _wanted(file: IO[bytes], attrs: dict[str, Any], columns: Sequence[str]) -> list[str]:
    """Every reader's columns, then ``columns``, as far as the file has them (file order)."""
    negcon = str(attrs.get("negcon") or "").partition("=")[0]
    wanted = {*REQUIRED_COLUMNS, CHUNK_CRC, negcon, *columns}
    return [c for c in pq.ParquetFile(file).schema_arrow.names if c in wanted]


def _shared_columns(file: IO[bytes], attrs: dict[str, Any], columns: Sequence[str]) -> pd.DataFrame:
    """The columns as a DataFrame over a memory-mapped Arrow file: the page cache holds them
    once per node however many processes read them. Without a writable temporary folder, an
    in-memory copy."""
    names = _wanted(file, attrs, columns)
    key = hashlib.blake2b(json.dumps([attrs[DIGEST], names]).encode(), digest_size=12)
    cache = Path(tempfile.gettempdir()) / SHARED_CACHE / f"{key.hexdigest()}.arrow"
    file.seek(0)
    if not cache.is_file():
        table = pq.read_table(file, columns=names)
        try:
            _write_cache(cache, table)
        except OSError as e:
            log.warning("metadata stays in this process: cannot write %s (%s)", cache, e)
            return table.to_pandas(split_blocks=True)
    with contextlib.suppress(OSError):
        os.utime(cache)  # in use: kept by the clean-up of stale files
    mapped = paipc.open_file(pa.memory_map(str(cache))).read_all()
    return mapped.to_pandas(split_blocks=True)  # zero-copy: columns stay in the mapped file


def _write_cache(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = table.combine_chunks()  # one chunk per column: pandas can then wrap it, not copy

    def write(tmp: Path) -> None:
        with paipc.new_file(str(tmp), table.schema) as w:
            w.write_table(table)

    atomic.write_with(path, write)
    now = time.time()
    for old in path.parent.glob("*.arrow"):  # caches of stores nobody opened for a week
        with contextlib.suppress(OSError):
            if now - old.stat().st_mtime > CACHE_MAX_AGE_S:
                old.unlink()
