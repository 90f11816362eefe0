"""The writer side of the store: create the array, write shards, bind metadata and attrs.

Conversion (:mod:`conversion.pack`) is the only writer of real stores; tests and benchmarks
write small ones through the same calls. Readers never import this module.
"""

from __future__ import annotations

import json
import mmap
import os
import uuid
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from cellmorph import remote
from cellmorph.remote import is_url
from cellmorph.shardfile import StoreDamage, chunk_crcs, encode_shard_parts, layout_of, shard_key
from cellmorph.store import layout as L
from cellmorph.store.files import local, read_file, write_bytes, write_file, zarr_store
from cellmorph.store.layout import StoreError
from cellmorph.urlpath import AnyPath

# Rows per parquet row group of metadata.parquet (a module setting so tests can shrink it).
METADATA_ROW_GROUP = L.METADATA_ROW_GROUP


# Blosc zstd's level (bit-shuffled) for each kind of store, decided here only and recorded in
# attrs.codec_level. A cell store's crops (5 x 96 x 96 of the real JUMP site) compress at level
# 1 to 0.6% more bytes than at level 3 in ~0.4x the CPU time, which a cell store's conversion
# spends per crop while a field store's is dominated by its resize (docs/benchmarks.md).
ZSTD_LEVELS = {"field": 3, "cell": 1}


def zstd_level(unit: str) -> int:
    """Blosc zstd's level for a store of ``unit`` ("cell": one crop per nucleus, else field)."""
    return ZSTD_LEVELS["cell" if unit == "cell" else "field"]


CODECS = ("zstd", "lz4", "blosc-lz4")


def store_codec(codec: str, unit: str) -> str:
    """The codec a store of ``unit`` is written with: ``auto`` is Blosc zstd for a field store
    and Blosc LZ4 for a cell store (its conversion compresses every crop: LZ4 keeps it at the
    TIFF decode's pace for 6.6% more bytes, and decodes 2.2x faster; docs/benchmarks.md)."""
    if codec == "auto":
        return "blosc-lz4" if unit == "cell" else "zstd"
    if codec not in CODECS:
        raise StoreError(f"unknown codec {codec!r} (expected auto, {', '.join(CODECS)})")
    return codec


def compressor_for(codec: str, unit: str = "field") -> Any:
    """zstd (Blosc, bit-shuffled: CPU decode, best ratio; its level per kind of store,
    :func:`zstd_level`), blosc-lz4 (Blosc LZ4, bit-shuffled: CPU decode, fastest) or lz4 (plain
    LZ4, decodable on the GPU by DALI's inflate)."""
    codec = store_codec(codec, unit)
    if codec == "zstd":
        return BloscCodec(cname="zstd", clevel=zstd_level(unit), shuffle="bitshuffle")
    if codec == "blosc-lz4":
        return BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")
    from zarr.codecs.numcodecs import LZ4

    return LZ4(acceleration=1)


def create_images(
    path: str | AnyPath,
    n: int,
    channels: list[str],
    size: int,
    codec: str = "zstd",
    shard_size: int = 1024,
    attrs: dict[str, Any] | None = None,
) -> zarr.Array:
    """Create (overwrite) the group and its empty ``images`` array; returns the array, ready
    for shard-aligned writes (every chunk is written, see :func:`open_images`).

    ``attrs`` (source description, resize policy...) is stored next to the format fields;
    its ``unit`` ("cell" for a cell store) sets zstd's level (:func:`zstd_level`, recorded as
    ``codec_level``). Channel statistics are added later with :func:`write_attrs` once the
    pixels are known.
    """
    if n <= 0:
        raise StoreError(f"{path}: cannot create a store with {n} images")
    unit = str((attrs or {}).get("unit", "field"))
    level = {"codec_level": zstd_level(unit)} if codec == "zstd" else {}
    group = zarr.open_group(zarr_store(path), mode="w", zarr_format=3)
    shard = max(1, min(shard_size, n))
    arr = group.create_array(
        L.IMAGES,
        shape=(n, len(channels), size, size),
        chunks=(1, len(channels), size, size),
        shards=(shard, len(channels), size, size),
        dtype="uint16",
        # The crc32c after the compressor: every chunk checks itself (zarr and our readers).
        compressors=[compressor_for(codec, unit), Crc32cCodec()],
        fill_value=0,
    )
    write_attrs(path, {
        "cellmorph_format": L.FORMAT_VERSION, "channels": list(channels), "size": size,
        "codec": codec, **level, "shard_size": shard, L.GENERATION: uuid.uuid4().hex,
        **(attrs or {}),
    })  # fmt: skip
    return arr.with_config({"write_empty_chunks": True})


def open_images(path: str | AnyPath) -> zarr.Array:
    """The ``images`` array of a store being written. Every chunk is written, an all-zero
    image too: a hole in a shard is then always damage, never a black image."""
    arr = zarr.open_array(store=zarr_store(path), path=L.IMAGES, mode="r+", zarr_format=3)
    return arr.with_config({"write_empty_chunks": True})


def discard_shard(path: str | AnyPath, images: zarr.Array, index: int) -> None:
    """Delete shard file ``index`` of ``images`` before it is rewritten whole.

    A writer killed mid-write can leave a torn shard file; zarr reads an existing shard before
    writing into it, so the rewrite would fail on the torn one instead of replacing it. (An
    object-store put is never torn, but an earlier job's shard may hold other rows.)
    """
    if is_url(path):
        target = f"{str(path).rstrip('/')}/{shard_key(images, index)}"
        if remote.size(target) is not None:
            remote.delete(target)
        return
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(path))
    target = f"{root.rstrip('/')}/{shard_key(images, index)}"
    if fs.exists(target):
        fs.rm(target)
    # A killed writer leaves its temporary file behind: zarr's "<key>.<uuid>.partial", or
    # :func:`write_shard_file`'s ".<name>.<pid>.<random>.tmp" (cellmorph.atomic's naming).
    folder, _, name = target.rpartition("/")
    for stale in [*fs.glob(f"{target}.*.partial"), *fs.glob(f"{folder}/.{name}.*.tmp")]:
        fs.rm(stale)


def write_shard_file(path: str | AnyPath, images: zarr.Array, index: int,
                     block: np.ndarray) -> list[bytes] | None:  # fmt: skip
    """Write ``block`` as shard file ``index`` of ``images``, whole (a temporary file renamed
    into place, or one put), and return the bytes written, as the pieces of the file in order.

    The bytes are :func:`cellmorph.shardfile.encode_shard`'s: the file zarr-python writes for
    the same rows, without its per-chunk codec pipeline (as costly as compressing, for small
    images). A layout it cannot encode is written through zarr instead (returns None).
    """
    layout = layout_of(images)
    if layout is None or layout.encoder is None or not layout.chunk_crc:
        start = index * int(images.shards[0])
        images[start : start + len(block)] = block
        return None
    parts = encode_shard_parts(block, layout)
    key = shard_key(images, index)
    if is_url(path):
        write_bytes(path, key, b"".join(parts))  # one put
    else:
        write_file(path, key, lambda tmp: _writev_file(tmp, parts))
    return parts


# At most this many pieces per writev call (Linux's IOV_MAX).
_IOV_MAX = 1024


def _writev_file(target: Path, parts: Sequence[bytes]) -> None:
    """Write ``parts`` one after another into a new file, a writev at a time (no joined copy)."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        pending = [memoryview(p) for p in parts if len(p)]
        while pending:
            done = os.writev(fd, pending[:_IOV_MAX])
            while done:  # drop what was written; a short write resumes mid-piece
                if done >= len(pending[0]):
                    done -= len(pending.pop(0))
                else:
                    pending[0], done = pending[0][done:], 0
    finally:
        os.close(fd)


def _same_bytes(data: Any, parts: Sequence[bytes]) -> bool:
    """Whether ``data`` (any buffer) holds exactly ``parts`` one after another."""
    view = np.frombuffer(data, dtype=np.uint8) if len(data) else np.empty(0, np.uint8)
    if len(view) != sum(len(p) for p in parts):
        return False
    offset = 0
    for p in parts:
        end = offset + len(p)
        if len(p) <= 64:  # a chunk's crc32c: a slice of 4 bytes costs less than two arrays
            if data[offset:end] != p:
                return False
        elif not np.array_equal(view[offset:end], np.frombuffer(p, np.uint8)):
            return False
        offset = end
    return True


def _read_back(path: str | AnyPath, key: str) -> Any:
    """Shard file ``key`` as written: the local file mapped (not copied; unmapped when the
    last reference goes), or the object's bytes; None when absent."""
    if is_url(path):
        return read_file(path, key)
    try:
        with open(local(path) / key, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return b""
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        return None


def shard_chunk_crcs(path: str | AnyPath, images: zarr.Array, index: int, rows: int,
                     written: Sequence[bytes] | None = None) -> list[int]:  # fmt: skip
    """Read shard file ``index`` back and return the crc32c of its first ``rows`` chunks, each
    checked: what the writer records for metadata.parquet right after writing the shard.
    ``written``: the pieces :func:`write_shard_file` just wrote, which the file must hold
    exactly (their crcs are then the encoder's own, read, not recomputed)."""
    layout = layout_of(images)
    if layout is None or not layout.chunk_crc:
        raise StoreError(f"{path}: images array is not in cellmorph format {L.FORMAT_VERSION}")
    key = shard_key(images, index)
    data = _read_back(path, key)
    if data is None:
        raise StoreDamage(f"{path}/{key}: the shard just written is missing")
    if written is not None and not _same_bytes(data, written):
        raise StoreDamage(f"{path}/{key}: the shard read back is not the one just written "
                          f"({len(data)} bytes, {sum(map(len, written))} written)")  # fmt: skip
    return chunk_crcs(data, layout, rows, f"{path}/{key}", verify=written is None)


def write_attrs(path: str | AnyPath, attrs: dict[str, Any]) -> None:
    """Add or replace attributes, and ``store_digest`` over the result in the same write:
    every writer call leaves the store's description bound (readers refuse any other edit)."""
    group = zarr.open_group(zarr_store(path), mode="r+", zarr_format=3)
    merged = _as_read({**_stored(path, "zarr.json").get("attributes", {}), **attrs})
    array_meta = _stored(path, L.ARRAY_META)
    group.attrs.update({**attrs, L.STORE_DIGEST: L.store_digest(array_meta, merged)})
    written = _stored(path, "zarr.json").get("attributes", {})
    if L.digest_changes(written.get(L.STORE_DIGEST), array_meta, written):  # JSON differs
        group.attrs.update({L.STORE_DIGEST: L.store_digest(array_meta, written)})


def _stored(path: str | AnyPath, name: str) -> dict[str, Any]:
    """A JSON file of the store as a reader parses it ({} when absent)."""
    data = read_file(path, name)
    return dict(json.loads(data)) if data else {}


def _as_read(value: Any) -> Any:
    """``value`` as a reader parses it back (numpy scalars and tuples become JSON's types)."""
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist")
                                 else str(v)))  # fmt: skip


def write_metadata(path: str | AnyPath, metadata: pd.DataFrame | Iterable[pd.DataFrame]) -> None:
    """Write ``metadata.parquet`` atomically (row i describes images[i]) and bind it to the
    store with ``attrs.metadata_digest``; call it once the images are written.

    ``metadata`` is one table, or consecutive parts of it (conversion streams one per shard, so
    that millions of rows are never one table in memory). Without a ``chunk_crc32c`` column
    (stores written outside conversion: one table), the crcs are read from the shard files as
    they are now; conversion passes the ones it read back right after writing each shard, so
    damage after that is caught.
    """
    group = zarr.open_group(zarr_store(path), mode="r+", zarr_format=3)
    images = group[L.IMAGES]
    if isinstance(metadata, pd.DataFrame):
        metadata = metadata.reset_index(drop=True)
        if L.CHUNK_CRC not in metadata.columns and set(L.REQUIRED_COLUMNS) <= set(metadata.columns):
            metadata[L.CHUNK_CRC] = _read_chunk_crcs(path, images)
        metadata = [metadata]
    channels, shape = list(group.attrs["channels"]), tuple(images.shape)
    digest = ""

    def write(target: Any) -> None:
        # Streamed into the temporary file and hashed back from it: the file is never whole in
        # memory (~42 bytes a cell, 3 GB at 75 M cells). A URL's target is the put's buffer.
        nonlocal digest
        with open(target, "wb") if isinstance(target, str | Path) else nullcontext(target) as f:
            rows = _write_parts(path, metadata, f)
        if rows != shape[0]:  # before the rename: a short table never replaces the file
            raise StoreError(f"{path}: {rows} metadata rows for {shape[0]} images")
        with open(target, "rb") if isinstance(target, str | Path) else nullcontext(target) as f:
            digest = L.digest_blocks(L.file_blocks(f), channels, shape)

    write_file(path, L.METADATA, write)
    write_attrs(path, {L.DIGEST: digest})


def _missing_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in [*L.REQUIRED_COLUMNS, L.CHUNK_CRC] if c not in table.columns]


def _write_parts(path: str | AnyPath, parts: Iterable[pd.DataFrame], buf: IO[bytes]) -> int:
    """Parquet of the parts, in row groups of ``METADATA_ROW_GROUP``; returns the row count."""
    writer: pq.ParquetWriter | None = None
    pending: list[pa.Table] = []
    rows = 0
    for part in parts:
        missing = _missing_columns(part)
        if missing:
            raise StoreError(f"{path}: metadata lacks required column(s) {', '.join(missing)}")
        part = part.reset_index(drop=True).assign(
            **{L.CHUNK_CRC: part[L.CHUNK_CRC].to_numpy().astype(np.uint32)}
        )
        table = pa.Table.from_pandas(part, preserve_index=False)
        if writer is None:
            writer = pq.ParquetWriter(buf, table.schema)
        pending.append(table.cast(writer.schema))  # one schema for every part
        rows += len(part)
        if sum(len(t) for t in pending) >= METADATA_ROW_GROUP:
            writer.write_table(pa.concat_tables(pending), row_group_size=METADATA_ROW_GROUP)
            pending = []
    if writer is None:
        raise StoreError(f"{path}: no metadata rows to write")
    if pending:
        writer.write_table(pa.concat_tables(pending), row_group_size=METADATA_ROW_GROUP)
    writer.close()
    return rows


def _read_chunk_crcs(path: str | AnyPath, images: zarr.Array) -> list[int]:
    rows = int(images.shards[0])
    n = int(images.shape[0])
    return [
        crc
        for i, start in enumerate(range(0, n, rows))
        for crc in shard_chunk_crcs(path, images, i, min(rows, n - start))
    ]


def write_quarantine(path: str | AnyPath, rows: list[dict[str, Any]]) -> None:
    df = pd.DataFrame(rows, columns=L.QUARANTINE_COLUMNS)
    write_file(path, L.QUARANTINE, lambda f: df.to_csv(f, index=False))
