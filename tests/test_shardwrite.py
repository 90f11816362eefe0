"""The converter's shard encoder (:func:`cellmorph.shardfile.encode_shard`) writes the file
zarr-python writes for the same rows, byte for byte: every codec the converter offers, both
index locations, a partial last shard and an all-zero image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.codecs import numcodecs as numcodecs_zarr

from cellmorph.shardfile import encode_shard, layout_of, shard_key
from cellmorph.store import write as swrite

pytestmark = pytest.mark.filterwarnings("ignore:Numcodecs codecs are not in the Zarr")

SHARD = 4


def _pixels(n: int, c: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    data = rng.gamma(2.0, 300.0, (n, c, size, size)).astype(np.uint16)
    data[2] = 0  # an all-zero image is written like any other (never a hole)
    return data


def _zarr_files(arr: zarr.Array, root: Path, data: np.ndarray) -> list[bytes]:
    """Each shard file as zarr-python writes it: shard-aligned writes, as conversion did."""
    for start in range(0, len(data), SHARD):
        arr[start : start + SHARD] = data[start : start + SHARD]
    return [(root / shard_key(arr, i)).read_bytes() for i in range(-(-len(data) // SHARD))]


def _encoded(arr: zarr.Array, data: np.ndarray) -> list[bytes]:
    layout = layout_of(arr)
    assert layout is not None and layout.encoder is not None
    return [encode_shard(data[s : s + SHARD], layout) for s in range(0, len(data), SHARD)]


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_converter_codecs_encode_as_zarr_writes(tmp_path: Path, codec: str) -> None:
    # 5 x 96 x 96: a cell crop (several blosc blocks per chunk); 10 rows: the last shard holds 2.
    data = _pixels(10, 5, 96)
    root = tmp_path / "s.zarr"
    arr = swrite.create_images(root, len(data), list("abcde"), 96, codec, SHARD)
    assert _encoded(arr, data) == _zarr_files(arr, root, data)


@pytest.mark.parametrize("index_location", ["end", "start"])
@pytest.mark.parametrize(
    "compressor",
    [
        BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),
        BloscCodec(cname="lz4", clevel=5),
        ZstdCodec(level=3),
        ZstdCodec(level=1, checksum=True),
        numcodecs_zarr.Zstd(level=1),
    ],  # fmt: skip
    ids=["blosc-zstd", "blosc-lz4", "zstd", "zstd-checksum", "numcodecs-zstd"],
)
def test_other_codecs_and_index_at_the_start(tmp_path: Path, compressor, index_location) -> None:
    data = _pixels(7, 3, 20)
    sharding = ShardingCodec(chunk_shape=(1, 3, 20, 20), index_location=index_location,
                             codecs=[BytesCodec(), compressor, Crc32cCodec()])  # fmt: skip
    arr = zarr.create_array(tmp_path, shape=data.shape, chunks=(SHARD, 3, 20, 20),
                            serializer=sharding, compressors=None, dtype="uint16",
                            fill_value=0, zarr_format=3)  # fmt: skip
    arr = arr.with_config({"write_empty_chunks": True})
    assert _encoded(arr, data) == _zarr_files(arr, tmp_path, data)


def test_write_shard_file_is_one_file_read_back_whole(tmp_path: Path) -> None:
    data = _pixels(6, 2, 16)
    ref, out = tmp_path / "ref.zarr", tmp_path / "s.zarr"
    expected = _zarr_files(swrite.create_images(ref, 6, ["a", "b"], 16, "zstd", SHARD), ref, data)
    arr = swrite.create_images(out, 6, ["a", "b"], 16, "zstd", SHARD)
    key = out / shard_key(arr, 1)
    key.parent.mkdir(parents=True)
    stale = key.parent / f".{key.name}.4242.ab12cd34.tmp"  # a killed writer's temporary file
    stale.write_bytes(b"torn")
    swrite.discard_shard(out, arr, 1)
    assert not stale.exists()
    written = [swrite.write_shard_file(out, arr, i, data[s : s + SHARD])
               for i, s in enumerate(range(0, 6, SHARD))]  # fmt: skip
    assert [b"".join(w) for w in written] == expected
    assert [(out / shard_key(arr, i)).read_bytes() for i in (0, 1)] == expected
    assert np.array_equal(zarr.open_array(out / "images", mode="r")[:], data)
    crcs = swrite.shard_chunk_crcs(out, arr, 1, 2, written[1])
    # The encoder's crcs, read without recomputing them, are those recomputed and checked.
    assert len(crcs) == 2 and crcs == swrite.shard_chunk_crcs(out, arr, 1, 2)
    with pytest.raises(swrite.StoreDamage, match="not the one just written"):
        swrite.shard_chunk_crcs(out, arr, 1, 2, written[0])


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_finish_reads_its_sample_as_zarr_does(tmp_path: Path, codec: str) -> None:
    """``finish``'s sample comes from the shard files (conversion.shards.read_rows): the rows
    zarr returns, any order, across shards and the partial last one; a damaged chunk stops."""
    from conversion.shards import read_rows

    data = _pixels(10, 3, 16)
    root = tmp_path / "s.zarr"
    arr = swrite.create_images(root, len(data), ["a", "b", "c"], 16, codec, SHARD)
    for i, start in enumerate(range(0, len(data), SHARD)):
        swrite.write_shard_file(root, arr, i, data[start : start + SHARD])
    rows = np.array([9, 0, 2, 5, 4, 8])
    assert np.array_equal(read_rows(str(root), arr, rows), data[rows])
    key = root / shard_key(arr, 1)
    raw = bytearray(key.read_bytes())
    raw[10] ^= 0xFF  # inside row 4's chunk (the index is at the end)
    key.write_bytes(bytes(raw))
    with pytest.raises(swrite.StoreDamage, match=r"row 4\).*crc32c"):
        read_rows(str(root), arr, rows)


def test_a_short_writev_is_resumed_where_it_stopped(tmp_path: Path, monkeypatch) -> None:
    """The shard's pieces go to the file a writev at a time; a write the kernel cuts short
    (a signal, a full pipe) goes on from the byte it stopped at, mid-piece or not."""
    import os

    parts = [bytes([i]) * n for i, n in enumerate([5, 0, 3, 11, 1, 7])]
    real = os.writev
    calls = []

    def short(fd: int, buffers) -> int:
        calls.append(len(buffers))
        return real(fd, [memoryview(b"".join(bytes(b) for b in buffers))[:4]])

    monkeypatch.setattr(os, "writev", short)
    monkeypatch.setattr(swrite, "_IOV_MAX", 2)
    swrite._writev_file(tmp_path / "f", parts)
    assert (tmp_path / "f").read_bytes() == b"".join(parts)
    assert len(calls) == 7 and max(calls) == 2  # 27 bytes, 4 a call, at most 2 pieces a call
