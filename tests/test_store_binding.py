"""What binds a store's own description, and what readers trust besides the store.

- ``attrs.store_digest``: a hand edit of ``images/zarr.json`` (dtype, shape, chunking, codec) or of
  an attribute (statistics, channels, label column...) is refused at open, naming what changed;
- the fast reader never hands out memory a decode did not fill;
- the node-shared metadata cache is private to the user and checked against its checksum;
- a shard path that is a folder is damage, named; ``run_root`` never lies inside the store.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

import numcodecs
import numpy as np
import pyarrow as pa
import pyarrow.ipc as paipc
import pytest
import zarr
from helpers import make_checkpoint, make_loaddata

from cellmorph import store as cstore
from cellmorph.cli import main as cellmorph_main
from cellmorph.config import ConvertConfig
from cellmorph.errors import CellmorphError
from cellmorph.launch import check_run_root_outside_store, preflight
from cellmorph.loaders.reader import ShardReader
from cellmorph.shardfile import StoreDamage, decode_into
from cellmorph.store import StoreError, open_store
from conversion.pack import convert

LABEL = "Metadata_pert_iname"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("binding")
    csv = make_loaddata(root, plates=2, wells=3, sites=2, size=24)
    store = root / "s.zarr"
    convert(ConvertConfig(load_data=str(csv), size=16, shard_size=4, workers=1), store)
    return store


@pytest.fixture
def store(pristine: Path, tmp_path: Path) -> Path:
    """A private copy of the store to edit."""
    return Path(shutil.copytree(pristine, tmp_path / "s.zarr"))


def _edit_json(path: Path, edit) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta, indent=2))


def _sharding(meta: dict) -> dict:
    return meta["codecs"][0]["configuration"]


ARRAY_EDITS = {
    "data_type": (lambda m: m.update(data_type="uint32"), "data_type"),
    "shape": (lambda m: m.update(shape=[12, 5, 16, 8]), "shape"),
    "chunk_shape": (
        lambda m: m["chunk_grid"]["configuration"].update(chunk_shape=[2, 5, 16, 16]),
        "chunk_grid",
    ),  # fmt: skip
    "codec": (lambda m: _sharding(m)["codecs"][1]["configuration"].update(clevel=9), "codecs"),
    "fill_value": (lambda m: m.update(fill_value=7), "fill_value"),
}


@pytest.mark.parametrize("name", list(ARRAY_EDITS))
def test_an_edited_array_description_is_refused(store: Path, name: str) -> None:
    edit, field = ARRAY_EDITS[name]
    _edit_json(store / "images" / "zarr.json", edit)
    with pytest.raises(StoreError, match=rf"images/zarr.json.*{field}") as e:
        open_store(store)
    assert "\n" not in str(e.value)


def _stats(a: dict) -> None:
    channel = next(iter(a["stats"]))
    a["stats"][channel]["mean"] += 1.0


ATTR_EDITS = {
    "stats": (_stats, "attrs.stats changed"),
    "plate_stats": (lambda a: a.update(plate_stats={}), "attrs.plate_stats changed"),
    "label_column": (lambda a: a.update(label_column="Metadata_Well"), "attrs.label_column"),
    "size": (lambda a: a.update(size=32), "attrs.size changed"),
    "negcon": (lambda a: a.update(negcon="Metadata_pert_iname=drug0"), "attrs.negcon changed"),
    "added": (lambda a: a.update(extra=1), "attrs.extra changed"),
    "removed": (lambda a: a.pop("codec"), "attrs.codec changed"),
    "no digest": (lambda a: a.pop("store_digest"), "attrs.store_digest"),
}


@pytest.mark.parametrize("name", list(ATTR_EDITS))
def test_an_edited_attribute_is_refused(store: Path, name: str) -> None:
    edit, message = ATTR_EDITS[name]
    _edit_json(store / "zarr.json", lambda m: edit(m["attributes"]))
    with pytest.raises(StoreError, match=message):
        open_store(store)
    with pytest.raises(StoreError, match=message):  # the shared-columns path too
        open_store(store, columns=[LABEL])


def test_only_formatting_of_the_description_may_change(store: Path) -> None:
    for name in ("zarr.json", "images/zarr.json"):  # same JSON, other layout
        (store / name).write_text(json.dumps(json.loads((store / name).read_text())))
    assert len(open_store(store)) == 12


def test_verify_and_predict_refuse_an_edited_dtype(store: Path, tmp_path: Path, capsys) -> None:
    """The reported case: uint16 -> uint32 was verified by inspect and predicted on."""
    ckpt = make_checkpoint(tmp_path / "best.pt", str(store))
    _edit_json(store / "images" / "zarr.json", lambda m: m.update(data_type="uint32"))
    assert cellmorph_main(["inspect", str(store), "--verify"]) == 2
    out = tmp_path / "preds"
    rc = cellmorph_main(
        ["predict", "--checkpoint", str(ckpt), "--store", str(store), "--out", str(out)]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.count("data_type is uint32") == 2 and "Traceback" not in err


def test_the_reader_never_hands_out_an_underfilled_image(store: Path) -> None:
    """A reader of the bare array (no open_store) of a uint32-edited store: each chunk decodes
    to half an image, which is damage, not an image half made of uninitialized memory."""
    _edit_json(store / "images" / "zarr.json", lambda m: m.update(data_type="uint32"))
    arr = zarr.open_array(str(store), path="images", mode="r")
    with pytest.raises(StoreDamage, match=r"c/0/0/0/0 \(row 0\): chunk decodes to 2560 bytes"):
        ShardReader(arr).read(np.array([0, 1]))
    with pytest.raises(StoreDamage, match="decodes to 2560 bytes, not the 5120"):  # GPU inflate
        ShardReader(arr).read_raw(np.array([0]))


@pytest.mark.parametrize(
    "codec", [numcodecs.LZ4(), numcodecs.Blosc(cname="zstd"), numcodecs.Zstd()], ids=str
)
def test_a_decode_that_underfills_is_damage(codec) -> None:
    image = np.arange(2 * 8 * 8, dtype="<u2").reshape(2, 8, 8)
    cid = codec.get_config()["id"]
    out = np.empty_like(image)
    decode_into(codec, cid, memoryview(codec.encode(image)), out, "s/c/0")
    np.testing.assert_array_equal(out, image)
    half = memoryview(codec.encode(image[:1]))
    with pytest.raises(StoreDamage, match=r"s/c/0: chunk decodes to 128 bytes, not the 256"):
        decode_into(codec, cid, half, out, "s/c/0")
    with pytest.raises(StoreDamage, match="decodes to 512 bytes"):  # over-long: never cut
        decode_into(codec, cid, memoryview(codec.encode(np.tile(image, 2))), out, "s/c/0")


# ------------------------------------------------------------------ the node-shared metadata cache


@pytest.fixture
def node_tmp(tmp_path: Path, monkeypatch) -> Path:
    """This test's own temporary folder, where the node-wide cache folder is made."""
    (tmp_path / "node-tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "node-tmp"))
    return tmp_path / "node-tmp"


def _cache_files(node_tmp: Path) -> list[Path]:
    return sorted((node_tmp / cstore.SHARED_CACHE).glob("*.arrow"))


def _relabel_cache(path: Path) -> None:
    """What a user (or another user, on a shared node) editing the cached labels does."""
    table = paipc.open_file(pa.memory_map(str(path))).read_all()
    labels = pa.array(["drugX"] * len(table))
    table = table.set_column(table.schema.get_field_index(LABEL), LABEL, labels)
    path.unlink()
    with paipc.new_file(str(path), table.schema) as w:
        w.write_table(table)


def _mapped(path: Path) -> bool:
    return str(path) in Path("/proc/self/maps").read_text()


def test_the_cache_folder_is_private(store: Path, node_tmp: Path) -> None:
    open_store(store, columns=[LABEL])
    folder = node_tmp / cstore.SHARED_CACHE
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and folder.stat().st_uid == os.getuid()


def test_an_edited_cache_is_caught_and_rebuilt_from_the_store(store: Path, node_tmp: Path,
                                                               caplog) -> None:  # fmt: skip
    truth = open_store(store).metadata[LABEL].tolist()
    open_store(store, columns=[LABEL])
    (cache,) = _cache_files(node_tmp)
    _relabel_cache(cache)
    again = open_store(store, columns=[LABEL])
    assert again.metadata[LABEL].tolist() == truth
    assert "fails its checksum" in caplog.text
    (rebuilt,) = _cache_files(node_tmp)
    assert _mapped(rebuilt)  # still shared: the rebuilt file is the one mapped


def test_bytes_flipped_in_the_cache_are_caught(store: Path, node_tmp: Path) -> None:
    truth = open_store(store).metadata[LABEL].tolist()
    open_store(store, columns=[LABEL])
    (cache,) = _cache_files(node_tmp)
    raw = bytearray(cache.read_bytes())
    at = raw.find(b"drug1")
    raw[at : at + 5] = b"drug0"  # same size, still a readable Arrow file
    cache.unlink()  # a new inode: this process still maps the old one
    cache.write_bytes(bytes(raw))
    assert open_store(store, columns=[LABEL]).metadata[LABEL].tolist() == truth


@pytest.mark.parametrize("how", ["open to others", "another owner"])
def test_a_cache_folder_not_private_to_the_user_is_not_used(store: Path, node_tmp: Path, how: str,
                                                            monkeypatch, caplog) -> None:  # fmt: skip
    truth = open_store(store).metadata[LABEL].tolist()
    open_store(store, columns=[LABEL])
    (cache,) = _cache_files(node_tmp)
    _relabel_cache(cache)  # what the other user planted
    folder = node_tmp / cstore.SHARED_CACHE
    if how == "open to others":
        folder.chmod(0o777)
    else:  # as if another user had made the folder first
        monkeypatch.setattr(os, "getuid", lambda: os.stat(folder).st_uid + 1)
    with caplog.at_level(logging.WARNING):
        got = open_store(store, columns=[LABEL])
    assert got.metadata[LABEL].tolist() == truth
    assert not _mapped(cache) and "not private to this user" in caplog.text


# ------------------------------------------------------------------------- a shard that is a folder


def test_a_shard_path_that_is_a_folder_is_damage(store: Path, capsys) -> None:
    shard = store / "images" / "c" / "1" / "0" / "0" / "0"
    shard.unlink()
    shard.mkdir()
    with pytest.raises(StoreDamage, match=r"images/c/1/0/0/0 is a folder"):
        ShardReader(open_store(store)).read(np.arange(12))
    assert cellmorph_main(["inspect", str(store), "--verify"]) == 2
    out, err = capsys.readouterr()
    rows = [line for line in out.splitlines() if line.startswith("row ")]
    assert len(rows) == 4 and all("images/c/1/0/0/0 is a folder" in r for r in rows)
    assert "Traceback" not in err


# ----------------------------------------------------------------------- run_root outside the store


@pytest.mark.parametrize("where", ["the store", "inside", "through a link"])
def test_run_root_inside_the_store_is_refused_before_training(small_cfg, tiny_plate: Path,
                                                              tmp_path: Path, where: str) -> None:  # fmt: skip
    from cellmorph.train import run_local

    (tmp_path / "link").symlink_to(tiny_plate)
    root = {"the store": tiny_plate, "inside": tiny_plate / "runs",
            "through a link": tmp_path / "link" / "runs"}[where]  # fmt: skip
    cfg = small_cfg("inside", f"run_root={root}", "train.epochs=1")
    for start in (preflight, run_local):  # Ray runs, then `cellmorph train --local`
        with pytest.raises(CellmorphError, match=r"run_root: .* is inside the store"):
            start(cfg)
    assert not (tiny_plate / "runs").exists()


def test_run_root_beside_the_store_is_accepted(small_cfg, tiny_plate: Path) -> None:
    check_run_root_outside_store(small_cfg("beside", f"run_root={tiny_plate}-runs"))
    check_run_root_outside_store(small_cfg("parent", f"run_root={tiny_plate.parent}"))


@pytest.mark.parametrize(
    "run_root, refused",
    [
        ("s3://bucket/plates.zarr/runs", True),
        ("s3://bucket/plates.zarr", True),
        ("s3://bucket/plates.zarr-runs", False),
        ("s3://bucket/runs", False),
        ("s3://other/plates.zarr/runs", False),
    ],
)
def test_run_root_inside_a_store_prefix_is_refused(small_cfg, run_root: str, refused: bool) -> None:
    cfg = small_cfg("url", f"run_root={run_root}", "data.store=s3://bucket/plates.zarr")
    if refused:
        with pytest.raises(CellmorphError, match="run_root: s3://bucket/plates.zarr"):
            check_run_root_outside_store(cfg)
    else:
        check_run_root_outside_store(cfg)
