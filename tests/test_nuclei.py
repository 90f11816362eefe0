"""``cellmorph nuclei``: nucleus centres on the DNA channel, checked against CellProfiler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from scipy.spatial import cKDTree

from cellmorph.config import ConvertConfig, NucleiConfig, load_config
from cellmorph.errors import CellmorphError
from conversion.nuclei import COLUMNS, find_all, find_nuclei

REAL = Path(__file__).parent / "data" / "cpg0000_BR00116991_A01_f01"
DNA = "r01c01f01p01-ch5sk1fk1fl1.tiff"


def matched(a: np.ndarray, b: np.ndarray, within: float = 8.0) -> float:
    """Fraction of the points ``a`` with a point of ``b`` within ``within`` px."""
    if len(a) == 0 or len(b) == 0:
        return 0.0
    return float((cKDTree(b).query(a)[0] <= within).mean())


@pytest.fixture(scope="module")
def real_dna() -> np.ndarray:
    return tifffile.imread(REAL / DNA)


def test_real_site_agrees_with_cellprofiler(real_dna: np.ndarray) -> None:
    theirs = pd.read_csv(REAL / "Nuclei.csv")[["AreaShape_Center_X", "AreaShape_Center_Y"]]
    ours = find_nuclei(real_dna, NucleiConfig())
    assert len(theirs) == 109
    assert matched(theirs.to_numpy(), ours[:, :2]) >= 0.9
    assert matched(ours[:, :2], theirs.to_numpy()) >= 0.9
    diameter = np.median(2 * np.sqrt(ours[:, 2] / np.pi))
    assert 0.8 * 29.8 < diameter < 1.25 * 29.8


def test_touching_nuclei_are_split_and_the_size_filter_applies() -> None:
    img = np.full((120, 160), 300, dtype=np.uint16)
    yy, xx = np.mgrid[:120, :160]
    for cy, cx in ((60, 50), (60, 76)):  # two 30 px discs overlapping by 4 px
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 15**2] = 5000
    img[(yy - 20) ** 2 + (xx - 130) ** 2 <= 3**2] = 5000  # debris: far below a nucleus
    found = find_nuclei(img, NucleiConfig(diameter=30))
    assert len(found) == 2
    assert sorted(np.round(found[:, 0]).tolist()) == pytest.approx([50, 76], abs=2)
    # Without the watershed split (peaks must be 2 diameters apart) they are one object.
    assert len(find_nuclei(img, NucleiConfig(diameter=30, split_distance=2.0))) == 1


def test_a_field_without_nuclei_has_none() -> None:
    rng = np.random.default_rng(0)
    empty = rng.normal(400, 20, (540, 540)).clip(0).astype(np.uint16)  # background and noise
    assert len(find_nuclei(empty, NucleiConfig())) == 0
    assert len(find_nuclei(np.zeros((64, 64), np.uint16), NucleiConfig())) == 0


def _loaddata(tmp_path: Path, planes: dict[tuple[str, str, int], np.ndarray | None]) -> Path:
    rows = []
    for (plate, well, site), plane in planes.items():
        name = f"{plate}_{well}_{site}_DNA.tiff"
        if plane is not None:
            tifffile.imwrite(tmp_path / name, plane)
        rows.append({"Metadata_Plate": plate, "Metadata_Well": well, "Metadata_Site": site,
                     "FileName_OrigDNA": name, "PathName_OrigDNA": str(tmp_path)})  # fmt: skip
    csv = tmp_path / "load_data.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def _sites(real_dna: np.ndarray) -> dict[tuple[str, str, int], np.ndarray | None]:
    """Four different fields cut from the real site, in two plates."""
    h = 540
    return {
        ("P1", "A01", 1): real_dna[:h, :h],
        ("P1", "A01", 2): real_dna[h:, :h],
        ("P1", "B02", 1): real_dna[:h, h:],
        ("P2", "A01", 1): real_dna[h:, h:],
    }


def test_parallel_run_over_sites_matches_one_process(real_dna: np.ndarray, tmp_path: Path) -> None:
    sites = _sites(real_dna)
    csv = _loaddata(tmp_path, sites)
    convert = ConvertConfig(load_data=str(csv))
    one = find_all(NucleiConfig(workers=1), convert, str(tmp_path / "one.csv"))
    two = find_all(NucleiConfig(workers=2), convert, str(tmp_path / "two.csv"))  # a pool
    assert one["sites"] == two["sites"] == 4 and one["nuclei"] == two["nuclei"] > 60
    a, b = pd.read_csv(tmp_path / "one.csv"), pd.read_csv(tmp_path / "two.csv")
    assert list(a.columns) == COLUMNS
    order = ["Metadata_Plate", "Metadata_Well", "Metadata_Site", "ObjectNumber"]
    pd.testing.assert_frame_equal(
        a.sort_values(order).reset_index(drop=True), b.sort_values(order).reset_index(drop=True)
    )
    for (plate, well, site), plane in sites.items():
        got = a[(a.Metadata_Plate == plate) & (a.Metadata_Well == well) & (a.Metadata_Site == site)]
        want = find_nuclei(plane, NucleiConfig())
        np.testing.assert_allclose(got[["Location_Center_X", "Location_Center_Y"]], want[:, :2],
                                   atol=1e-3)  # fmt: skip
        assert got["ObjectNumber"].tolist() == list(range(1, len(want) + 1))
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary name was renamed away


def test_cli_skips_unreadable_sites_and_prints_the_reasons(
    real_dna: np.ndarray, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from cellmorph.cli import build_parser

    sites = _sites(real_dna)
    sites[("P2", "C03", 1)] = None  # listed in the CSV, file missing
    csv = _loaddata(tmp_path, sites)
    (tmp_path / "P1_B02_1_DNA.tiff").write_bytes(b"II*\x00 not a tiff")  # unreadable
    out = tmp_path / "nuclei.csv"
    argv = ["nuclei", "--load-data", str(csv), "--out", str(out), "--workers", "1"]
    args = build_parser().parse_args(argv)
    assert args.func(args) == 0
    printed, err = capsys.readouterr()
    assert "in 3 sites" in printed and "skipped 2 sites" in printed
    assert "P1/B02/1" in printed and "P2/C03/1" in printed
    assert "site/s" in err  # the progress bar
    df = pd.read_csv(out)
    assert set(df["Metadata_Well"]) == {"A01"} and len(df) > 40
    assert df["AreaShape_Area"].min() >= 0.25 * np.pi * 29.8**2 / 4
    # Nothing readable: a one-line stop, and no CSV left behind.
    for name in ("P1_A01_1_DNA.tiff", "P1_A01_2_DNA.tiff", "P2_A01_1_DNA.tiff"):
        (tmp_path / name).unlink()
    other = tmp_path / "none.csv"
    args = build_parser().parse_args([*argv[:-3], str(other), "--workers", "1"])
    with pytest.raises(CellmorphError, match="no valid sites: all 5 inputs"):
        args.func(args)
    assert not other.exists() and not list(tmp_path.glob(".none.csv*"))


def test_cli_reads_the_folder_layout_as_convert_does(real_dna: np.ndarray, tmp_path: Path) -> None:
    from cellmorph.cli import build_parser

    images = tmp_path / "images"
    images.mkdir()
    noise = np.zeros_like(real_dna[:540, :540])
    # Multi-channel files in convert's default order (DNA first), and one with DNA last.
    tifffile.imwrite(
        images / "s1.tiff", np.stack([real_dna[:540, :540], noise, noise]), photometric="minisblack"
    )
    tifffile.imwrite(
        images / "s2.tiff", np.stack([noise, noise, real_dna[:540, :540]]), photometric="minisblack"
    )
    meta = tmp_path / "meta.csv"
    pd.DataFrame({"Metadata_Plate": ["P", "P"], "Metadata_Well": ["A01", "A02"],
                  "Metadata_Site": [1, 1], "file": ["s1", "s2"]}).to_csv(meta, index=False)  # fmt: skip
    common = ["nuclei", "--images", str(images), "--metadata", str(meta), "--id-column", "file",
              "--id-pattern", r"(?P<id>s\d)", "--workers", "1"]  # fmt: skip
    out = tmp_path / "a.csv"
    args = build_parser().parse_args([*common, "--file-channels", "DNA,ER,RNA", "--out", str(out)])
    args.func(args)
    df = pd.read_csv(out)
    assert (df.Metadata_Well == "A01").sum() > 20 and (df.Metadata_Well == "A02").sum() == 0
    args = build_parser().parse_args([*common, "--file-channels", "ER,RNA,DNA", "--out", str(out)])
    args.func(args)
    df = pd.read_csv(out)
    assert (df.Metadata_Well == "A02").sum() > 20 and (df.Metadata_Well == "A01").sum() == 0


def test_bad_settings_name_the_key(tmp_path: Path) -> None:
    from cellmorph.cli import build_parser

    args = build_parser().parse_args(["nuclei", "--load-data", "x.csv", "--out", "o.csv",
                                      "--diameter", "-3"])  # fmt: skip
    with pytest.raises(CellmorphError, match=r"nuclei\.diameter"):
        args.func(args)
    with pytest.raises(CellmorphError, match=r"nuclei\.min_area"):
        load_config(None, ["nuclei.min_area=5"])
    with pytest.raises(CellmorphError, match=r"nuclei\.radius: unknown key"):
        load_config(None, ["nuclei.radius=5"])
    with pytest.raises(CellmorphError, match="folder"):
        find_all(NucleiConfig(), ConvertConfig(load_data="x.csv"), str(tmp_path))
