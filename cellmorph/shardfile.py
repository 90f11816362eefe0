"""One shard file of the store's ``images`` array: its bytes, parsed and checked.

A zarr v3 shard (``sharding_indexed`` codec) holds the encoded inner chunks and an index of
``(offset, nbytes)`` uint64 pairs per inner chunk (``2**64-1`` twice for a chunk never written),
at the end or start of the file, followed by the index's own crc32c. In a cellmorph store
(format 2) each inner chunk is one image encoded as ``compressor(bytes) || crc32c`` (zarr's
``crc32c`` codec after the compressor) and every chunk is written, also an all-zero image.

This module is the one place that knows those bytes: the fast reader, ``inspect --verify``
and the converter's read-back after each shard write all go through it, so all three check
exactly what zarr-python would check, plus what zarr cannot know: that a chunk belongs to
the row that asks for it (its crc32c equals the one recorded in ``metadata.parquet``).
:func:`encode_shard` is the inverse the converter writes with: the file zarr-python writes for
the same rows, byte for byte, without zarr's per-chunk codec pipeline.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import google_crc32c
import numpy as np

from cellmorph.errors import CellmorphError

# What numcodecs' zstd, lz4 and blosc decoders raise for bytes that are not a valid frame
# (random, truncated, empty: found by decoding each); anything else is a bug.
DECODE_ERRORS = (RuntimeError, ValueError)

EMPTY = np.uint64(2**64 - 1)
CRC_BYTES = 4


class StoreDamage(CellmorphError):
    """Bytes of a store that are missing, truncated or fail their checksum; names the file."""


@dataclass(frozen=True)
class ShardLayout:
    """What reading a shard needs, derived from the array's zarr metadata."""

    shard_rows: int
    chunk_shape: tuple[int, ...]
    codec: dict[str, Any]  # numcodecs config of the chunk compressor
    index_at_end: bool
    index_crc: bool
    chunk_crc: bool  # every chunk ends with the crc32c of its compressed bytes
    # numcodecs config that encodes chunks exactly as the array's codec does (every parameter:
    # ``codec`` is only what decoding needs); None when this module cannot write them.
    encoder: dict[str, Any] | None = None

    @property
    def index_nbytes(self) -> int:
        return self.shard_rows * 16 + (CRC_BYTES if self.index_crc else 0)


def crc32c(data: Any) -> int:
    """crc32c of any buffer (bytes, memoryview slices) without copying it."""
    return google_crc32c.value(np.frombuffer(data, dtype=np.uint8))


def _numcodecs_config(codec: Any) -> dict[str, Any] | None:
    """The numcodecs config that decodes chunks written by this zarr v3 codec, if any."""
    from zarr.codecs import BloscCodec, ZstdCodec

    if isinstance(codec, BloscCodec):
        return {"id": "blosc"}  # Blosc frames describe themselves; no parameters needed.
    if isinstance(codec, ZstdCodec):
        return {"id": "zstd"}
    name = getattr(codec, "codec_name", "")
    if name in ("numcodecs.lz4", "numcodecs.zstd", "numcodecs.blosc"):
        return dict(codec.codec_config)
    return None


def _encoder_config(codec: Any) -> dict[str, Any] | None:
    """The numcodecs config zarr-python itself builds to encode chunks with this zarr v3 codec
    (mirrors ``BloscCodec._blosc_codec``, ``ZstdCodec._zstd_codec`` and the numcodecs
    wrappers' ``get_codec(codec_config)``), so the bytes are zarr's; None for other codecs."""
    from zarr.codecs import BloscCodec, ZstdCodec

    if isinstance(codec, BloscCodec):
        shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[codec.shuffle.value]
        return {"id": "blosc", "cname": codec.cname.name, "clevel": codec.clevel,
                "shuffle": shuffle, "blocksize": codec.blocksize,
                "typesize": codec.typesize}  # fmt: skip
    if isinstance(codec, ZstdCodec):
        return {"id": "zstd", "level": codec.level, "checksum": codec.checksum}
    if getattr(codec, "codec_name", "") in ("numcodecs.lz4", "numcodecs.zstd"):
        return dict(codec.codec_config)
    return None


def _little_endian_bytes(codec: Any) -> bool:
    from zarr.codecs import BytesCodec

    return isinstance(codec, BytesCodec) and (
        codec.endian is None or codec.endian.value == "little"
    )


def layout_of(arr: Any) -> ShardLayout | None:
    """The layout of a sharded array with one image per inner chunk, or None for any other
    (unsharded, sharded along other axes, unknown codecs): zarr-python must read those."""
    from zarr.codecs import Crc32cCodec, ShardingCodec

    meta = arr.metadata
    if getattr(meta, "zarr_format", None) != 3:
        return None
    if len(meta.codecs) != 1 or not isinstance(meta.codecs[0], ShardingCodec):
        return None
    sc = meta.codecs[0]
    shard, inner = tuple(meta.chunk_grid.chunk_shape), tuple(sc.chunk_shape)
    if inner[0] != 1 or inner[1:] != tuple(arr.shape[1:]) or shard[1:] != inner[1:]:
        return None
    codecs = list(sc.codecs)
    chunk_crc = len(codecs) == 3 and isinstance(codecs[2], Crc32cCodec)
    if len(codecs) != 2 + chunk_crc or not _little_endian_bytes(codecs[0]):
        return None
    codec = _numcodecs_config(codecs[1])
    idx = list(sc.index_codecs)
    if codec is None or not idx or not _little_endian_bytes(idx[0]):
        return None
    if len(idx) > 2 or (len(idx) == 2 and not isinstance(idx[1], Crc32cCodec)):
        return None
    return ShardLayout(
        shard_rows=int(shard[0]),
        chunk_shape=inner[1:],
        codec=codec,
        index_at_end=sc.index_location.value == "end",
        index_crc=len(idx) == 2,
        chunk_crc=chunk_crc,
        encoder=_encoder_config(codecs[1]),
    )


def shard_key(arr: Any, shard: int) -> str:
    """Path of shard file ``shard`` relative to the store's root folder."""
    key = arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))
    return f"{arr.path}/{key}" if arr.path else key


def index_range(layout: ShardLayout, file_size: int) -> tuple[int, int]:
    """(start, nbytes) of the index inside a shard file of ``file_size`` bytes."""
    n = layout.index_nbytes
    return (file_size - n if layout.index_at_end else 0), n


def parse_index(raw: bytes, layout: ShardLayout, file_size: int, where: str) -> np.ndarray:
    """The ``(shard_rows, 2)`` uint64 (offset, nbytes) table, checked: complete, its crc32c,
    and every written chunk inside the file's data region."""
    n = layout.index_nbytes
    if file_size < n or len(raw) != n:
        raise StoreDamage(f"{where} is truncated ({file_size} bytes, its index alone needs {n})")
    if layout.index_crc:
        stored = int.from_bytes(raw[-CRC_BYTES:], "little")
        if crc32c(raw[:-CRC_BYTES]) != stored:
            raise StoreDamage(f"{where}: the shard index fails its crc32c (damaged file)")
    index = np.frombuffer(raw, dtype="<u8", count=layout.shard_rows * 2).reshape(-1, 2)
    written = index[:, 0] != EMPTY
    lo = 0 if layout.index_at_end else n
    hi = file_size - n if layout.index_at_end else file_size
    ends = index[written, 0] + index[written, 1]
    if written.any() and (index[written, 0].min() < lo or ends.max() > hi):
        raise StoreDamage(f"{where}: the shard index points outside the file (truncated?)")
    return index


def chunk_payload(raw: memoryview, layout: ShardLayout, expected: int | None,
                  where: str) -> memoryview:  # fmt: skip
    """The compressed bytes of one chunk, after checking its crc32c, and that it is the
    chunk ``expected`` (the crc recorded for this row) when that is known."""
    if not layout.chunk_crc:
        return raw
    if len(raw) < CRC_BYTES:
        raise StoreDamage(f"{where}: chunk of {len(raw)} bytes is too short to hold its crc32c")
    stored = int.from_bytes(raw[-CRC_BYTES:], "little")
    payload = raw[:-CRC_BYTES]
    if crc32c(payload) != stored:
        raise StoreDamage(f"{where}: chunk fails its crc32c (damaged bytes)")
    if expected is not None and stored != expected:
        raise StoreDamage(
            f"{where}: holds another image's chunk (crc32c {stored:08x}, metadata.parquet "
            f"records {expected:08x} for this row): shard files swapped or rewritten"
        )
    return payload


def chunk_crcs(data: bytes, layout: ShardLayout, rows: int, where: str,
               verify: bool = True) -> list[int]:  # fmt: skip
    """The crc32c of each of the first ``rows`` chunks of a whole shard file, each checked
    (the converter's read-back right after writing a shard: what metadata.parquet records).

    ``verify=False`` reads each chunk's crc32c without recomputing it: for bytes known to be
    the encoder's own (a read-back equal to what :func:`encode_shard` just returned, which
    computed them), where the check costs ~0.07 ms a 96 px crop and can find nothing."""
    if not layout.chunk_crc:
        raise ValueError("chunk_crcs needs a layout whose chunks end with a crc32c")
    start, n = index_range(layout, len(data))
    index = parse_index(data[start : start + n], layout, len(data), where)
    view = memoryview(data)
    out = []
    for i in range(rows):
        off, nbytes = (int(v) for v in index[i])
        if index[i, 0] == EMPTY:
            raise StoreDamage(f"{where}: chunk {i} was not written")
        if verify:
            chunk_payload(view[off : off + nbytes], layout, None, f"{where} chunk {i}")
        out.append(int.from_bytes(view[off + nbytes - CRC_BYTES : off + nbytes], "little"))
    return out


@contextlib.contextmanager
def _blosc_in_this_thread(codec_id: str) -> Iterator[None]:
    """Blosc compressing in the calling thread only, as under zarr (which encodes in worker
    threads, where numcodecs' blosc does not use its own thread pool): one core per
    conversion worker, whatever thread calls. The bytes are the same either way."""
    if codec_id != "blosc":
        yield
        return
    from numcodecs import blosc

    before = blosc.use_threads
    blosc.use_threads = False
    try:
        yield
    finally:
        blosc.use_threads = before


def encode_shard(block: np.ndarray, layout: ShardLayout) -> bytes:
    """The shard file zarr-python writes for ``block``, rows ``0 ..`` of one shard, byte for
    byte: each image ``compressor(bytes) || crc32c`` in row order (zarr's morton order of a
    ``(rows, 1, 1, 1)`` chunk grid), then the index and its crc32c (or the index first, when
    the layout says so). Every row of ``block`` is written, an all-zero image too; a block of
    fewer rows than the shard holds (an array's last shard) leaves the rest unwritten
    (``2**64-1`` entries), as zarr does."""
    return b"".join(encode_shard_parts(block, layout))


def encode_shard_parts(block: np.ndarray, layout: ShardLayout) -> list[bytes]:
    """:func:`encode_shard`'s file as the pieces it is made of, in file order: a writer hands
    them to one ``writev`` instead of joining them first (a copy of the whole shard: ~0.03 ms
    a 96 px crop, as much as its crc32c)."""
    import numcodecs

    if layout.encoder is None or not layout.chunk_crc:
        raise ValueError("encode_shard needs a layout with a known encoder and chunk crc32c")
    rows = len(block)
    if not 0 < rows <= layout.shard_rows or tuple(block.shape[1:]) != layout.chunk_shape:
        raise ValueError(f"a block of shape {block.shape} does not fit a shard of "
                         f"{layout.shard_rows} x {layout.chunk_shape}")  # fmt: skip
    # zarr's bytes codec: each chunk's values little-endian, C order, seen as raw bytes.
    raw = np.ascontiguousarray(block, dtype=block.dtype.newbyteorder("<"))
    images = raw.reshape(rows, -1).view(np.uint8)
    codec = numcodecs.get_codec(dict(layout.encoder))
    index = np.full((layout.shard_rows, 2), EMPTY, dtype="<u8")
    parts: list[bytes] = []
    offset = 0 if layout.index_at_end else layout.index_nbytes
    with _blosc_in_this_thread(layout.encoder["id"]):
        for i in range(rows):
            payload = bytes(codec.encode(images[i]))
            parts += (payload, crc32c(payload).to_bytes(CRC_BYTES, "little"))
            index[i] = (offset, len(payload) + CRC_BYTES)
            offset += len(payload) + CRC_BYTES
    table = index.tobytes()
    if layout.index_crc:
        table += crc32c(table).to_bytes(CRC_BYTES, "little")
    return [*parts, table] if layout.index_at_end else [table, *parts]


def _declared_size(codec_id: str, payload: memoryview) -> int | None:
    """The decoded size a chunk's frame declares, for the codecs whose frame says it."""
    if codec_id == "lz4" and len(payload) >= 4:  # numcodecs' LZ4: a little-endian int32 first
        return int.from_bytes(payload[:4], "little")
    if codec_id == "blosc" and len(payload) >= 16:  # blosc header: nbytes at bytes 4..8
        return int.from_bytes(payload[4:8], "little")
    return None


def check_declared_size(codec_id: str, payload: memoryview, nbytes: int, where: str) -> bool:
    """Refuse a chunk whose frame declares another decoded size than ``nbytes`` (one image);
    False when this codec's frame does not declare it (check the decoded length instead)."""
    declared = _declared_size(codec_id, payload)
    if declared is not None and declared != nbytes:
        raise StoreDamage(f"{where}: chunk decodes to {declared} bytes, not the {nbytes} of one "
                          "image (damaged chunk, or images/zarr.json edited)")  # fmt: skip
    return declared is not None


def decode_into(codec: Any, codec_id: str, payload: memoryview, out: np.ndarray,
                where: str) -> None:  # fmt: skip
    """Decode one chunk into ``out``, every byte of it: numcodecs' decoders fill only what the
    frame holds and leave the rest as it was, so a frame of another size is damage (or an
    array whose dtype or shape was edited), never half an image over uninitialized memory."""
    declared = check_declared_size(codec_id, payload, out.nbytes, where)
    try:
        if declared:
            codec.decode(payload, out=out)
            return
        data = np.frombuffer(codec.decode(payload), dtype=np.uint8)  # size known only after
    except DECODE_ERRORS as e:  # the decoder's own error: bytes that are not a valid frame
        raise StoreDamage(f"{where}: chunk does not decode ({e})") from None
    if data.size != out.nbytes:
        raise StoreDamage(f"{where}: chunk decodes to {data.size} bytes, not the {out.nbytes} "
                          "of one image (damaged chunk, or images/zarr.json edited)")  # fmt: skip
    out.reshape(-1).view(np.uint8)[:] = data
