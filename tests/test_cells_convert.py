"""Cell stores (``convert --crop-size``): one row per nucleus, from DeepProfiler's folder of
locations, one CellProfiler table (on the real JUMP site), or the nuclei finder; edge cells
zero-padded; sites without nuclei quarantined; resume after a kill; the same keys in the CLI,
the YAML config and ``python -m ray_jobs.convert``."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from cellmorph.config import ConvertConfig, NucleiConfig, SynthConfig, load_config
from cellmorph.errors import CellmorphError
from cellmorph.store.read import open_store
from cellmorph.synth import generate_plate
from conversion import locations
from conversion.__main__ import main as convert_main
from conversion.cells import binned
from conversion.pack import convert

ROOT = Path(__file__).resolve().parent.parent
REAL = ROOT / "tests" / "data" / "cpg0000_BR00116991_A01_f01"
# CPJUMP1 numbers the channels Mito, AGP, RNA, ER, DNA (tests/data/.../README.md).
REAL_FILES = {"DNA": 5, "ER": 4, "RNA": 3, "AGP": 2, "Mito": 1}
CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]
S = 48  # crop size of the synthetic plate's stores


@pytest.fixture(scope="module")
def plate(tmp_path_factory) -> Path:
    """A real-scale synthetic plate: 2 wells x 2 sites of 256 px, with true nucleus centres
    under locations/ (DeepProfiler's layout)."""
    root = tmp_path_factory.mktemp("cells") / "raw"
    cfg = SynthConfig(out=str(root), plates=1, rows=1, cols=2, sites=2, size=256,
                      nucleus_diameter=29.8)  # fmt: skip
    return generate_plate(cfg, progress=False)


def _cfg(csv: Path, **kw) -> ConvertConfig:
    return ConvertConfig(**{"load_data": str(csv), "crop_size": S, "shard_size": 8,
                            "workers": 1, **kw})  # fmt: skip


def _site_planes(csv: Path, row: pd.Series) -> np.ndarray:
    """(C, H, W) of one LoadData row's TIFFs, in store channel order."""
    return np.stack([tifffile.imread(csv.parent / row[f"PathName_Orig{ch}"] /
                                     row[f"FileName_Orig{ch}"]) for ch in CHANNELS])  # fmt: skip


def _expected_crop(field: np.ndarray, x: float, y: float, size: int) -> np.ndarray:
    """The crop read straight from the field: zeros wherever it passes the edge."""
    out = np.zeros((field.shape[0], size, size), dtype=np.uint16)
    cx, cy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
    for i in range(size):
        for j in range(size):
            r, c = cy - size // 2 + i, cx - size // 2 + j
            if 0 <= r < field.shape[1] and 0 <= c < field.shape[2]:
                out[:, i, j] = field[:, r, c]
    return out


def test_locations_folder_rows_match_the_centres_and_the_pixels(plate: Path, tmp_path) -> None:
    locs = plate.parent / "locations"
    convert(_cfg(plate, locations=str(locs)), tmp_path / "c.zarr")
    st = open_store(tmp_path / "c.zarr")
    md = st.metadata
    assert st.unit == "cell" and st.shape[1:] == (5, S, S)
    assert st.attrs["crop"] == {"size": S, "bin": 1, "edge": "zero-padded", "locations": str(locs)}
    assert st.attrs["resize"]["size"] == S and st.attrs["sites_without_cells"] == 0
    sites = pd.read_csv(plate)
    edge_seen = 0
    for _, site in sites.iterrows():
        table = pd.read_csv(locs / site.Metadata_Plate /
                            f"{site.Metadata_Well}-{site.Metadata_Site}-Nuclei.csv")  # fmt: skip
        mine = md[
            (md.Metadata_Well == site.Metadata_Well) & (md.Metadata_Site == site.Metadata_Site)
        ]
        assert len(mine) == len(table) > 0  # count
        assert mine.ObjectNumber.tolist() == list(range(1, len(table) + 1))
        assert np.allclose(mine.Location_Center_X, table.Nuclei_Location_Center_X, atol=1e-3)
        assert np.allclose(mine.Location_Center_Y, table.Nuclei_Location_Center_Y, atol=1e-3)
        assert (mine.Metadata_pert_iname == site.Metadata_pert_iname).all()
        field = _site_planes(plate, site)
        for i, (x, y) in zip(mine.index, zip(mine.Location_Center_X, mine.Location_Center_Y)):
            expected = _expected_crop(field, x, y, S)
            assert np.array_equal(st.images[i], expected), (site.Metadata_Well, i)
            edge = min(x, y, 255 - x, 255 - y) < S // 2 - 1
            if edge:  # the part past the edge is zeros, the rest the field's pixels
                edge_seen += 1
                assert (st.images[i] == 0).any()
    assert edge_seen > 0  # the plate has cells near the edge: padding was checked
    keys = md[["Metadata_Plate", "Metadata_Well", "Metadata_Site", "ObjectNumber"]]
    assert keys.equals(keys.sort_values(list(keys.columns)).reset_index(drop=True))
    # plate statistics over cells, as for fields
    assert set(st.attrs["plate_stats"]) == {"SYNP01"} and st.attrs["negcon"]


def test_site_without_nuclei_is_quarantined_and_counted(plate: Path, tmp_path, capsys) -> None:
    locs = tmp_path / "locations"
    shutil.copytree(plate.parent / "locations", locs)
    (locs / "SYNP01" / "A01-2-Nuclei.csv").write_text(
        "Nuclei_Location_Center_X,Nuclei_Location_Center_Y\n"
    )
    (locs / "SYNP01" / "A02-1-Nuclei.csv").unlink()
    out = tmp_path / "c.zarr"
    args = ["convert", "--load-data", str(plate), "--out", str(out), "--crop-size", str(S),
            "--locations", str(locs), "--workers", "1"]  # fmt: skip
    assert convert_main(args) == 0
    assert "sites without cells: 2" in capsys.readouterr().out
    st = open_store(out)
    q = st.quarantine.set_index("well")
    assert q.loc["A01", "reason"] == f"no cells: {locs} lists no nuclei for this site"
    assert q.loc["A02", "reason"].startswith("no cells: no locations file ")
    assert st.attrs["sites_without_cells"] == 2 and st.attrs["quarantined"] == 2
    assert set(zip(st.metadata.Metadata_Well, st.metadata.Metadata_Site)) == {
        ("A01", 1),
        ("A02", 2),
    }


def test_finder_cells_kill_and_resume_equal_an_uninterrupted_run(
    plate: Path, tmp_path, monkeypatch
) -> None:
    cfg = _cfg(plate, shard_size=4)  # no --locations: the nuclei finder, on the DNA channel
    nuclei = NucleiConfig(diameter=29.8)
    ref = convert(cfg, tmp_path / "ref.zarr", nuclei=nuclei)
    st = open_store(tmp_path / "ref.zarr")
    assert st.attrs["crop"]["locations"] == "cellmorph nuclei finder" and ref["images"] > 8
    # The finder's centres lie within a few px of the true ones (synth wrote them).
    md = st.metadata
    for (well, site), mine in md.groupby(["Metadata_Well", "Metadata_Site"]):
        true = pd.read_csv(
            plate.parent / "locations" / "SYNP01" / f"{well}-{site}-Nuclei.csv"
        ).to_numpy()
        found = mine[["Location_Center_X", "Location_Center_Y"]].to_numpy()
        assert np.sqrt(((found[:, None] - true[None]) ** 2).sum(-1)).min(1).max() < 8
    out = tmp_path / "c.zarr"
    killed = subprocess.run([sys.executable, "-c", KILLED, str(plate), str(out)],
                            capture_output=True, text=True)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert len(list((out / ".convert").glob("shard-*.json"))) == 2
    assert len(list((out / ".convert").glob("nuclei-*.npz"))) == 1

    def no_finder(*a, **k):
        raise AssertionError("the rerun must read the killed run's nuclei, not segment again")

    monkeypatch.setattr(locations, "find", no_finder)
    again = convert(cfg, out, nuclei=nuclei)
    assert again["written"] == again["images"] - 8  # shards 0 and 1 were kept
    got = open_store(out)
    assert np.array_equal(got.images[:], st.images[:])
    pd.testing.assert_frame_equal(got.metadata, st.metadata)
    assert got.attrs["stats"] == st.attrs["stats"]
    assert convert(cfg, out, nuclei=nuclei)["nothing_to_do"]


# SIGKILL itself when the third cell shard is about to be packed (argv: load_data.csv, out).
KILLED = """
import os, signal, sys
from cellmorph.config import ConvertConfig, NucleiConfig
from conversion.pack import convert

def killing_map(fn, tasks):
    for i, task in enumerate(tasks):
        if fn.__name__ == "pack_cells" and i == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        yield fn(task)

cfg = ConvertConfig(load_data=sys.argv[1], crop_size=48, shard_size=4, workers=1)
convert(cfg, sys.argv[2], mapper=killing_map, nuclei=NucleiConfig(diameter=29.8))
"""


@pytest.fixture(scope="module")
def real_site(tmp_path_factory) -> Path:
    """A one-row LoadData CSV of the real JUMP site (1080 px, LZW)."""
    root = tmp_path_factory.mktemp("real")
    row = {"Metadata_Plate": "BR00116991", "Metadata_Well": "A01", "Metadata_Site": 1,
           "Metadata_pert_iname": "BRD-A86665761"}  # fmt: skip
    for ch, k in REAL_FILES.items():
        row[f"FileName_Orig{ch}"] = f"r01c01f01p01-ch{k}sk1fk1fl1.tiff"
        row[f"PathName_Orig{ch}"] = str(REAL)
    pd.DataFrame([row]).to_csv(root / "load_data.csv", index=False)
    return root / "load_data.csv"


def test_cellprofiler_table_by_image_number_on_the_real_site(real_site: Path, tmp_path) -> None:
    nuclei = pd.read_csv(REAL / "Nuclei.csv")
    convert(ConvertConfig(load_data=str(real_site), crop_size=96, locations=str(REAL / "Nuclei.csv"),
                          workers=1), tmp_path / "c.zarr")  # fmt: skip
    st = open_store(tmp_path / "c.zarr")
    md = st.metadata
    assert len(md) == len(nuclei) == 109
    assert md.ObjectNumber.tolist() == sorted(nuclei.ObjectNumber)
    assert np.allclose(md.Location_Center_X, nuclei.Location_Center_X, atol=1e-3)
    field = _site_planes(real_site, pd.read_csv(real_site).iloc[0])
    for i in [0, 50, 108]:
        x, y = md.Location_Center_X[i], md.Location_Center_Y[i]
        assert np.array_equal(st.images[i], _expected_crop(field, x, y, 96))
    top = int(np.argmin(md.Location_Center_Y))  # y = 19.5: 28 rows above the field are zeros
    assert md.Location_Center_Y[top] < 20
    assert (st.images[top][:, :28] == 0).all() and (st.images[top][:, 28:] > 0).all()


def test_cellprofiler_table_by_metadata_columns_with_binning(real_site: Path, tmp_path) -> None:
    table = pd.read_csv(REAL / "Nuclei.csv").drop(columns=["ImageNumber", "Location_Center_X",
                                                           "Location_Center_Y"])  # fmt: skip
    table.insert(0, "Metadata_Plate", "BR00116991")
    table.insert(1, "Metadata_Well", "A01")
    table.insert(2, "Metadata_Site", "1")
    table = table.sample(frac=1.0, random_state=0)  # any row order: the store's is sorted
    path = tmp_path / "nuclei_by_keys.tsv"
    table.to_csv(path, sep="\t", index=False)
    convert(ConvertConfig(load_data=str(real_site), crop_size=32, locations=str(path), bin=2,
                          workers=1), tmp_path / "c.zarr")  # fmt: skip
    st = open_store(tmp_path / "c.zarr")
    assert st.attrs["crop"]["bin"] == 2 and st.shape[-1] == 32
    md = st.metadata
    assert md.ObjectNumber.tolist() == list(range(1, 110))
    ordered = table.sort_values("ObjectNumber")
    assert np.allclose(md.Location_Center_X, ordered.AreaShape_Center_X, atol=1e-3)  # native px
    field = binned(list(_site_planes(real_site, pd.read_csv(real_site).iloc[0])), 2)
    i = 40
    x, y = md.Location_Center_X[i], md.Location_Center_Y[i]
    cx, cy = int(np.floor(x + 0.5)) // 2, int(np.floor(y + 0.5)) // 2
    assert np.array_equal(st.images[i], field[:, cy - 16 : cy + 16, cx - 16 : cx + 16])
    # binning averages 2 x 2 blocks of the native pixels
    native = _site_planes(real_site, pd.read_csv(real_site).iloc[0])
    assert field[0, cy, cx] == round(native[0, 2 * cy : 2 * cy + 2, 2 * cx : 2 * cx + 2].mean())


@pytest.mark.parametrize(
    ("locs", "message"),
    [
        ("missing.csv", "error: --locations {tmp}/missing.csv not found"),
        ("no_object.csv", "error: --locations table {tmp}/no_object.csv lacks column ObjectNumber"),
        (
            "no_x.csv",
            "error: --locations table {tmp}/no_x.csv lacks column Location_Center_X (or "
            "AreaShape_Center_X, Nuclei_Location_Center_X)",
        ),
        (
            "dp",
            "error: locations file {tmp}/dp/BR00116991/A01-1-Nuclei.csv lacks column "
            "Nuclei_Location_Center_X (or Location_Center_X, AreaShape_Center_X)",
        ),
    ],
    ids=["missing-file", "missing-object-number", "missing-centre", "deepprofiler-column"],
)
def test_bad_locations_are_one_line_errors(real_site, tmp_path, capsys, locs, message) -> None:
    nuclei = pd.read_csv(REAL / "Nuclei.csv")
    nuclei.drop(columns=["ObjectNumber"]).to_csv(tmp_path / "no_object.csv", index=False)
    nuclei.drop(columns=["Location_Center_X", "AreaShape_Center_X"]).to_csv(
        tmp_path / "no_x.csv", index=False
    )
    (tmp_path / "dp" / "BR00116991").mkdir(parents=True)
    (tmp_path / "dp" / "BR00116991" / "A01-1-Nuclei.csv").write_text("X,Y\n1,2\n")
    out = tmp_path / "c.zarr"
    args = ["convert", "--load-data", str(real_site), "--out", str(out), "--crop-size", "32",
            "--locations", str(tmp_path / locs), "--workers", "1"]  # fmt: skip
    assert convert_main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines == [message.format(tmp=tmp_path)] and "Traceback" not in err
    assert not (out / "zarr.json").exists()  # stopped before a store was begun


def test_image_number_without_a_loaddata_row_is_an_error(real_site, tmp_path) -> None:
    table = pd.read_csv(REAL / "Nuclei.csv").assign(ImageNumber=2)
    table.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(
        CellmorphError, match=r"ImageNumber 2 is not a row of LoadData CSV \(it has 1 rows"
    ):
        convert(ConvertConfig(load_data=str(real_site), crop_size=32, locations=str(tmp_path / "t.csv"),
                              workers=1), tmp_path / "c.zarr")  # fmt: skip


def test_same_keys_in_cli_yaml_and_ray_job(tmp_path, capsys) -> None:
    from conversion.cli import config_from_args, convert_nuclei_from_args
    from ray_jobs.convert import build_parser

    yaml = tmp_path / "c.yaml"
    yaml.write_text(
        "convert:\n  crop_size: 64\n  bin: 2\n  locations: locs/\nnuclei:\n  diameter: 20\n"
    )
    assert load_config(yaml).convert.crop_size == 64
    base = ["--load-data", "x.csv", "--out", "o.zarr"]
    args = build_parser().parse_args([*base, "--config", str(yaml), "--bin", "3"])
    cfg = config_from_args(args)
    assert (cfg.crop_size, cfg.bin, cfg.locations) == (64, 3, "locs/")
    assert convert_nuclei_from_args(args).diameter == 20
    args = build_parser().parse_args([*base, "--crop-size", "96", "--nucleus-diameter", "35"])
    assert config_from_args(args).crop_size == 96 and convert_nuclei_from_args(args).diameter == 35
    # cell options without a crop size: one line naming the key
    with pytest.raises(
        CellmorphError, match=r"^convert.locations needs convert.crop_size \(--crop-size\)$"
    ):
        config_from_args(build_parser().parse_args([*base, "--locations", "t.csv"]))
    with pytest.raises(CellmorphError, match=r"^convert.bin needs convert.crop_size"):
        config_from_args(build_parser().parse_args([*base, "--bin", "2"]))
    bad = tmp_path / "bad.yaml"
    bad.write_text("convert:\n  bin: 2\n")
    assert convert_main(["convert", *base, "--config", str(bad)]) == 2
    assert "convert.bin needs convert.crop_size" in capsys.readouterr().err


def test_inspect_describes_a_cell_store(plate: Path, tmp_path, capsys) -> None:
    import json

    out = tmp_path / "c.zarr"
    convert(_cfg(plate, locations=str(plate.parent / "locations")), out)
    assert convert_main(["inspect", str(out), "--verify"]) == 0
    text = capsys.readouterr().out
    info = json.loads(text[: text.rindex("}") + 1])
    assert info["unit"] == "cell" and info["crop"]["size"] == S and info["sites_without_cells"] == 0
    assert info["images"] == len(open_store(out)) and "verified" in text


def test_site_that_fails_to_decode_leaves_with_its_cells(plate: Path, tmp_path) -> None:
    """A header fine but pixels corrupt: found while packing, the site is quarantined and its
    cells leave the plan (later rows move up); the other sites' crops are intact."""
    df = pd.read_csv(plate)
    for ch in CHANNELS:
        df[f"PathName_Orig{ch}"] = [str(plate.parent / p) for p in df[f"PathName_Orig{ch}"]]
    bad = tmp_path / "bad_er.tiff"
    tifffile.imwrite(bad, _site_planes(plate, df.iloc[1])[1], compression="zlib")
    with tifffile.TiffFile(bad) as t:
        off, n = t.pages[0].dataoffsets[0], t.pages[0].databytecounts[0]
    raw = bytearray(bad.read_bytes())
    raw[off + 2 : off + n - 2] = bytes(n - 4)
    bad.write_bytes(bytes(raw))
    df.loc[1, ["PathName_OrigER", "FileName_OrigER"]] = [str(tmp_path), bad.name]
    csv = tmp_path / "load_data.csv"
    df.to_csv(csv, index=False)
    locs = plate.parent / "locations"
    convert(_cfg(csv, locations=str(locs), shard_size=4), tmp_path / "c.zarr")
    st = open_store(tmp_path / "c.zarr")
    q = st.quarantine
    assert len(q) == 1 and (q.well[0], q.site[0]) == ("A01", "2")  # read as text
    assert q.reason[0].startswith("cannot decode") and st.attrs["sites_without_cells"] == 0
    md = st.metadata
    assert not ((md.Metadata_Well == "A01") & (md.Metadata_Site == 2)).any()
    for i in [0, len(md) - 1]:
        row = df[
            (df.Metadata_Well == md.Metadata_Well[i]) & (df.Metadata_Site == md.Metadata_Site[i])
        ]
        field = _site_planes(csv, row.iloc[0])
        x, y = md.Location_Center_X[i], md.Location_Center_Y[i]
        assert np.array_equal(st.images[i], _expected_crop(field, x, y, S))


def test_counted_sums_equal_the_float_sums() -> None:
    from cellmorph.loaders.stats import sums_by_group
    from conversion.shards import sums_by_histogram

    block = np.random.default_rng(1).integers(0, 65535, (12, 3, 16, 16)).astype(np.uint16)
    groups = ["P1\x1f0"] * 5 + ["P1\x1f1"] * 7
    a, b = sums_by_group(block, groups), sums_by_histogram(block, groups)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key]["n"] == b[key]["n"]
        for m in ("sum", "sumsq", "log_sum", "log_sumsq"):
            assert np.allclose(a[key][m], b[key][m], rtol=1e-12, atol=0)


def test_a_table_is_read_in_blocks_into_mapped_read_only_arrays(tmp_path, monkeypatch) -> None:
    """The plan of a table: its cells in (site, ObjectNumber) order, as memory-mapped files
    (not private memory at 75 M cells) whose names are already gone; a repeat still stops."""
    import tempfile

    spill_dir = tmp_path / "tmp"
    spill_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill_dir))
    monkeypatch.setattr(locations, "TABLE_ROWS", 7)  # 109 rows in 16 blocks
    sites = pd.DataFrame({"Metadata_Plate": ["BR00116991"], "Metadata_Well": ["A01"],
                          "Metadata_Site": [1]})  # fmt: skip
    nuclei = pd.read_csv(REAL / "Nuclei.csv")
    table = nuclei.drop(columns=["ImageNumber"]).assign(**sites.iloc[0].to_dict())
    path = tmp_path / "nuclei.csv"
    table.to_csv(path, index=False)
    cells, dropped = locations.read_table(str(path), sites, ConvertConfig(crop_size=96))
    assert dropped == 0 and len(cells) == 109
    assert all(isinstance(getattr(cells, f), np.memmap) for f in locations.FIELDS)
    assert not cells.x.flags.writeable and list(spill_dir.iterdir()) == []
    assert cells.obj.tolist() == sorted(nuclei.ObjectNumber) and (cells.site == 0).all()
    by_obj = nuclei.set_index("ObjectNumber").loc[cells.obj]
    np.testing.assert_allclose(cells.x, by_obj.Location_Center_X, atol=1e-3)
    table.iloc[[3, 3]].to_csv(path, index=False)  # one nucleus twice, in order
    with pytest.raises(CellmorphError, match="more than once"):
        locations.read_table(str(path), sites, ConvertConfig(crop_size=96))
    assert list(spill_dir.iterdir()) == []


def test_counted_sums_equal_one_bincount_per_channel() -> None:
    """The sums counted a few rows at a time are the very numbers one bincount per channel
    and group gave (the computation before the counting was split): equal, not close."""
    from conversion.shards import _MOMENT_ROWS, COUNT_ROWS, sums_by_histogram

    rng = np.random.default_rng(2)
    n = 2 * COUNT_ROWS + 7  # full blocks and a partial one
    block = rng.integers(0, 65536, (n, 3, 8, 8), dtype=np.uint16)
    block[:5] = 65535
    block[5:9] = 0
    groups = [["P1\x1f0", "P1\x1f1", "P2\x1f0"][i % 3] for i in range(n)]  # interleaved
    for gs in (groups, ["P1\x1f0"] * n):
        keys = np.asarray(gs)
        got = sums_by_histogram(block, gs)
        assert list(got) == list(dict.fromkeys(gs))
        for key in got:
            sel = keys == key
            counts = np.stack([np.bincount(block[sel, c].ravel(), minlength=65536)
                               for c in range(3)]).astype(np.float64)  # fmt: skip
            old = counts @ _MOMENT_ROWS.T
            assert got[key]["n"] == int(sel.sum())
            for i, m in enumerate(("sum", "sumsq", "log_sum", "log_sumsq")):
                assert got[key][m] == old[:, i].tolist()


def test_a_site_split_by_a_shard_boundary_is_decoded_once(plate: Path, tmp_path,
                                                          monkeypatch) -> None:  # fmt: skip
    """One worker decodes each site once, also a site whose cells end one shard and begin the
    next; its shard records (checksums, sums, saturation counts) are those of a worker that
    decodes the site again (a pool: the next shard goes to another process)."""
    from conversion import cells
    from conversion.manifest import Manifest

    illum = tmp_path / "illum"
    illum.mkdir()
    for ch in CHANNELS:  # Mito at half gain: its brightest pixels saturate
        np.save(illum / f"SYNP01_Illum{ch}.npy", np.full((256, 256), 0.5 if ch == "Mito" else 1.0,
                                                         dtype=np.float32))  # fmt: skip
    cfg = _cfg(plate, locations=str(plate.parent / "locations"), illum_dir=str(illum))
    decoded: list[str] = []
    read_site = cells.read_site

    def counting(sources):
        decoded.append(sources[0][0])
        return read_site(sources)

    monkeypatch.setattr(cells, "read_site", counting)

    def forgetful(fn, tasks):  # each shard as if in a fresh worker
        for task in tasks:
            cells._last_site.clear()
            yield fn(task)

    convert(cfg, tmp_path / "once.zarr")
    once = list(decoded)
    decoded.clear()
    convert(cfg, tmp_path / "again.zarr", mapper=forgetful)
    assert sorted(set(once)) == sorted(once) and len(once) == 4  # each site once
    assert len(decoded) > len(once)  # the plate's shards of 8 cells split sites
    a, b = open_store(tmp_path / "once.zarr"), open_store(tmp_path / "again.zarr")
    assert np.array_equal(a.images[:], b.images[:])
    shards = -(-len(a) // 8)
    records = [[Manifest(str(s)).shard(i) for i in range(shards)] for s in (a.path, b.path)]
    assert records[0] == records[1] and any(r["saturated"][4] for r in records[0])
    for key in ("stats", "plate_stats", "illumination_saturated"):
        assert a.attrs[key] == b.attrs[key]


def test_a_cell_store_compresses_with_blosc_lz4_by_default_and_reads_back(plate: Path,
                                                                         tmp_path) -> None:  # fmt: skip
    """The default codec (auto) gives a cell store Blosc LZ4, bit-shuffled, recorded as
    blosc-lz4; asked for zstd, Blosc zstd at level 1 (attrs.codec_level); zarr, the fast reader
    and ``inspect --verify`` read the pixels an LZ4 store of the same cells holds."""
    from cellmorph.loaders.reader import ShardReader
    from cellmorph.store.verify import verify_store

    locs = str(plate.parent / "locations")
    convert(_cfg(plate, locations=locs), tmp_path / "b.zarr")
    convert(_cfg(plate, locations=locs, codec="zstd"), tmp_path / "z.zarr")
    convert(_cfg(plate, locations=locs, codec="lz4"), tmp_path / "l.zarr")
    b = open_store(tmp_path / "b.zarr")
    z, lz4 = open_store(tmp_path / "z.zarr"), open_store(tmp_path / "l.zarr")
    blosc = b.images.metadata.codecs[0].codecs[1]
    assert (blosc.cname.name, blosc.shuffle.value) == ("lz4", "bitshuffle")
    assert b.attrs["codec"] == "blosc-lz4" and "codec_level" not in b.attrs
    blosc = z.images.metadata.codecs[0].codecs[1]
    assert (blosc.cname.name, blosc.clevel, blosc.shuffle.value) == ("zstd", 1, "bitshuffle")
    assert z.attrs["codec"] == "zstd" and z.attrs["codec_level"] == 1
    assert np.array_equal(b.images[:], lz4.images[:])
    assert verify_store(b, progress=False) == []
    pixels = lz4.images[:]
    assert np.array_equal(z.images[:], pixels)
    rows = np.arange(len(z))[::-1]
    assert np.array_equal(ShardReader(z, threads=1).read(rows), pixels[rows])
    assert verify_store(z, progress=False) == []
