"""ShardReader: the fast shard read path must return exactly what zarr-python returns, and
refuse what zarr-python would refuse (or silently fill)."""

from __future__ import annotations

import pickle

import numcodecs
import numpy as np
import pytest
import zarr

from cellmorph import store as st
from cellmorph.errors import CellmorphError
from cellmorph.loaders.reader import ShardReader

pytestmark = pytest.mark.filterwarnings("ignore:Numcodecs codecs are not in the Zarr")

N, C, S, SHARD = 45, 3, 12, 8


def _pixels(n: int = N) -> np.ndarray:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 4096, (n, C, S, S)).astype(np.uint16)
    data[9] = 0  # an all-zero image: its chunk is written like any other (never a hole)
    return data


def _sharded(tmp_path, codec: str, data: np.ndarray, skip_shard: int | None = None) -> zarr.Array:
    arr = st.create_images(tmp_path / "s.zarr", len(data), ["a", "b", "c"], S, codec, SHARD)
    for i in range(0, len(data), SHARD):  # shard-aligned writes, the last shard partial
        if i // SHARD != skip_shard:
            arr[i : i + SHARD] = data[i : i + SHARD]
    return arr


def _unsharded(tmp_path, codec: str, data: np.ndarray) -> zarr.Array:
    arr = zarr.create_array(
        str(tmp_path / "u.zarr"),
        shape=data.shape,
        chunks=(1, C, S, S),
        dtype="uint16",
        compressors=st.compressor_for(codec),
        fill_value=0,
    )
    arr[:] = data
    return arr


def _rows() -> np.ndarray:
    rng = np.random.default_rng(1)
    # random rows across every shard, repeats, the partial last shard, the all-zero image
    return np.concatenate([rng.integers(0, N, 60), [44, 0, 44, 9, 8, 7, 9]])


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
@pytest.mark.parametrize("sharded", [True, False])
def test_read_equals_zarr(tmp_path, codec, sharded):
    data = _pixels()
    arr = _sharded(tmp_path, codec, data) if sharded else _unsharded(tmp_path, codec, data)
    reader = ShardReader(arr, threads=2)
    assert reader.fast is sharded  # unsharded arrays go through zarr-python
    rows = _rows()
    got = reader.read(rows)
    assert got.dtype == np.uint16 and got.shape == (len(rows), C, S, S)
    np.testing.assert_array_equal(got, arr.oindex[rows])
    np.testing.assert_array_equal(got, data[rows])
    np.testing.assert_array_equal(reader.read(np.arange(N)), arr[:])  # contiguous, all shards
    assert reader.read(np.array([], dtype=np.int64)).shape == (0, C, S, S)


@pytest.mark.parametrize("threads", [1, 3])
def test_missing_shard_is_an_error_never_zeros(tmp_path, threads):
    data = _pixels()
    arr = _sharded(tmp_path, "zstd", data, skip_shard=2)
    reader = ShardReader(arr, threads=threads)
    np.testing.assert_array_equal(reader.read(np.arange(16)), data[:16])  # other shards read
    with pytest.raises(CellmorphError, match=r"images/c/2/0/0/0 is missing"):
        reader.read(_rows())
    with pytest.raises(CellmorphError, match=r"images/c/2/0/0/0 is missing"):
        reader.read_raw(np.array([17]))


def test_all_zero_image_is_stored_not_a_hole(tmp_path):
    arr = _sharded(tmp_path, "zstd", _pixels())
    shard = (tmp_path / "s.zarr" / "images" / "c" / "1" / "0" / "0" / "0").read_bytes()
    index = np.frombuffer(shard[-(SHARD * 16 + 4) : -4], dtype="<u8").reshape(-1, 2)
    assert (index[:, 0] != 2**64 - 1).all()  # row 9 (all zero) has its chunk
    assert not ShardReader(arr).read(np.array([9])).any()


def test_read_raw_is_the_stored_lz4_chunk(tmp_path):
    data = _pixels()
    arr = _sharded(tmp_path, "lz4", data)
    reader = ShardReader(arr)
    assert reader.codec_id == "lz4"
    rows = np.array([17, 3, 9, 44, 17])
    lz4 = numcodecs.LZ4()
    for r, raw in zip(rows, reader.read_raw(rows)):
        # the chunk's crc32c is checked and removed; numcodecs frames an LZ4 block with its
        # uncompressed size (stripped for DALI inflate)
        assert int.from_bytes(raw[:4], "little") == C * S * S * 2
        decoded = np.frombuffer(lz4.decode(raw), dtype="<u2").reshape(C, S, S)
        np.testing.assert_array_equal(decoded, data[r])


def test_pickled_reader_reopens_the_array(tmp_path):
    data = _pixels()
    arr = _sharded(tmp_path, "zstd", data)
    reader = pickle.loads(pickle.dumps(ShardReader(arr)))
    assert reader.fast
    rows = _rows()
    np.testing.assert_array_equal(reader.read(rows), data[rows])


def test_bad_rows_and_corrupt_index_are_reported(tmp_path):
    data = _pixels()
    arr = _sharded(tmp_path, "lz4", data)
    with pytest.raises(CellmorphError, match="row 45 outside"):
        ShardReader(arr).read(np.array([1, 45]))
    shard = next((tmp_path / "s.zarr" / "images").rglob("c/1/0/0/0"))
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF  # flip bits inside the index
    shard.write_bytes(bytes(raw))
    with pytest.raises(CellmorphError, match="crc32c"):
        ShardReader(arr).read(np.array([9]))
