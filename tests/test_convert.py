"""Conversion: both layouts, channel order by name, alignment, codecs, illumination, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from helpers import (
    CHANNELS,
    FILE_ORDER,
    assert_aligned,
    code,
    make_folder,
    make_loaddata,
)

from cellmorph import cli
from cellmorph.config import ConvertConfig
from cellmorph.errors import CellmorphError
from cellmorph.store import FORMAT_VERSION, open_store
from conversion.pack import convert
from conversion.tiffs import read_file, resize


@pytest.fixture
def plate(tmp_path: Path) -> Path:
    return make_loaddata(tmp_path, plates=2, wells=3, sites=2, size=40)


def test_loaddata_store_matches_contract(plate: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    cfg = ConvertConfig(load_data=str(plate), size=32, shard_size=4, workers=1)
    summary = convert(cfg, out)
    assert summary["images"] == 12 and summary["quarantined"] == 0 and summary["written"] == 12
    st = open_store(out)
    assert st.shape == (12, 5, 32, 32) and st.channels == CHANNELS
    assert st.images.shards == (4, 5, 32, 32) and st.images.chunks == (1, 5, 32, 32)
    assert st.attrs["complete"] is True and st.attrs["cellmorph_format"] == FORMAT_VERSION
    assert set(st.stats) == set(CHANNELS)
    assert {"mean", "std", "p1", "p50", "p99"} <= set(st.stats["DNA"])
    assert st.stats["Mito"]["mean"] > st.stats["DNA"]["mean"]  # Mito's codes are the largest
    md = assert_aligned(out)
    keys = list(zip(md.Metadata_Plate, md.Metadata_Well, md.Metadata_Site))
    assert keys == sorted(keys)
    assert md["source_DNA"].str.endswith("_P0.tiff").sum() == 6
    assert (
        md["Metadata_pert_iname"]
        == md["Metadata_Well"].map({"A01": "drug0", "A02": "drug1", "A03": "drug0"})
    ).all()
    assert not st.quarantine.shape[0]


def test_channel_subset_and_order(plate: Path, tmp_path: Path) -> None:
    chans = ["Mito", "DNA"]
    convert(
        ConvertConfig(load_data=str(plate), channels=chans, size=16, workers=1), tmp_path / "s.zarr"
    )
    assert open_store(tmp_path / "s.zarr").channels == chans
    assert_aligned(tmp_path / "s.zarr", chans)


def test_pool_and_inline_write_identical_bytes(plate: Path, tmp_path: Path) -> None:
    base = dict(load_data=str(plate), size=24, shard_size=5)
    convert(ConvertConfig(**base, workers=1), tmp_path / "a.zarr")
    convert(ConvertConfig(**base, workers=2), tmp_path / "b.zarr")
    files_a = sorted(
        p.relative_to(tmp_path / "a.zarr")
        for p in (tmp_path / "a.zarr/images").rglob("*")
        if p.is_file()
    )
    assert len(files_a) == 4  # zarr.json + 3 shards
    for rel in files_a:
        assert (tmp_path / "a.zarr" / rel).read_bytes() == (
            tmp_path / "b.zarr" / rel
        ).read_bytes(), rel
    pd.testing.assert_frame_equal(
        open_store(tmp_path / "a.zarr").metadata, open_store(tmp_path / "b.zarr").metadata
    )


def test_folder_layout_multipage_by_id(tmp_path: Path) -> None:
    folder, meta = make_folder(tmp_path, n=6)
    (folder / "exp1_IMG099_w.tif").write_bytes(
        (folder / "exp1_IMG000_w.tif").read_bytes()
    )  # no metadata row
    (folder / "notes_w.tif").write_bytes(b"x")  # name without an id
    df = pd.read_csv(meta)
    pd.concat(
        [df, pd.DataFrame([{**df.iloc[0].to_dict(), "image_id": "img777", "sid": 777}])]
    ).to_csv(meta, index=False)
    cfg = ConvertConfig(
        images=str(folder), metadata=str(meta), id_pattern=r"_(IMG\d+)_", id_column="image_id",
        file_channels=FILE_ORDER, size=24, workers=1,
    )  # fmt: skip
    summary = convert(cfg, tmp_path / "f.zarr")
    assert summary["images"] == 6
    md = assert_aligned(tmp_path / "f.zarr")
    assert sorted(md["sid"]) == list(range(6))
    reasons = " | ".join(open_store(tmp_path / "f.zarr").quarantine["reason"])
    assert "no metadata row for id 'img099'" in reasons
    assert "does not match id_pattern" in reasons
    assert "image_id=img777: no file for this id" in reasons


def test_rgb_and_multisample_files_read_channels_first(tmp_path: Path) -> None:
    rgb = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    assert np.array_equal(read_file(str(tmp_path / "rgb.tif")), np.moveaxis(rgb, -1, 0))
    pages = np.arange(4 * 6 * 8, dtype=np.uint16).reshape(4, 6, 8)
    tifffile.imwrite(tmp_path / "pages.tif", pages, photometric="minisblack")
    assert np.array_equal(read_file(str(tmp_path / "pages.tif")), pages)


def test_resize_is_antialiased_and_center_crops() -> None:
    checker = (np.indices((64, 96)).sum(0) % 2 * 1000).astype(np.float32)[None]
    out = resize(checker, 16)
    assert out.shape == (1, 16, 16) and out.dtype == np.uint16
    assert np.all(np.abs(out.astype(int) - 500) <= 60)  # averaged, not aliased to 0 or 1000
    ramp = np.tile(np.arange(96, dtype=np.float32), (64, 1))[None]  # wide: crop keeps x 16..79
    r = resize(ramp, 64)
    assert r[0, 0, 0] == 16 and r[0, 0, -1] == 79


def test_lz4_codec_stores_same_pixels(plate: Path, tmp_path: Path) -> None:
    base = dict(load_data=str(plate), size=16, workers=1)
    convert(ConvertConfig(**base), tmp_path / "z.zarr")
    convert(ConvertConfig(**base, codec="lz4"), tmp_path / "l.zarr")
    a, b = open_store(tmp_path / "z.zarr"), open_store(tmp_path / "l.zarr")
    assert b.attrs["codec"] == "lz4" and "codec_level" not in b.attrs
    # a field store keeps Blosc zstd level 3 (a cell store's is 1: test_cells_convert.py)
    blosc = a.images.metadata.codecs[0].codecs[1]
    assert a.attrs["codec_level"] == blosc.clevel == 3 and blosc.cname.name == "zstd"
    assert np.array_equal(a.images[:], b.images[:])


def test_illumination_correction(plate: Path, tmp_path: Path) -> None:
    illum = tmp_path / "illum"
    illum.mkdir()
    for p in ("P0", "P1"):
        for ch in CHANNELS:
            np.save(illum / f"{p}_Illum{ch}.npy", np.full((40, 40), 2.0 if ch == "DNA" else 1.0))
    cfg = ConvertConfig(load_data=str(plate), size=16, workers=1, illum_dir=str(illum))
    convert(cfg, tmp_path / "s.zarr")
    st = open_store(tmp_path / "s.zarr")
    sid = int(st.metadata.at[0, "sid"])
    assert abs(float(st.images[0, 0].mean()) - (code("DNA", sid) + 1.5) / 2) < 1
    assert abs(float(st.images[0, 1].mean()) - code("ER", sid) - 1.5) < 1
    (illum / "P1_IllumRNA.npy").unlink()
    with pytest.raises(CellmorphError, match="P1_IllumRNA.npy"):
        convert(cfg, tmp_path / "t.zarr")


def test_join_metadata_table(tmp_path: Path) -> None:
    csv = make_loaddata(tmp_path, plates=1, wells=3, sites=2, size=16)
    df = pd.read_csv(csv).drop(columns=["Metadata_pert_iname"])
    df.to_csv(csv, index=False)
    table = pd.DataFrame(
        {"Metadata_Plate": ["P0", "P0", "P0", "P0"], "Metadata_Well": ["A01", "A02", "A03", "A03"],
         "Metadata_pert_iname": ["x", "y", "z", "w"]}
    )  # fmt: skip
    table.to_csv(tmp_path / "meta.csv", index=False)
    cfg = ConvertConfig(
        load_data=str(csv),
        join=str(tmp_path / "meta.csv"),
        join_on=["Metadata_Plate", "Metadata_Well"],
        size=16,
        workers=1,
    )
    summary = convert(cfg, tmp_path / "s.zarr")
    st = open_store(tmp_path / "s.zarr")
    assert summary["images"] == 4 and summary["quarantined"] == 2  # A03 has two labels
    assert dict(zip(st.metadata.Metadata_Well, st.metadata.Metadata_pert_iname)) == {
        "A01": "x",
        "A02": "y",
    }
    assert st.quarantine["reason"].str.contains("several rows in").all()
    assert_aligned(tmp_path / "s.zarr")


def test_refuses_other_job_in_same_out_unless_overwrite(plate: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    convert(ConvertConfig(load_data=str(plate), size=16, workers=1), out)
    with pytest.raises(CellmorphError, match="different inputs or settings.*--overwrite"):
        convert(ConvertConfig(load_data=str(plate), size=24, workers=1), out)
    assert open_store(out).shape[-1] == 16
    convert(ConvertConfig(load_data=str(plate), size=24, workers=1), out, overwrite=True)
    assert open_store(out).shape[-1] == 24
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    for overwrite in (False, True):  # --overwrite replaces stores only, never other folders
        with pytest.raises(CellmorphError, match="is not a cellmorph store; cellmorph never"):
            convert(
                ConvertConfig(load_data=str(plate), size=16, workers=1),
                tmp_path / "other",
                overwrite=overwrite,
            )
    assert (tmp_path / "other" / "keep.txt").read_text() == "x"


def test_cli_convert_inspect_and_one_line_error(plate: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "s.zarr"
    rc = cli.main(
        [
            "convert",
            "--load-data",
            str(plate),
            "--out",
            str(out),
            "--size",
            "16",
            "--workers",
            "1",
            "--channels",
            "DNA,ER",
        ]
    )
    assert rc == 0
    assert "converted 12 images" in capsys.readouterr().out
    assert cli.main(["inspect", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["images"] == 12 and info["channels"] == ["DNA", "ER"] and info["classes"] == 2
    assert info["plates"] == 2 and info["wells"] == 6 and info["quarantined"] == 0
    rc = cli.main(
        [
            "convert",
            "--load-data",
            str(plate),
            "--out",
            str(tmp_path / "x"),
            "--channels",
            "DNA,Foo",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "FileName_OrigFoo" in err and "Traceback" not in err
