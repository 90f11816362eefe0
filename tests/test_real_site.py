"""The real JUMP pilot site converts with the commands docs/conversion.md gives.

``tests/data/cpg0000_BR00116991_A01_f01/``: five 1080 x 1080 uint16 LZW TIFFs of plate
BR00116991, well A01, site 1 (ch1..ch5 = Mito, AGP, RNA, ER, DNA; see the README there).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import tifffile

from cellmorph.cli import main
from cellmorph.store import open_store

SITE = Path(__file__).parent / "data" / "cpg0000_BR00116991_A01_f01"
FILE_CHANNELS = ["Mito", "AGP", "RNA", "ER", "DNA"]  # ch1..ch5, CPJUMP1's numbering
STORE_CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]  # the default --channels


def file_of(channel: str) -> Path:
    return SITE / f"r01c01f01p01-ch{FILE_CHANNELS.index(channel) + 1}sk1fk1fl1.tiff"


def write_loaddata(path: Path) -> Path:
    """A LoadData CSV as the pilot publishes it, plus the site's compound as its label."""
    row = {"Metadata_Plate": "BR00116991", "Metadata_Well": "A01", "Metadata_Site": 1,
           "Metadata_pert_iname": "gabapentin-enacarbil"}  # fmt: skip
    for ch in FILE_CHANNELS:
        row |= {f"FileName_Orig{ch}": file_of(ch).name, f"PathName_Orig{ch}": str(SITE)}
    pd.DataFrame([row]).to_csv(path, index=False)
    return path


def test_real_site_converts_and_verifies(tmp_path: Path, capsys) -> None:
    csv = write_loaddata(tmp_path / "load_data.csv")
    out = tmp_path / "s.zarr"
    assert main(["convert", "--load-data", str(csv), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"converted 1 images into {out} (1 written in this run), quarantined 0" in printed
    assert main(["inspect", str(out), "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "verified 1 images: every chunk's crc32c and every image's checksum match" in printed
    st = open_store(out)
    assert st.channels == STORE_CHANNELS and st.images.shape == (1, 5, 160, 160)
    md = st.metadata
    assert (md.at[0, "Metadata_Plate"], md.at[0, "Metadata_Well"]) == ("BR00116991", "A01")
    assert md.at[0, "Metadata_pert_iname"] == "gabapentin-enacarbil"
    assert md.at[0, "source_DNA"] == str(file_of("DNA"))


def test_real_site_at_full_size_stores_the_decoded_pixels(tmp_path: Path) -> None:
    """--size 1080 keeps the field as it is: every stored channel is tifffile's decode of the file
    that the LoadData column of that name points to."""
    csv = write_loaddata(tmp_path / "load_data.csv")
    out = tmp_path / "full.zarr"
    args = ["convert", "--load-data", str(csv), "--out", str(out), "--size", "1080"]
    assert main([*args, "--workers", "1"]) == 0
    stored = open_store(out).images[:]
    assert stored.shape == (1, 5, 1080, 1080) and stored.dtype == np.uint16
    for c, ch in enumerate(STORE_CHANNELS):
        decoded = tifffile.imread(file_of(ch))
        assert decoded.shape == (1080, 1080) and decoded.dtype == np.uint16
        assert np.array_equal(stored[0, c], decoded), ch
