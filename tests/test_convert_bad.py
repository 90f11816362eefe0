"""Bad input: structural problems stop naming the column/file; per-image problems are quarantined."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from helpers import assert_aligned, make_loaddata, site_pixels

from cellmorph.config import ConvertConfig
from cellmorph.errors import CellmorphError
from cellmorph.store import open_store
from conversion.pack import convert


def cfg_for(csv: Path, **kw) -> ConvertConfig:
    return ConvertConfig(load_data=str(csv), size=16, shard_size=3, workers=1, **kw)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda df: df.drop(columns=["Metadata_Well"]), "lacks required column.*Metadata_Well"),
        (lambda df: df.drop(columns=["PathName_OrigER"]), "PathName_OrigER"),
        (lambda df: df.drop(columns=["Metadata_pert_iname"]), "label column Metadata_pert_iname"),
        (lambda df: df.iloc[:0], "empty input"),
    ],
    ids=["missing-key-column", "missing-path-column", "missing-label-column", "empty"],
)
def test_structural_errors_name_the_column(tmp_path: Path, mutate, message: str) -> None:
    csv = make_loaddata(tmp_path, plates=1, wells=1, sites=2, size=16)
    mutate(pd.read_csv(csv)).to_csv(csv, index=False)
    with pytest.raises(CellmorphError, match=message):
        convert(cfg_for(csv), tmp_path / "s.zarr")


def test_unknown_channel_and_missing_csv(tmp_path: Path) -> None:
    csv = make_loaddata(tmp_path, plates=1, wells=1, sites=1, size=16)
    with pytest.raises(CellmorphError, match="unknown channel 'Actin'.*FileName_OrigActin"):
        convert(cfg_for(csv, channels=["DNA", "Actin"]), tmp_path / "s.zarr")
    with pytest.raises(CellmorphError, match="nope.csv"):
        convert(cfg_for(tmp_path / "nope.csv"), tmp_path / "s.zarr")
    (tmp_path / "blank.csv").write_text("")
    with pytest.raises(CellmorphError, match="blank.csv is empty"):
        convert(cfg_for(tmp_path / "blank.csv"), tmp_path / "s.zarr")


def _damage(root: Path, df: pd.DataFrame) -> dict[int, str]:
    """Break sites in every per-image way; returns sid -> expected reason fragment."""
    img = root / "images"

    def f(sid: int, ch: str) -> Path:
        return img / df.loc[df.sid == sid, f"FileName_Orig{ch}"].item()

    f(1, "DNA").write_bytes(f(1, "DNA").read_bytes()[:300])  # truncated
    f(2, "ER").write_bytes(b"II*\x00garbage" * 10)  # corrupt header
    f(3, "RNA").unlink()  # missing
    tifffile.imwrite(f(4, "AGP"), site_pixels("AGP", 4, 24))  # other shape
    tifffile.imwrite(f(5, "Mito"), site_pixels("Mito", 5, 40).astype(np.uint8))  # other dtype
    # valid header, corrupt compressed pixels: only decoding finds it (while packing)
    tifffile.imwrite(f(6, "DNA"), site_pixels("DNA", 6, 40), compression="zlib")
    with tifffile.TiffFile(f(6, "DNA")) as t:
        off, n = t.pages[0].dataoffsets[0], t.pages[0].databytecounts[0]
    raw = bytearray(f(6, "DNA").read_bytes())
    raw[off + 2 : off + n - 2] = bytes(n - 4)
    f(6, "DNA").write_bytes(bytes(raw))
    return {
        1: "truncated TIFF", 2: "unreadable TIFF", 3: "missing file", 4: "channels differ in shape",
        5: "channels differ in shape or dtype", 6: "cannot decode", 7: "no label in column Metadata_pert_iname",
        8: "duplicate (plate, well, site)", 9: "duplicate (plate, well, site)",
    }  # fmt: skip


def test_per_image_problems_are_quarantined_never_mislabeled(tmp_path: Path) -> None:
    csv = make_loaddata(tmp_path, plates=1, wells=4, sites=4, size=40)
    df = pd.read_csv(csv)
    expected = _damage(tmp_path, df)
    df.loc[df.sid == 7, "Metadata_pert_iname"] = np.nan
    df.loc[df.sid == 9, ["Metadata_Well", "Metadata_Site"]] = df.loc[
        df.sid == 8, ["Metadata_Well", "Metadata_Site"]
    ].to_numpy()
    df.to_csv(csv, index=False)
    summary = convert(cfg_for(csv), tmp_path / "s.zarr")
    assert summary["images"] == 16 - len(expected) and summary["quarantined"] == len(expected)
    md = assert_aligned(tmp_path / "s.zarr")
    assert sorted(md["sid"]) == sorted(set(range(16)) - set(expected))
    q = open_store(tmp_path / "s.zarr").quarantine
    by_site = df.set_index(["Metadata_Well", "Metadata_Site"])["sid"]
    for _, row in q.iterrows():
        sids = by_site.loc[(row["well"], int(row["site"]))]  # quarantine.csv is read as text
        sid = int(sids.iloc[0]) if isinstance(sids, pd.Series) else int(sids)
        assert expected[sid] in row["reason"], (sid, row["reason"])


def test_all_sites_bad_stops_and_writes_quarantine(tmp_path: Path) -> None:
    csv = make_loaddata(tmp_path, plates=1, wells=1, sites=2, size=16)
    for p in (tmp_path / "images").glob("*ch1*"):
        p.unlink()
    with pytest.raises(CellmorphError, match="no valid sites: all 2 inputs were quarantined"):
        convert(cfg_for(csv), tmp_path / "s.zarr")
    assert len(pd.read_csv(tmp_path / "s.zarr" / "quarantine.csv")) == 2


def test_allow_unlabeled_keeps_sites_without_labels(tmp_path: Path) -> None:
    csv = make_loaddata(tmp_path, plates=1, wells=2, sites=2, size=16)
    df = pd.read_csv(csv)
    df["Metadata_pert_iname"] = np.nan
    df.to_csv(csv, index=False)
    assert convert(cfg_for(csv, allow_unlabeled=True), tmp_path / "u.zarr")["images"] == 4
    with pytest.raises(CellmorphError, match="no valid sites"):
        convert(cfg_for(csv), tmp_path / "l.zarr")
