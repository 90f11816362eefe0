"""The reader side of the store: open one generation, check what it claims, hand out views.

:func:`open_store` checks the format, the store's description against ``attrs.store_digest``
(``images/zarr.json`` and every attribute), the metadata's digest, and returns a :class:`Store` bound to one generation of the folder
(:mod:`cellmorph.store.files`); the pixels are read by :class:`cellmorph.loaders.ShardReader`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from cellmorph import remote
from cellmorph.store.files import Folder, RemoteFolder, open_folder, zarr_store
from cellmorph.store.layout import (
    ARRAY_META,
    CHUNK_CRC,
    DIGEST,
    FORMAT_VERSION,
    GENERATION,
    IMAGES,
    METADATA,
    QUARANTINE,
    REQUIRED_COLUMNS,
    STORE_DIGEST,
    ZARR_ERRORS,
    StoreError,
    digest_blocks,
    digest_changes,
    file_blocks,
    read_quarantine,
)
from cellmorph.store.shared import shared_columns
from cellmorph.urlpath import AnyPath


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
    def unit(self) -> str:
        """``"cell"``: rows are single-cell crops (a cell store); ``"field"``: whole fields."""
        return "cell" if self.attrs.get("unit") == "cell" else "field"

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
    shared by the processes of a node (a memory-mapped Arrow file in the user's private
    temporary folder, checked against its checksum: :mod:`cellmorph.store.shared`), so N
    training workers hold one copy. None loads every column into this process.
    ``path`` may be an object-store URL (``s3://bucket/plates.zarr``).
    """
    folder = open_folder(path)
    p = folder.path
    names = folder.names()
    if "zarr.json" not in names:
        raise StoreError(f"{p}: not a zarr store (no zarr.json)")
    attrs = folder.attrs()
    _check_format(p, attrs)
    array_meta = _array_meta(folder)
    images = _open_images(p, attrs, array_meta)
    _check_attrs(p, attrs, images)  # first: their messages say more than "changed"
    _check_description(p, attrs, array_meta)
    if METADATA not in names:
        raise StoreError(f"{p}: missing {METADATA}")
    file = folder.open_file(METADATA)
    metadata = _read_metadata(p, file, attrs, tuple(images.shape), columns)
    q = folder.read(QUARANTINE) if QUARANTINE in names else None
    quarantine = read_quarantine(q, f"{p}/{QUARANTINE}")
    return Store(p, images, metadata, attrs, quarantine, folder, file)


def recorded_attrs(path: str | AnyPath) -> dict[str, Any]:
    """The store's attributes (``zarr.json``), format checked: what a config's defaults are
    resolved from (the label column, the image size); :func:`open_store` checks the rest."""
    folder = open_folder(path)
    try:
        if "zarr.json" not in folder.names():
            raise StoreError(f"{folder.path}: not a zarr store (no zarr.json)")
        attrs = folder.attrs()
        _check_format(folder.path, attrs)
    finally:
        folder.close()
    return attrs


def _check_format(p: AnyPath, attrs: dict[str, Any]) -> None:
    version = attrs.get("cellmorph_format")
    if version is None:
        raise StoreError(f"{p}: a zarr group but not a cellmorph store (no attrs.cellmorph_format)")
    if isinstance(version, int) and version < FORMAT_VERSION:
        raise StoreError(
            f"{p}: store format {version} was written by an older cellmorph; this one reads "
            f"format {FORMAT_VERSION} (checksummed chunks and description, xxh3 image "
            "checksums): re-run the convert command that made it, with --overwrite"
        )
    if version != FORMAT_VERSION:
        raise StoreError(
            f"{p}: attrs.cellmorph_format is {version!r}, this cellmorph reads {FORMAT_VERSION}"
        )
    if attrs.get("complete") is False:
        raise StoreError(f"{p}: conversion has not finished (rerun the same convert command)")


def _array_meta(folder: Folder) -> dict[str, Any]:
    """``images/zarr.json`` as stored (what :func:`_check_description` checks)."""
    try:
        array_meta = json.loads(folder.read(ARRAY_META))
    except ValueError:
        array_meta = None
    if not isinstance(array_meta, dict):
        raise StoreError(f"{folder.path}/{ARRAY_META} is not zarr array metadata (damaged store)")
    return array_meta


def _check_description(p: AnyPath, attrs: dict[str, Any], array_meta: dict[str, Any]) -> None:
    """``images/zarr.json`` and every attribute against ``attrs.store_digest``."""
    changes = digest_changes(attrs.get(STORE_DIGEST), array_meta, attrs)
    if changes:
        raise StoreError(
            f"{p}: {', '.join(changes)} changed after conversion (attrs.{STORE_DIGEST} records "
            "otherwise: edited by hand?); convert again with --overwrite"
        )


def _open_images(p: AnyPath, attrs: dict[str, Any], array_meta: dict[str, Any]) -> zarr.Array:
    try:
        group = zarr.open_group(zarr_store(p, read_only=True), mode="r", zarr_format=3)
        images = group[IMAGES] if IMAGES in group else None  # noqa: SIM401 (no Group.get)
    except remote.RemoteError:
        raise
    except ZARR_ERRORS as e:
        raise StoreError(f"{p}: cannot open zarr group ({e})") from None
    if images is None:
        raise StoreError(f"{p}: no '{IMAGES}' array")
    if group.attrs.get(GENERATION) != attrs.get(GENERATION) or not _same_array(images, array_meta):
        raise StoreError(f"{p} was replaced while being opened (convert --overwrite?); try again")
    return images


def _same_array(images: zarr.Array, array_meta: dict[str, Any]) -> bool:
    """Whether zarr opened the array whose metadata was checked (not another generation's)."""
    from zarr.core.metadata.v3 import ArrayV3Metadata

    try:
        return bool(ArrayV3Metadata.from_dict(array_meta).to_dict() == images.metadata.to_dict())
    except ZARR_ERRORS:  # metadata zarr cannot parse is not the array it opened
        return False


def _check_attrs(p: AnyPath, attrs: dict[str, Any], images: zarr.Array) -> None:
    """The attributes every reader relies on, checked against the array (edited by hand?)."""
    shape = tuple(images.shape)
    if images.dtype != np.uint16:
        raise StoreError(f"{p}/{ARRAY_META}: data_type is {images.dtype}, a store holds uint16")
    if len(shape) != 4:
        raise StoreError(f"{p}: images has shape {shape}, expected (N, C, H, W)")
    ch = attrs.get("channels")
    if not isinstance(ch, list) or not all(isinstance(c, str) and c.strip() for c in ch):
        raise StoreError(f"{p}: attrs.channels must be a list of channel names, got {ch!r}")
    if len(set(ch)) != len(ch) or len(ch) != shape[1]:
        raise StoreError(
            f"{p}: attrs.channels {ch} does not name the {shape[1]} channels of images "
            "once each (edited by hand?); convert again with --overwrite"
        )


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
            metadata = shared_columns(file, attrs, columns)
    except StoreError:
        raise
    except (pa.ArrowException, OSError, ValueError) as e:  # an unreadable or damaged file
        raise StoreError(f"{p}: cannot read {METADATA} ({e})") from None
    if len(metadata) != shape[0]:
        raise StoreError(f"{p}: {METADATA} has {len(metadata)} rows but images has {shape[0]}")
    missing = [c for c in [*REQUIRED_COLUMNS, CHUNK_CRC] if c not in metadata.columns]
    if missing:
        raise StoreError(f"{p}: {METADATA} lacks required column(s) {', '.join(missing)}")
    return metadata
