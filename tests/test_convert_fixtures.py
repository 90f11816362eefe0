"""Tiny Cell Painting inputs for the conversion tests, written with tifffile.

Every pixel of site ``sid``'s channel ``ch`` is ``code(ch, sid)`` plus noise in [0, 4), so the
stored image itself says which site and which channel it came from: a test can prove that no
image sits under the wrong metadata row and that channels follow names, not file positions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import tifffile

from cellmorph.store import image_checksum as checksum
from cellmorph.store import open_store

CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]
# File order differs from CHANNELS on purpose (CPJUMP1 numbers them Mito, AGP, RNA, ER, DNA).
FILE_ORDER = ["Mito", "AGP", "RNA", "ER", "DNA"]


def code(channel: str, sid: int) -> int:
    return 10000 * (CHANNELS.index(channel) + 1) + 20 * sid


def site_pixels(channel: str, sid: int, size: int) -> np.ndarray:
    rng = np.random.default_rng([sid, CHANNELS.index(channel)])
    return (code(channel, sid) + rng.integers(0, 4, (size, size))).astype(np.uint16)


def make_loaddata(
    root: Path, plates: int = 2, wells: int = 3, sites: int = 3, size: int = 40
) -> Path:
    """Write one TIFF per (site, channel) and a LoadData CSV whose paths are relative to it."""
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    sid = 0
    for p in range(plates):
        for w in range(wells):
            for s in range(1, sites + 1):
                plate, well = f"P{p}", f"A{w + 1:02d}"
                row = {"Metadata_Plate": plate, "Metadata_Well": well, "Metadata_Site": s}
                for k, ch in enumerate(FILE_ORDER):
                    name = f"r01c{w + 1:02d}f{s:02d}p01-ch{k + 1}sk1fk1fl1_{plate}.tiff"
                    tifffile.imwrite(img_dir / name, site_pixels(ch, sid, size))
                    row[f"FileName_Orig{ch}"] = name
                    row[f"PathName_Orig{ch}"] = "images"
                row["Metadata_pert_iname"] = f"drug{w % 2}"
                row["sid"] = sid
                rows.append(row)
                sid += 1
    csv = root / "load_data.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def make_folder(root: Path, n: int = 6, size: int = 36) -> tuple[Path, Path]:
    """One multi-page TIFF per site (pages in FILE_ORDER) plus a metadata CSV keyed by an id."""
    img_dir = root / "folder"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for sid in range(n):
        stack = np.stack([site_pixels(ch, sid, size) for ch in FILE_ORDER])
        tifffile.imwrite(img_dir / f"exp1_IMG{sid:03d}_w.tif", stack, photometric="minisblack")
        rows.append(
            {
                "image_id": f"img{sid:03d}",
                "Metadata_Plate": "P0",
                "Metadata_Well": f"B{sid // 2:02d}",
                "Metadata_pert_iname": f"cmpd{sid % 3}",
                "sid": sid,
            }
        )
    meta = root / "folder_meta.csv"
    pd.DataFrame(rows).to_csv(meta, index=False)
    return img_dir, meta


def assert_aligned(store_path: Path, channels: list[str] = CHANNELS) -> pd.DataFrame:
    """Every stored image carries the codes of the site its metadata row names, channel by name."""
    st = open_store(store_path)
    md = st.metadata
    for i, sid in enumerate(md["sid"]):
        img = st.images[i]
        for c, ch in enumerate(channels):
            assert abs(float(img[c].mean()) - code(ch, int(sid)) - 1.5) < 1.0, (i, sid, ch)
        assert checksum(img) == md.at[i, "checksum"]
    return md
