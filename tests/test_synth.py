"""The synthetic plate: layout and files as the JUMP pilot publishes them, and biology that is
learnable (treatments differ) but not trivially (a well effect and weak treatments)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from scipy import ndimage

from cellmorph import synth
from cellmorph.config import SynthConfig
from cellmorph.errors import CellmorphError

CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]
SMALL = {"plates": 1, "rows": 2, "cols": 5, "sites": 2, "size": 64}


@pytest.fixture(scope="module")
def plate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    """The default demo plate (2 plates x 4 x 6 wells x 4 sites at 96 px)."""
    out = tmp_path_factory.mktemp("synth") / "raw"
    csv = synth.generate_plate(SynthConfig(out=str(out)), progress=False)
    return csv, pd.read_csv(csv)


def _read(csv: Path, row: pd.Series, channel: str) -> np.ndarray:
    return tifffile.imread(
        csv.parent / row[f"PathName_Orig{channel}"] / row[f"FileName_Orig{channel}"]
    )


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _nuclei(dna: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nucleus mask and per-nucleus areas from a DNA image (threshold between offset and peak)."""
    img = dna.astype(np.float32)
    mask = img > synth.CAMERA_OFFSET + 0.3 * (np.percentile(img, 99.5) - synth.CAMERA_OFFSET)
    labels, n = ndimage.label(mask)
    return mask, np.bincount(labels.ravel())[1:]


def test_same_settings_give_identical_bytes_and_seed_changes_them(tmp_path: Path) -> None:
    a = synth.generate_plate(SynthConfig(out=str(tmp_path / "a"), **SMALL), progress=False)
    b = synth.generate_plate(SynthConfig(out=str(tmp_path / "b"), **SMALL), progress=False)
    c = synth.generate_plate(SynthConfig(out=str(tmp_path / "c"), seed=1, **SMALL), progress=False)
    tree_a, tree_b, tree_c = _tree(a.parent), _tree(b.parent), _tree(c.parent)
    assert len(tree_a) == 1 + 1 + 2 * 5 * 2 * 5  # csv, synth.json, TIFFs
    assert tree_a == tree_b
    assert tree_a.keys() == tree_c.keys()
    differing = [k for k in tree_a if k.endswith(".tiff") and tree_a[k] != tree_c[k]]
    assert len(differing) == 2 * 5 * 2 * 5


def test_csv_columns_and_phenix_file_names(plate: tuple[Path, pd.DataFrame]) -> None:
    csv, df = plate
    meta = ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]
    labels = ["Metadata_pert_iname", "Metadata_broad_sample", "Metadata_control_type"]
    files = [f"{k}_Orig{c}" for k in ("FileName", "PathName") for c in CHANNELS]
    assert sorted(df.columns) == sorted(meta + labels + files)
    assert len(df) == 2 * 4 * 6 * 4
    assert df["Metadata_Well"].str.fullmatch(r"[A-D]0[1-6]").all()
    assert sorted(df["Metadata_Site"].unique()) == [1, 2, 3, 4]
    ch_number = {"Mito": 1, "AGP": 2, "RNA": 3, "ER": 4, "DNA": 5}
    pattern = re.compile(r"r(\d\d)c(\d\d)f(\d\d)p01-ch(\d)sk1fk1fl1\.tiff")
    for _, row in df.sample(20, random_state=0).iterrows():
        for ch in CHANNELS:
            m = pattern.fullmatch(row[f"FileName_Orig{ch}"])
            assert m, row[f"FileName_Orig{ch}"]
            r, c, f, n = (int(g) for g in m.groups())
            assert row["Metadata_Well"] == f"{'ABCD'[r - 1]}{c:02d}"
            assert (f, n) == (row["Metadata_Site"], ch_number[ch])
            assert row[f"PathName_Orig{ch}"] == f"{row['Metadata_Plate']}/Images"
            assert (csv.parent / row[f"PathName_Orig{ch}"] / row[f"FileName_Orig{ch}"]).is_file()
    dmso = df[df["Metadata_pert_iname"] == "DMSO"]
    assert (dmso["Metadata_control_type"] == "negcon").all()
    assert (dmso["Metadata_broad_sample"] == "DMSO").all()
    assert (df.loc[df.index.difference(dmso.index), "Metadata_control_type"] != "negcon").all()
    settings = json.loads((csv.parent / "synth.json").read_text())
    assert settings["seed"] == 0 and settings["size"] == 96 and settings["complete"] is True
    assert "out" not in settings  # the same settings elsewhere give the same bytes


def test_tiffs_are_uncompressed_uint16_of_the_configured_size(
    plate: tuple[Path, pd.DataFrame], tmp_path: Path
) -> None:
    csv, df = plate
    path = csv.parent / df.iloc[0]["PathName_OrigER"] / df.iloc[0]["FileName_OrigER"]
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert page.dtype == np.uint16 and page.shape == (96, 96)
        assert page.compression == tifffile.COMPRESSION.NONE
    # The pilot's size works too (one site).
    big = synth.generate_plate(
        SynthConfig(out=str(tmp_path), plates=1, rows=1, cols=1, sites=1, size=1080),
        progress=False,
    )
    row = pd.read_csv(big).iloc[0]
    dna = _read(big, row, "DNA")
    assert dna.dtype == np.uint16 and dna.shape == (1080, 1080)
    assert 0.02 < _nuclei(dna)[0].mean() < 0.5


def test_each_channel_column_points_at_that_channel(plate: tuple[Path, pd.DataFrame]) -> None:
    csv, df = plate
    for _, row in df[df["Metadata_pert_iname"] == "DMSO"].head(6).iterrows():
        img = {ch: _read(csv, row, ch).astype(np.float64) for ch in CHANNELS}
        nucleus, areas = _nuclei(img["DNA"])
        # DNA: nuclei, i.e. big compact blobs (about 50 px at 96 px); Mito: puncta of a few px.
        assert np.median(areas) > 20
        assert np.median(_nuclei(img["Mito"])[1]) < 8
        # Zones around each nucleus: right next to it, and out where the cell ends.
        near = ndimage.binary_dilation(nucleus, iterations=2) & ~nucleus
        far = ndimage.binary_dilation(nucleus, iterations=6)
        far &= ~ndimage.binary_dilation(nucleus, iterations=4)
        ratio = {ch: img[ch][near].mean() / img[ch][far].mean() for ch in CHANNELS}
        inside = {ch: img[ch][nucleus].mean() / img[ch][near].mean() for ch in CHANNELS}
        assert inside["DNA"] > 3
        assert ratio["ER"] > 1.3  # perinuclear ER
        assert ratio["AGP"] < 1.0  # cortical actin and membrane at the cell edge
        assert inside["RNA"] > 1.5 * inside["ER"]  # nucleoli; ER stays out of the nucleus
        assert inside["Mito"] < 1.0


def test_dmso_is_largest_class_and_some_classes_are_rare(plate: tuple[Path, pd.DataFrame]) -> None:
    _, df = plate
    wells = df.groupby(["Metadata_Plate", "Metadata_pert_iname"])["Metadata_Well"].nunique()
    per_plate = wells.xs("SYNP01", level="Metadata_Plate")
    assert len(per_plate) == len(synth.TREATMENTS) >= 8
    assert per_plate.idxmax() == "DMSO" and per_plate["DMSO"] > per_plate.drop("DMSO").max()
    assert (per_plate == 1).sum() >= 1
    sites = df["Metadata_pert_iname"].value_counts()
    assert sites["DMSO"] >= 4 * sites.min()


def test_well_counts_fill_any_plate_size() -> None:
    for n in (1, 5, 9, 10, 24, 96, 384):
        counts = synth._well_counts(n)
        assert sum(c for _, c in counts) == n
        assert counts[0][0].name == "DMSO"
        if n >= len(synth.TREATMENTS) + 10:
            assert counts[0][1] == max(c for _, c in counts)
    assert len(synth.plate_layout(2, 2, seed=0)) == 4
    assert synth.plate_layout(4, 6, seed=0) != synth.plate_layout(4, 6, seed=1)


def test_same_treatment_in_same_well_on_every_plate(plate: tuple[Path, pd.DataFrame]) -> None:
    _, df = plate
    per_well = df.groupby("Metadata_Well")["Metadata_pert_iname"].nunique()
    assert (per_well == 1).all()
    assert df.groupby("Metadata_Plate")["Metadata_Well"].nunique().tolist() == [24, 24]


def _site_features(csv: Path, df: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, row in df.iterrows():
        dna = _read(csv, row, "DNA").astype(np.float32)
        mito = _read(csv, row, "Mito").astype(np.float32)
        mask, areas = _nuclei(dna)
        rows.append(
            {
                "area": areas.mean(),
                "dna_bright": np.median(dna[mask]),
                "mito_p99": np.percentile(mito, 99.5),
            }
        )
    return pd.concat([df.reset_index(drop=True), pd.DataFrame(rows)], axis=1)


def test_treatments_differ_by_their_strength(plate: tuple[Path, pd.DataFrame]) -> None:
    csv, df = plate
    names = ["DMSO", "AMG900", "FK-866", "quinidine", "dexamethasone"]
    feats = _site_features(csv, df[df["Metadata_pert_iname"].isin(names)])
    mean = feats.groupby("Metadata_pert_iname")[["area", "mito_p99"]].mean()
    # Strong effects: giant nuclei (AMG900), dim, sparse mitochondria (FK-866).
    assert mean.loc["AMG900", "area"] > 1.5 * mean.loc["DMSO", "area"]
    assert mean.loc["FK-866", "mito_p99"] < 0.85 * mean.loc["DMSO", "mito_p99"]
    # Weak treatments stay near DMSO on nuclear size.
    for weak in ("quinidine", "dexamethasone"):
        assert abs(mean.loc[weak, "area"] / mean.loc["DMSO", "area"] - 1) < 0.2


def test_sites_of_one_well_are_more_alike_than_wells(plate: tuple[Path, pd.DataFrame]) -> None:
    csv, df = plate
    dmso = df[(df["Metadata_pert_iname"] == "DMSO") & (df["Metadata_Plate"] == "SYNP01")]
    feats = _site_features(csv, dmso)
    groups = feats.groupby("Metadata_Well")["dna_bright"]
    n_sites = groups.size().iloc[0]
    # One-way ANOVA F: variance of well means against what site noise alone would give.
    f_stat = groups.mean().var() / (groups.var().mean() / n_sites)
    assert groups.ngroups >= 4
    assert f_stat > 5, f_stat


def test_second_call_with_same_settings_reuses_files(tmp_path: Path) -> None:
    cfg = SynthConfig(out=str(tmp_path), **SMALL)
    csv = synth.generate_plate(cfg, progress=False)
    tiff = next((tmp_path / "SYNP01" / "Images").glob("*.tiff"))
    stamp = (csv.stat().st_mtime_ns, tiff.stat().st_mtime_ns)
    assert synth.generate_plate(cfg, progress=False) == csv
    assert (csv.stat().st_mtime_ns, tiff.stat().st_mtime_ns) == stamp
    before = tiff.read_bytes()
    synth.generate_plate(SynthConfig(out=str(tmp_path), seed=3, **SMALL), progress=False)
    assert tiff.read_bytes() != before
    assert json.loads((tmp_path / "synth.json").read_text())["seed"] == 3


def test_interrupted_run_is_redone(tmp_path: Path) -> None:
    cfg = SynthConfig(out=str(tmp_path), **SMALL)
    csv = synth.generate_plate(cfg, progress=False)
    tiff = next((tmp_path / "SYNP01" / "Images").glob("*.tiff"))
    good = tiff.read_bytes()
    settings = json.loads((tmp_path / "synth.json").read_text())
    assert settings["complete"] is True
    # What a run killed before its CSV was written leaves behind.
    tiff.write_bytes(b"half")
    (tmp_path / "synth.json").write_text(json.dumps({**settings, "complete": False}))
    assert synth.generate_plate(cfg, progress=False) == csv
    assert tiff.read_bytes() == good


def test_out_that_is_a_file_or_foreign_data_is_a_clear_error(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.write_text("x")
    with pytest.raises(CellmorphError, match="taken"):
        synth.generate_plate(SynthConfig(out=str(target), **SMALL), progress=False)
    real = tmp_path / "real"
    real.mkdir()
    (real / "load_data.csv").write_text("Metadata_Plate\nBR00116991\n")
    with pytest.raises(CellmorphError, match="did not write"):
        synth.generate_plate(SynthConfig(out=str(real), **SMALL), progress=False)
    assert (real / "load_data.csv").read_text() == "Metadata_Plate\nBR00116991\n"


def _parser() -> argparse.ArgumentParser:
    from cellmorph.cli import build_parser

    return build_parser()


def test_cli_writes_plate_and_prints_counts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["synth", str(tmp_path / "p"), "--plates", "1", "--rows", "3", "--cols", "4"]
    args = _parser().parse_args([*argv, "--sites", "1", "--size", "48", "--seed", "5"])
    assert args.func(args) == 0
    out, err = capsys.readouterr()
    csv = tmp_path / "p" / "load_data.csv"
    assert out.splitlines()[0] == str(csv)
    assert "12 sites (60 TIFFs), 1 plates, 12 wells" in out
    assert re.search(r"^DMSO\s+\d+\s+\d+$", out, re.MULTILINE)
    assert "img" in err  # the progress bar
    assert json.loads((tmp_path / "p" / "synth.json").read_text())["seed"] == 5
    assert tifffile.imread(next((tmp_path / "p" / "SYNP01" / "Images").iterdir())).shape == (48, 48)


def test_cli_rejects_bad_sizes_naming_the_option(tmp_path: Path) -> None:
    args = _parser().parse_args(["synth", str(tmp_path), "--rows", "40"])
    with pytest.raises(CellmorphError, match=r"synth\.rows"):
        args.func(args)


def test_demo_store_follows_a_regenerated_plate(tmp_path: Path) -> None:
    """A plate regenerated with new settings has the same sites and file names as before: the
    demo must rebuild its store rather than take the old one as finished."""
    from cellmorph.config import load_config
    from cellmorph.demo import prepare_store
    from cellmorph.store import METADATA, open_store

    def cfg(cells: int):
        return load_config("configs/demo.yaml", [
            f"synth.out={tmp_path / 'raw'}", f"data.store={tmp_path / 'store.zarr'}",
            "synth.plates=1", "synth.rows=2", "synth.cols=5", "synth.sites=1", "synth.size=48",
            f"synth.cells_per_site={cells}", "convert.size=48", "convert.workers=1",
        ])  # fmt: skip

    def first_dna(store_path: Path) -> tuple[np.ndarray, np.ndarray]:
        store = open_store(str(store_path))
        source = store.metadata["source_DNA"].iloc[0]  # the TIFF it was converted from
        return np.asarray(store.images[0, 0]), tifffile.imread(source)

    prepare_store(cfg(4))
    old, _ = first_dna(tmp_path / "store.zarr")
    prepare_store(cfg(12))
    stored, on_disk = first_dna(tmp_path / "store.zarr")
    assert not np.array_equal(stored, old)
    np.testing.assert_array_equal(stored, on_disk)
    built = (tmp_path / "store.zarr" / METADATA).stat().st_mtime_ns
    prepare_store(cfg(12))  # nothing changed: nothing rebuilt
    assert (tmp_path / "store.zarr" / METADATA).stat().st_mtime_ns == built
