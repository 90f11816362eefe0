"""The store: the contract between conversion (writer) and training (reader).

A zarr v3 group::

    store.zarr/
      zarr.json            attrs: cellmorph_format, channels, stats, size, codec, source, created,
                           generation, metadata_digest
      images/              (N, C, H, W) uint16, one image per inner chunk, S images per shard;
                           each chunk ends with the crc32c of its compressed bytes
      metadata.parquet     one row per image, row i == images[i], with each image's checksum
                           and its chunk's crc32c
      quarantine.csv       every rejected input and why (may be empty, always present)

Integrity (format 2): zarr.json binds ``metadata.parquet`` (``metadata_digest``: its bytes, the
channel names and the array shape), the metadata binds every chunk to its row (``chunk_crc32c``)
and every chunk carries its own crc32c. Readers hold one *generation* of the folder open (a
directory descriptor, :class:`StoreFolder`), so a store swapped in by ``convert --overwrite`` is
never mixed with the one they started on.

A store is named by a local path or an object-store URL (``s3://bucket/plates.zarr``, through
:mod:`cellmorph.remote`); a URL store is read through :class:`RemoteFolder`, which has no
directory to hold: its generation is checked instead (see :func:`open_store`).

Only this module knows the layout; writers and readers go through it (the bytes of one shard
file: :mod:`cellmorph.shardfile`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.ipc as paipc
import pyarrow.parquet as pq
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from cellmorph import atomic, remote
from cellmorph.errors import CellmorphError
from cellmorph.remote import AnyPath, URLPath, is_url
from cellmorph.shardfile import StoreDamage, chunk_crcs, layout_of, shard_key

# 2: a crc32c after every chunk, every chunk written, metadata bound by a digest in the attrs.
FORMAT_VERSION = 2
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
# Rows per parquet row group of metadata.parquet: readers stream it a row group at a time.
METADATA_ROW_GROUP = 65_536
# Projected metadata shared by the processes of one node (memory-mapped Arrow files).
SHARED_CACHE = "cellmorph-metadata"
CACHE_MAX_AGE_S = 7 * 24 * 3600

log = logging.getLogger(__name__)


class StoreError(CellmorphError):
    """A store that cannot be read as a cellmorph store; the message names the path or key."""


def compressor_for(codec: str) -> Any:
    """zstd (CPU decode, best ratio) or LZ4 (decodable on the GPU by DALI's inflate)."""
    if codec == "zstd":
        return BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
    if codec == "lz4":
        from zarr.codecs.numcodecs import LZ4

        return LZ4(acceleration=1)
    raise StoreError(f"unknown codec {codec!r} (expected zstd or lz4)")


def zarr_store(path: str | AnyPath, read_only: bool = False) -> Any:
    """What zarr opens for ``path``: the local folder's path, or an obstore-backed store for a
    URL (ranged reads, retries; the same client the fast reader uses)."""
    if not is_url(path):
        return str(path).removeprefix("file://")
    from zarr.storage import ObjectStore

    return ObjectStore(remote.store_at(str(path)), read_only=read_only)


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

    ``attrs`` (source description, resize policy...) is stored next to the format fields.
    Channel statistics are added later with :func:`write_attrs` once the pixels are known.
    """
    if n <= 0:
        raise StoreError(f"{path}: cannot create a store with {n} images")
    group = zarr.open_group(zarr_store(path), mode="w", zarr_format=3)
    shard = max(1, min(shard_size, n))
    arr = group.create_array(
        IMAGES,
        shape=(n, len(channels), size, size),
        chunks=(1, len(channels), size, size),
        shards=(shard, len(channels), size, size),
        dtype="uint16",
        # The crc32c after the compressor: every chunk checks itself (zarr and our readers).
        compressors=[compressor_for(codec), Crc32cCodec()],
        fill_value=0,
    )
    group.attrs.update(
        {
            "cellmorph_format": FORMAT_VERSION,
            "channels": list(channels),
            "size": size,
            "codec": codec,
            "shard_size": shard,
            GENERATION: uuid.uuid4().hex,
            **(attrs or {}),
        }
    )
    return arr.with_config({"write_empty_chunks": True})


def open_images(path: str | AnyPath) -> zarr.Array:
    """The ``images`` array of a store being written. Every chunk is written, an all-zero
    image too: a hole in a shard is then always damage, never a black image."""
    arr = zarr.open_array(store=zarr_store(path), path=IMAGES, mode="r+", zarr_format=3)
    return arr.with_config({"write_empty_chunks": True})


def write_file(path: str | AnyPath, name: str, write: Any) -> None:
    """Write ``<store>/<name>`` atomically with ``write(target)``: a temporary file + rename
    locally, one put for URLs (``s3://``...), where a put is already all-or-nothing."""
    if is_url(path):
        buf = io.BytesIO()
        write(buf)
        remote.write(f"{str(path).rstrip('/')}/{name}", buf.getvalue())
        return
    atomic.write_with(Path(str(path).removeprefix("file://")) / name, write)


def read_file(path: str | AnyPath, name: str) -> bytes | None:
    """The bytes of ``<store>/<name>``, or None when there is no such file."""
    target = f"{str(path).rstrip('/')}/{name}"
    try:
        return remote.read(target) if is_url(path) else Path(target).read_bytes()
    except FileNotFoundError:
        return None


def path_kind(path: str | AnyPath) -> str:
    """``absent``, ``file`` or ``folder`` (a URL prefix holding objects is a folder)."""
    if is_url(path):
        p = URLPath(str(path))
        return "file" if p.is_file() else "folder" if p.is_dir() else "absent"
    p = Path(str(path).removeprefix("file://"))
    return "folder" if p.is_dir() else "file" if p.exists() else "absent"


def folder_names(path: str | AnyPath) -> set[str]:
    """The names directly inside a folder (or URL prefix)."""
    if is_url(path):
        return remote.children(str(path))
    return set(os.listdir(str(path).removeprefix("file://")))


def remove_folder(path: str | AnyPath) -> None:
    """Delete a folder (or every object under a URL prefix) and everything in it."""
    if is_url(path):
        remote.delete_tree(str(path))
        return
    import shutil

    shutil.rmtree(str(path).removeprefix("file://"))


def make_folder(path: str | AnyPath) -> None:
    """Create a local folder (a URL prefix needs nothing)."""
    if not is_url(path):
        Path(str(path).removeprefix("file://")).mkdir(parents=True, exist_ok=True)


def write_bytes(path: str | AnyPath, name: str, data: bytes) -> None:
    """Write ``<store>/<name>`` (any file the store keeps beside its arrays) atomically."""
    write_file(path, name, lambda f: _put(f, data))


def _put(target: Any, data: bytes) -> None:
    if hasattr(target, "write"):
        target.write(data)
    else:
        Path(target).write_bytes(data)


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
    # zarr writes "<key>.<uuid>.partial" and renames it: a killed writer leaves that behind.
    for stale in fs.glob(f"{target}.*.partial"):
        fs.rm(stale)


def shard_chunk_crcs(path: str | AnyPath, images: zarr.Array, index: int, rows: int) -> list[int]:
    """Read shard file ``index`` back and return the crc32c of its first ``rows`` chunks, each
    checked: what the writer records for metadata.parquet right after writing the shard."""
    layout = layout_of(images)
    if layout is None or not layout.chunk_crc:
        raise StoreError(f"{path}: images array is not in cellmorph format {FORMAT_VERSION}")
    key = shard_key(images, index)
    data = read_file(path, key)
    if data is None:
        raise StoreDamage(f"{path}/{key}: the shard just written is missing")
    return chunk_crcs(data, layout, rows, f"{path}/{key}")


def image_checksum(img: np.ndarray) -> str:
    """Checksum of the stored uint16 bytes of one image (little-endian, C order)."""
    data = np.ascontiguousarray(img, dtype="<u2")
    return hashlib.blake2b(data.tobytes(), digest_size=8).hexdigest()


def metadata_digest(data: bytes, channels: list[str], shape: tuple[int, ...]) -> str:
    """Binds metadata.parquet's bytes (row order and content) to the channels and the array."""
    return _digest_blocks([data], channels, shape)


def _digest_blocks(blocks: Any, channels: list[str], shape: tuple[int, ...]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for block in blocks:
        h.update(block)
    h.update(json.dumps({"channels": list(channels), "shape": list(shape)}).encode())
    return h.hexdigest()


def _file_blocks(f: IO[bytes], size: int = 8 << 20) -> Iterator[bytes]:
    f.seek(0)
    while block := f.read(size):
        yield block


def write_attrs(path: str | AnyPath, attrs: dict[str, Any]) -> None:
    group = zarr.open_group(zarr_store(path), mode="r+", zarr_format=3)
    group.attrs.update(attrs)


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
    images = group[IMAGES]
    if isinstance(metadata, pd.DataFrame):
        metadata = metadata.reset_index(drop=True)
        if CHUNK_CRC not in metadata.columns and set(REQUIRED_COLUMNS) <= set(metadata.columns):
            metadata[CHUNK_CRC] = _read_chunk_crcs(path, images)
        metadata = [metadata]
    buf = io.BytesIO()
    rows = _write_parts(path, metadata, buf)
    if rows != images.shape[0]:
        raise StoreError(f"{path}: {rows} metadata rows for {images.shape[0]} images")
    data = buf.getbuffer()
    write_bytes(path, METADATA, data)
    channels = list(group.attrs["channels"])
    group.attrs.update({DIGEST: metadata_digest(data, channels, tuple(images.shape))})


def _missing_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in [*REQUIRED_COLUMNS, CHUNK_CRC] if c not in table.columns]


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
            **{CHUNK_CRC: part[CHUNK_CRC].to_numpy().astype(np.uint32)}
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
    df = pd.DataFrame(rows, columns=QUARANTINE_COLUMNS)
    write_file(path, QUARANTINE, lambda f: df.to_csv(f, index=False))


def read_quarantine(data: bytes | None, where: str = QUARANTINE) -> pd.DataFrame:
    """quarantine.csv as text: a plate named ``NA`` or a reason ``None`` stay what they are."""
    if not data:
        return pd.DataFrame(columns=QUARANTINE_COLUMNS)
    try:
        return pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, na_values=[])
    except (ValueError, UnicodeDecodeError) as e:  # pandas' ParserError is a ValueError
        raise StoreError(f"{where} is not a readable CSV ({e})") from None


def channel_stats(sample: np.ndarray, channels: list[str]) -> dict[str, dict[str, float]]:
    """Per-channel intensity statistics of a (N, C, H, W) sample, for normalization."""
    out: dict[str, dict[str, float]] = {}
    for c, name in enumerate(channels):
        v = sample[:, c].astype(np.float64).ravel()
        p1, p50, p99 = np.percentile(v, [1, 50, 99])
        out[name] = {
            "mean": float(v.mean()),
            "std": float(max(v.std(), 1e-6)),
            "p1": float(p1),
            "p50": float(p50),
            "p99": float(p99),
            "min": float(v.min()),
            "max": float(v.max()),
        }
    return out


# --------------------------------------------------------------------------- plate statistics
# Per-plate channel statistics (attrs["plate_stats"]), exact over every image: writers sum each
# group of images (a plate's wells, or its negative-control wells) and the sums are pooled.

MOMENTS = ("sum", "sumsq", "log_sum", "log_sumsq")
GROUP_SEP = "\x1f"  # between plate and the negative-control flag in a group key


def group_key(plate: str, negcon: bool) -> str:
    return f"{plate}{GROUP_SEP}{int(negcon)}"


def sums_by_group(block: np.ndarray, groups: list[str]) -> dict[str, dict[str, Any]]:
    """Per group key (``plate<GROUP_SEP>0|1``, 1 = negative control): image count and the
    per-channel sums of ``block`` ((N, C, H, W) uint16), linear and ``log1p``."""
    x = block.astype(np.float64)
    logx = np.log1p(x)
    per_image = {
        "sum": x.sum(axis=(2, 3)),
        "sumsq": np.square(x).sum(axis=(2, 3)),
        "log_sum": logx.sum(axis=(2, 3)),
        "log_sumsq": np.square(logx).sum(axis=(2, 3)),
    }
    out: dict[str, dict[str, Any]] = {}
    keys = np.asarray(groups)
    for key in dict.fromkeys(groups):
        sel = keys == key
        out[key] = {
            "n": int(sel.sum()),
            **{m: per_image[m][sel].sum(axis=0).tolist() for m in MOMENTS},
        }
    return out


def _stats(total: dict[str, np.ndarray], n_images: int, pixels: int, channels: list[str]) -> dict:
    n = n_images * pixels
    out = {}
    for c, name in enumerate(channels):
        mean = total["sum"][c] / n
        log_mean = total["log_sum"][c] / n
        out[name] = {
            "mean": float(mean),
            "std": float(max(np.sqrt(max(total["sumsq"][c] / n - mean**2, 0.0)), 1e-6)),
            "log_mean": float(log_mean),
            "log_std": float(max(np.sqrt(max(total["log_sumsq"][c] / n - log_mean**2, 0.0)), 1e-6)),
            "images": n_images,
        }
    return out


def plate_stats_from_sums(records: list[dict[str, dict[str, Any]]], channels: list[str],
                pixels: int) -> dict[str, dict[str, Any]]:  # fmt: skip
    """``{plate: {"all": stats, "negcon": stats or None}}`` from the shards' sums."""
    acc: dict[tuple[str, str], tuple[int, dict[str, np.ndarray]]] = {}
    for record in records:
        for key, s in record.items():
            plate, _, flag = key.partition(GROUP_SEP)
            for scope in ("all", "negcon") if flag == "1" else ("all",):
                n, sums = acc.get(
                    (plate, scope), (0, {m: np.zeros(len(channels)) for m in MOMENTS})
                )
                acc[(plate, scope)] = (n + s["n"], {m: sums[m] + np.asarray(s[m]) for m in MOMENTS})
    plates = sorted({p for p, _ in acc})
    return {
        p: {
            scope: _stats(acc[(p, scope)][1], acc[(p, scope)][0], pixels, channels)
            if (p, scope) in acc
            else None
            for scope in ("all", "negcon")
        }
        for p in plates
    }


def pooled_stats(
    table: dict[str, dict[str, Any]], channels: list[str]
) -> dict[str, dict[str, float]]:
    """Store-wide mean and std (both spaces) pooled from the plates' ``all`` statistics."""
    out = {}
    for name in channels:
        parts = [(t["all"][name], t["all"][name]["images"]) for t in table.values()]
        n = sum(w for _, w in parts)
        entry = {}
        for m, s in (("mean", "std"), ("log_mean", "log_std")):
            mean = sum(p[m] * w for p, w in parts) / n
            second = sum((p[s] ** 2 + p[m] ** 2) * w for p, w in parts) / n
            entry[m], entry[s] = float(mean), float(max(np.sqrt(max(second - mean**2, 0.0)), 1e-6))
        out[name] = entry
    return out


def image_stats(images: np.ndarray, plates: list[str], negcon: list[bool],
                channels: list[str]) -> dict[str, Any]:  # fmt: skip
    """``stats`` and ``plate_stats`` attrs for a set of images held in memory (tests, small
    writers): the same numbers a conversion computes shard by shard."""
    sums = sums_by_group(images, [group_key(p, n) for p, n in zip(plates, negcon)])
    per_plate = plate_stats_from_sums([sums], channels, images.shape[-1] * images.shape[-2])
    stats = channel_stats(images, channels)
    for name, exact in pooled_stats(per_plate, channels).items():
        stats[name].update(exact)
    return {"stats": stats, "plate_stats": per_plate}


class StoreFolder:
    """One generation of a local store folder, held open for reading.

    Files are opened relative to a directory descriptor, so ``convert --overwrite`` swapping a
    new store in at the same path never mixes the two: this reader keeps reading its own
    generation, or stops with a message if that generation was deleted. A shared ``flock`` on
    the directory tells the converter that this generation still has readers (it then keeps it
    aside instead of deleting it); forked processes share it, spawned ones take their own.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            raise StoreError(f"{self.path}: no such store") from None
        except NotADirectoryError:
            raise StoreError(f"{self.path} is a file, not a store (a folder)") from None
        except OSError as e:
            raise StoreError(f"{self.path}: cannot open the store ({e.strerror})") from None
        with contextlib.suppress(OSError):  # best effort: some filesystems have no flock
            fcntl.flock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        self._pid = os.getpid()

    def read(self, name: str) -> bytes:
        """The bytes of ``name`` (relative to the store folder) in this generation."""
        try:
            fd = os.open(name, os.O_RDONLY, dir_fd=self.fd)
        except FileNotFoundError:
            raise self.missing(name) from None
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def open_fd(self, name: str) -> int:
        try:
            return os.open(name, os.O_RDONLY, dir_fd=self.fd)
        except FileNotFoundError:
            raise self.missing(name) from None

    def names(self) -> set[str]:
        return set(os.listdir(self.fd))

    def replaced(self) -> bool:
        """True when this generation's folder was deleted (or swapped out and deleted)."""
        return os.fstat(self.fd).st_nlink == 0

    def missing(self, name: str) -> StoreError:
        if self.replaced():
            return StoreError(
                f"{self.path} was replaced or deleted while this process was reading it "
                "(convert --overwrite?); start again to read the new store"
            )
        return StoreDamage(
            f"{self.path}: {name} is missing (damaged store: convert again with --overwrite)"
        )

    def attrs(self) -> dict[str, Any]:
        """The group attributes of this generation."""
        try:
            return dict(json.loads(self.read("zarr.json")).get("attributes") or {})
        except StoreError:
            raise
        except (ValueError, AttributeError):
            raise StoreError(f"{self.path}/zarr.json is not valid zarr metadata") from None

    def close(self) -> None:
        if self.fd >= 0 and self._pid == os.getpid():
            os.close(self.fd)
        self.fd = -1

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class RemoteFolder:
    """One generation of a store in an object store, held for reading.

    An object store has no folder to hold open and no lock: the generation read at open is
    the one this reader keeps to. A store converted again at the same URL has another
    ``generation``; a chunk then fails the crc32c recorded in the metadata this reader
    loaded, and the reader says the store was replaced (:meth:`missing`, the loaders).
    """

    def __init__(self, url: str | URLPath):
        self.path = URLPath(str(url))
        self.url = self.path.url
        self.generation: str | None = None

    def read(self, name: str) -> bytes:
        try:
            return remote.read(f"{self.url}/{name}")
        except remote.RemoteMissing:
            raise self.missing(name) from None

    def names(self) -> set[str]:
        names = remote.children(self.url)
        if not names:
            raise StoreError(f"{self.url}: no such store (no objects under this prefix)")
        return names

    def attrs(self) -> dict[str, Any]:
        try:
            attrs = dict(json.loads(self.read("zarr.json")).get("attributes") or {})
        except StoreError:
            raise
        except (ValueError, AttributeError):
            raise StoreError(f"{self.url}/zarr.json is not valid zarr metadata") from None
        if self.generation is None:
            self.generation = attrs.get(GENERATION)
        return attrs

    def replaced(self) -> bool:
        """True when the URL now holds another generation (or nothing)."""
        data = read_file(self.url, "zarr.json")
        if data is None:
            return True
        current = (json.loads(data).get("attributes") or {}).get(GENERATION)
        return self.generation is not None and current != self.generation

    def missing(self, name: str) -> StoreError:
        if self.replaced():
            return StoreError(
                f"{self.url} was replaced or deleted while this process was reading it "
                "(convert --overwrite?); start again to read the new store"
            )
        return StoreDamage(f"{self.url}: {name} is missing (damaged store: convert again with --overwrite)")  # fmt: skip

    def close(self) -> None:
        """Nothing is held open."""


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
    folder: StoreFolder | RemoteFolder | None = field(default=None, repr=False, compare=False)
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
    so only one row group (:data:`METADATA_ROW_GROUP` rows) is in memory, not the whole table.
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
    if is_url(path):
        folder: StoreFolder | RemoteFolder = RemoteFolder(str(path))
    else:
        folder = StoreFolder(str(path).removeprefix("file://"))
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
    if isinstance(folder, RemoteFolder):
        file: IO[bytes] = io.BytesIO(folder.read(METADATA))
    else:
        file = os.fdopen(folder.open_fd(METADATA), "rb")
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
    if attrs.get(DIGEST) != _digest_blocks(_file_blocks(file), attrs["channels"], shape):
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


def verify_store(store: Store, progress: bool = True) -> list[str]:
    """Check every image against what the store recorded for it: the shard's index, the chunk's
    crc32c, that the chunk is this row's (its crc equals ``chunk_crc32c``), that it decodes,
    and that the decoded pixels match ``checksum``. One line per damaged image; [] when sound.
    """
    import numcodecs
    from tqdm import tqdm

    layout = layout_of(store.images)
    if layout is None or not layout.chunk_crc or store.folder is None:
        raise StoreError(f"{store.path}: images are not laid out as cellmorph format 2 writes them")
    codec = numcodecs.get_codec(dict(layout.codec))
    n, per = len(store), layout.shard_rows
    problems: list[str] = []
    names = well_ids(store.metadata)
    site = store.metadata[SITE].astype(str).to_numpy()
    recorded = (store.chunk_crcs(), store.metadata[CHECKSUM].astype(str).to_numpy())
    bar = tqdm(range(-(-n // per)), unit="shard", desc="verify", leave=False,
               disable=None if progress else True)  # fmt: skip
    for shard in bar:
        rows = range(shard * per, min(n, (shard + 1) * per))
        for row, reason in _verify_shard(store, layout, codec, shard, rows, recorded):
            problems.append(f"row {row} ({names[row]}/{site[row]}): {reason}")
    return problems


def _verify_shard(store: Store, layout: Any, codec: Any, shard: int, rows: range,
                  recorded: tuple[np.ndarray, np.ndarray]) -> list[tuple[int, str]]:  # fmt: skip
    from cellmorph.shardfile import EMPTY, chunk_payload, index_range, parse_index

    key = shard_key(store.images, shard)
    try:
        data = store.folder.read(key)  # type: ignore[union-attr]
        start, nbytes = index_range(layout, len(data))
        index = parse_index(data[start : start + nbytes], layout, len(data), key)
    except StoreDamage as e:
        return [(r, str(e).removeprefix(f"{store.path}: ")) for r in rows]
    (expected, sums), view, out = recorded, memoryview(data), []
    for r in rows:
        off, size = index[r - rows.start]
        where = f"{key} chunk {r - rows.start}"
        if off == EMPTY:
            out.append((r, f"{where} was never written (missing chunk)"))
            continue
        try:
            chunk = view[int(off) : int(off) + int(size)]
            payload = chunk_payload(chunk, layout, int(expected[r]), where)
            pixels = np.frombuffer(codec.decode(payload), dtype="<u2")
        except StoreDamage as e:
            out.append((r, str(e)))
            continue
        except Exception as e:  # a decoder's own error: the bytes are not a valid frame
            out.append((r, f"{where} does not decode ({e})"))
            continue
        if pixels.size != int(np.prod(layout.chunk_shape)):
            out.append((r, f"{where} decodes to {pixels.size} values, not {layout.chunk_shape}"))
        elif image_checksum(pixels) != sums[r]:
            out.append((r, f"{where}: pixels differ from the image checksum in {METADATA}"))
    return out


def well_ids(metadata: pd.DataFrame) -> np.ndarray:
    """One string per image naming its well (``plate/well``)."""
    missing = [c for c in (PLATE, WELL) if c not in metadata.columns]
    if missing:
        raise StoreError(f"metadata lacks column(s) {missing} that name an image's well")
    plate = metadata[PLATE].astype(str).to_numpy().astype(str)
    well = metadata[WELL].astype(str).to_numpy().astype(str)
    return np.char.add(np.char.add(plate, "/"), well)


def describe(store: Store, label_column: str | None = None) -> dict[str, Any]:
    """Summary for ``cellmorph inspect``: counts of images, plates, wells, classes, quarantine."""
    md = store.metadata
    info: dict[str, Any] = {
        "path": str(store.path),
        "format": store.attrs.get("cellmorph_format"),
        "images": len(store),
        "shape": list(store.shape),
        "channels": store.channels,
        "codec": store.attrs.get("codec"),
        "plates": int(md[PLATE].nunique()),
        "wells": int(md.groupby([PLATE, WELL]).ngroups),
        "quarantined": len(store.quarantine),
    }
    if label_column and label_column in md.columns:
        counts = md[label_column].value_counts()
        info["label_column"] = label_column
        info["classes"] = int(counts.size)
        info["class_counts"] = {str(k): int(v) for k, v in counts.items()}
    return info


def dumps(info: dict[str, Any]) -> str:
    return json.dumps(info, indent=2)
