"""Verified reads: damaged stores are refused with a message naming the file, never read as data.

Each test damages a copy of one converted store the way a user's disk, a careless copy or a
hand edit would, then reads it through every path: the fast reader (torch loader), the raw
chunks the DALI GPU path inflates, ``inspect --verify`` and ``predict``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import make_checkpoint, make_loaddata

from cellmorph.cli import main as cellmorph_main
from cellmorph.config import ConvertConfig
from cellmorph.errors import CellmorphError
from cellmorph.labels import encode_labels
from cellmorph.loaders.reader import ShardReader
from cellmorph.shardfile import StoreDamage
from cellmorph.store import (
    CHUNK_CRC,
    StoreError,
    create_images,
    open_store,
    verify_store,
    write_metadata,
    write_quarantine,
)
from conversion.pack import convert

SHARD = 4  # 12 images: shards 0, 1, 2


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("integrity")
    csv = make_loaddata(root, plates=2, wells=3, sites=2, size=24)
    store = root / "s.zarr"
    convert(ConvertConfig(load_data=str(csv), size=16, shard_size=SHARD, workers=1), store)
    return store


@pytest.fixture
def store(pristine: Path, tmp_path: Path) -> Path:
    """A private copy of the store to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "s.zarr"))


def _shard(store: Path, i: int) -> Path:
    return store / "images" / "c" / str(i) / "0" / "0" / "0"


def _read_all(store: Path) -> np.ndarray:
    return ShardReader(open_store(store), threads=2).read(np.arange(12))


def _inspect_verify(store: Path, capsys) -> tuple[int, list[str], str]:
    rc = cellmorph_main(["inspect", str(store), "--verify"])
    out, err = capsys.readouterr()
    return rc, [line for line in out.splitlines() if line.startswith("row ")], err


def _flip(path: Path, start: int, n: int) -> None:
    raw = bytearray(path.read_bytes())
    for i in range(start, start + n):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_sound_store_reads_and_verifies(store: Path, capsys) -> None:
    got = _read_all(store)
    assert got.shape == (12, 5, 16, 16)
    assert got.min() > 0  # not fill values
    rc, rows, _ = _inspect_verify(store, capsys)
    assert rc == 0 and rows == []
    assert verify_store(open_store(store), progress=False) == []


def test_deleted_shard_is_an_error_everywhere(store: Path, capsys) -> None:
    _shard(store, 1).unlink()
    with pytest.raises(StoreDamage, match=r"images/c/1/0/0/0 is missing"):
        _read_all(store)
    with pytest.raises(StoreDamage, match="missing"):
        ShardReader(open_store(store)).read_raw(np.array([5]))
    rc, rows, err = _inspect_verify(store, capsys)
    assert rc == 2 and len(rows) == SHARD and all("is missing" in r for r in rows)
    assert err.count("\n") == 1 and "4 of 12 images failed verification" in err


def test_flipped_bytes_in_a_chunk_fail_its_crc(store: Path, capsys) -> None:
    _flip(_shard(store, 2), 40, 100)  # inside the first chunk of shard 2 (row 8)
    with pytest.raises(StoreDamage, match=r"row 8\): chunk fails its crc32c"):
        _read_all(store)
    ok = ShardReader(open_store(store)).read(np.array([9, 10, 11]))  # neighbours still read
    np.testing.assert_array_equal(ok, open_store(store).images[9:12])
    rc, rows, _ = _inspect_verify(store, capsys)
    assert rc == 2 and len(rows) == 1 and rows[0].startswith("row 8 ")


def test_flipped_shard_index_is_refused(store: Path) -> None:
    _flip(_shard(store, 0), _shard(store, 0).stat().st_size - 20, 4)
    with pytest.raises(StoreDamage, match="index fails its crc32c"):
        _read_all(store)


def test_swapped_shards_are_other_images_not_silent_data(store: Path, capsys) -> None:
    a, b = _shard(store, 0), _shard(store, 1)
    tmp = a.with_name("tmp")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    with pytest.raises(StoreDamage, match="holds another image's chunk"):
        _read_all(store)
    rc, rows, _ = _inspect_verify(store, capsys)
    assert rc == 2 and len(rows) == 2 * SHARD and all("another image" in r for r in rows)


def test_zero_byte_and_truncated_shards(store: Path, capsys) -> None:
    _shard(store, 0).write_bytes(b"")
    data = _shard(store, 1).read_bytes()
    _shard(store, 1).write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreDamage, match=r"c/0/0/0/0 is truncated \(0 bytes"):
        _read_all(store)
    with pytest.raises(StoreDamage, match=r"c/1/0/0/0"):
        ShardReader(open_store(store)).read(np.array([5]))
    rc, rows, _ = _inspect_verify(store, capsys)
    assert rc == 2 and len(rows) == 2 * SHARD


@pytest.mark.parametrize("edit", ["shuffle", "truncate", "drop_plate", "relabel"])
def test_edited_metadata_is_refused_at_open(store: Path, edit: str, capsys) -> None:
    path = store / "metadata.parquet"
    md = pd.read_parquet(path)
    if edit == "shuffle":
        md.sample(frac=1.0, random_state=1).to_parquet(path, index=False)
    elif edit == "truncate":
        path.write_bytes(path.read_bytes()[:300])
    elif edit == "drop_plate":
        md.drop(columns=["Metadata_Plate"]).to_parquet(path, index=False)
    else:
        md.assign(Metadata_pert_iname="drug0").to_parquet(path, index=False)
    with pytest.raises(
        StoreError, match="metadata.parquet, attrs.channels or the images array changed"
    ):
        open_store(store)
    for argv in (["inspect", str(store)], ["inspect", str(store), "--verify"]):
        assert cellmorph_main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "metadata.parquet" in err and "Traceback" not in err


def _edit_attrs(store: Path, **changes) -> None:
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"].update(changes)
    (store / "zarr.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "channels, message",
    [
        (["ER", "DNA", "RNA", "AGP", "Mito"], "changed after conversion"),  # renamed/reordered
        (["DNA", "ER", "RNA"], "does not name the 5 channels"),
        (["DNA", "DNA", "RNA", "AGP", "Mito"], "once each"),
        ("DNA", "must be a list"),
    ],
)
def test_edited_channel_names_are_refused(store: Path, channels, message: str) -> None:
    _edit_attrs(store, channels=channels)
    with pytest.raises(StoreError, match=message):
        open_store(store)


@pytest.mark.parametrize("version", [1, 3])
def test_older_store_format_asks_for_a_new_conversion(store: Path, version: int) -> None:
    """Format 3 (blake2b image checksums) is refused as older: its checksums are not the ones
    ``inspect --verify`` computes now."""
    _edit_attrs(store, cellmorph_format=version)
    with pytest.raises(
        StoreError, match=rf"format {version} was written by an older cellmorph.*--overwrite"
    ):
        open_store(store)


def test_predict_on_damaged_store_stops_in_one_line_and_writes_nothing(
    store: Path, tmp_path: Path, capsys
) -> None:
    ckpt = make_checkpoint(tmp_path / "best.pt", str(store))
    _flip(_shard(store, 1), 30, 50)
    out = tmp_path / "preds"
    rc = cellmorph_main(
        ["predict", "--checkpoint", str(ckpt), "--store", str(store), "--out", str(out)]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "crc32c" in err and "Traceback" not in err
    assert not any(out.iterdir())  # no predictions.parquet, no temporary files


def test_raw_chunks_for_gpu_inflate_are_checked_and_stripped(tmp_path: Path) -> None:
    """The DALI GPU path inflates what read_raw returns: it must be the checked LZ4 block."""
    pytest.importorskip("numcodecs")
    import numcodecs

    csv = make_loaddata(tmp_path, plates=1, wells=2, sites=2, size=24)
    out = tmp_path / "lz4.zarr"
    convert(ConvertConfig(load_data=str(csv), size=16, shard_size=2, codec="lz4", workers=1), out)
    st = open_store(out)
    reader = ShardReader(st)
    pixels = st.images[:]
    lz4 = numcodecs.LZ4()
    for r, chunk in enumerate(reader.read_raw(np.arange(4))):
        assert int.from_bytes(chunk[:4], "little") == 5 * 16 * 16 * 2  # LZ4 size prefix first
        got = np.frombuffer(lz4.decode(chunk), "<u2").reshape(5, 16, 16)
        np.testing.assert_array_equal(got, pixels[r])  # the crc32c is gone from the end
    _flip(_shard(out, 1), 10, 8)
    with pytest.raises(StoreDamage, match=r"row 2\): chunk fails its crc32c"):
        ShardReader(open_store(out)).read_raw(np.array([2]))


def test_pickled_reader_refuses_another_generation(store: Path, tmp_path: Path) -> None:
    import pickle

    blob = pickle.dumps(ShardReader(open_store(store)))
    _edit_attrs(store, generation="another")  # what a swapped-in store looks like
    with pytest.raises(StoreError, match="was replaced"):
        pickle.loads(blob)


def test_hand_written_store_binds_metadata_and_chunks(tmp_path: Path) -> None:
    """Stores written outside conversion (tests, benchmarks) get the same bindings."""
    path = tmp_path / "h.zarr"
    data = np.random.default_rng(0).integers(0, 4000, (6, 2, 8, 8)).astype(np.uint16)
    data[3] = 0  # an all-zero image is stored, not a hole
    arr = create_images(path, 6, ["a", "b"], 8, shard_size=4)
    arr[0:4], arr[4:6] = data[0:4], data[4:6]
    md = pd.DataFrame({"Metadata_Plate": "P", "Metadata_Well": "A01",
                       "Metadata_Site": range(6), "checksum": ""})  # fmt: skip
    write_metadata(path, md)
    write_quarantine(path, [])
    st = open_store(path)
    assert st.metadata[CHUNK_CRC].dtype == np.uint32
    np.testing.assert_array_equal(ShardReader(st).read(np.arange(6)), data)
    problems = verify_store(st, progress=False)  # checksums were left empty on purpose
    assert len(problems) == 6 and all("image checksum" in p for p in problems)


def test_metadata_is_streamed_to_its_file(tmp_path: Path, monkeypatch) -> None:
    """metadata.parquet goes part by part into its temporary file, never whole into memory
    (3 GB at 75 M cells), and its digest is of the file's bytes; a table with too few rows
    leaves neither the file nor the temporary one."""
    import io

    from cellmorph.store import write as swrite
    from cellmorph.store.layout import DIGEST, METADATA, metadata_digest

    path = tmp_path / "m.zarr"
    create_images(path, 6, ["a"], 8, shard_size=4)
    monkeypatch.setattr(swrite, "METADATA_ROW_GROUP", 2)
    monkeypatch.setattr(io, "BytesIO", None)  # a buffer of the whole file would fail here
    parts = [pd.DataFrame({"Metadata_Plate": "P", "Metadata_Well": "A01",
                           "Metadata_Site": range(i, i + 2), "checksum": "", CHUNK_CRC: 0})
             for i in (0, 2, 4)]  # fmt: skip
    with pytest.raises(StoreError, match="4 metadata rows for 6 images"):
        write_metadata(path, iter(parts[:2]))
    assert sorted(p.name for p in path.iterdir()) == ["images", "zarr.json"]
    write_metadata(path, iter(parts))
    data = (path / METADATA).read_bytes()
    attrs = json.loads((path / "zarr.json").read_text())["attributes"]
    assert attrs[DIGEST] == metadata_digest(data, ["a"], (6, 1, 8, 8))
    monkeypatch.undo()
    write_quarantine(path, [])
    st = open_store(path)
    assert st.metadata["Metadata_Site"].tolist() == list(range(6))


def test_na_like_labels_and_quarantine_text_stay_text(tmp_path: Path) -> None:
    path = tmp_path / "na.zarr"
    labels = ["NA", "None", "null", "nan", "N/A", "#N/A"] * 4
    n = len(labels)
    arr = create_images(path, n, ["a"], 8, shard_size=8)
    for i in range(0, n, 8):
        arr[i : i + 8] = np.full((min(8, n - i), 1, 8, 8), 7, np.uint16)
    md = pd.DataFrame({"Metadata_Plate": "NA", "Metadata_Well": [f"A{i:02d}" for i in range(n)],
                       "Metadata_Site": 1, "checksum": "", "Metadata_pert_iname": labels})  # fmt: skip
    write_metadata(path, md)
    write_quarantine(path, [{"source": "x.tif", "plate": "NA", "well": "None", "site": "",
                             "reason": "null"}])  # fmt: skip
    st = open_store(path)
    assert st.quarantine.iloc[0].to_dict() == {
        "source": "x.tif", "plate": "NA", "well": "None", "site": "", "reason": "null"
    }  # fmt: skip
    assert st.metadata["Metadata_Plate"].tolist() == ["NA"] * n
    classes = sorted(set(labels))
    codes = encode_labels(st.metadata, "Metadata_pert_iname", classes)
    assert (codes >= 0).all()  # six classes, none read as a missing label
    assert [classes[c] for c in codes] == labels


def test_unreadable_store_paths_are_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "file.zarr").write_text("x")
    (tmp_path / "empty.zarr").mkdir()
    for target, message in [
        (tmp_path / "nope.zarr", "no such store"),
        (tmp_path / "file.zarr", "is a file"),
        (tmp_path / "empty.zarr", "no zarr.json"),
    ]:
        assert cellmorph_main(["inspect", str(target)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    with pytest.raises(CellmorphError):
        open_store(tmp_path / "nope.zarr")


def test_hole_in_a_shard_is_missing_not_a_black_image(store: Path, capsys) -> None:
    import google_crc32c

    path = _shard(store, 0)
    raw = bytearray(path.read_bytes())
    tail = len(raw) - (SHARD * 16 + 4)
    index = np.frombuffer(bytes(raw[tail:-4]), "<u8").reshape(-1, 2).copy()
    index[1] = 2**64 - 1  # row 1's chunk "never written", with a valid index crc
    raw[tail:-4] = index.tobytes()
    raw[-4:] = google_crc32c.value(bytes(raw[tail:-4])).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreDamage, match=r"row 1\): chunk missing from its shard"):
        _read_all(store)
    rc, rows, _ = _inspect_verify(store, capsys)
    assert rc == 2 and len(rows) == 1 and "never written" in rows[0]


def test_unreadable_quarantine_and_damaged_manifest_records(store: Path) -> None:
    from conversion.manifest import Manifest

    record = store / ".convert" / "shard-000001.json"
    record.write_bytes(record.read_bytes()[:10])  # a damaged record counts as not done: redone
    assert Manifest(str(store)).shard(1) is None and Manifest(str(store)).shard(0) is not None
    (store / "quarantine.csv").write_bytes(b'"unclosed\n\xff\xfe')
    with pytest.raises(StoreError, match=r"quarantine.csv is not a readable CSV"):
        open_store(store)


def test_image_checksum_is_xxh3_of_the_little_endian_bytes() -> None:
    """The manifest's checksum (docs/integrity.md): xxh3-64 of the image's uint16 values
    little-endian in C order, whatever the array's order or byte order (format 4)."""
    import xxhash

    from cellmorph.store.layout import image_checksum

    img = np.arange(2 * 6 * 5, dtype=np.uint16).reshape(2, 6, 5) * 1000
    want = xxhash.xxh3_64(img.astype("<u2").tobytes()).hexdigest()
    assert len(want) == 16 and want != xxhash.xxh3_64(img.astype(">u2").tobytes()).hexdigest()
    assert image_checksum(img) == want
    assert image_checksum(np.asfortranarray(img)) == want
    assert image_checksum(img.astype(">u2")) == want
    assert image_checksum(np.stack([img, img], axis=-1)[..., 0]) == want  # a strided view
