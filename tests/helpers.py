"""Helpers the tests share: tiny TIFF inputs, tiny stores and checkpoints.

Tiny Cell Painting inputs for the conversion tests are written with tifffile:

Every pixel of site ``sid``'s channel ``ch`` is ``code(ch, sid)`` plus noise in [0, 4), so the
stored image itself says which site and which channel it came from: a test can prove that no
image sits under the wrong metadata row and that channels follow names, not file positions.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
import torch

from cellmorph.config import Config, LoaderConfig, ModelConfig
from cellmorph.loaders.stats import store_stats, sums_by_group
from cellmorph.model import build_model
from cellmorph.store.layout import image_checksum as checksum
from cellmorph.store.read import Store, open_store
from cellmorph.store.write import create_images, write_attrs, write_metadata, write_quarantine

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


# --------------------------------------------------------------------------- stores and checkpoints
CLASSES = ["drugA", "drugB", "drugC"]


def stats_attrs(images: np.ndarray, plates: list[str], channels: list[str]) -> dict:
    """``stats`` and ``plate_stats`` for images held in memory, computed as conversion does."""
    sums = sums_by_group(images, [f"{p}\x1f0" for p in plates])
    return store_stats([sums], images, list(channels), images.shape[-1] * images.shape[-2])


def make_store(
    path: Path, channels=CHANNELS, labels: bool = True, plates=2, wells=4, sites=3, size=24
):
    """A tiny store: ``plates x wells x sites`` random images, shards of 8 images."""
    rng = np.random.default_rng(0)
    rows = [
        {"Metadata_Plate": f"P{p}", "Metadata_Well": f"A{w + 1:02d}", "Metadata_Site": s}
        for p in range(plates)
        for w in range(wells)
        for s in range(sites)
    ]
    n = len(rows)
    images = rng.integers(100, 3000, (n, len(channels), size, size)).astype(np.uint16)
    md = pd.DataFrame(rows)
    if labels:
        md["Metadata_pert_iname"] = [
            CLASSES[int(w[1:]) % len(CLASSES)] for w in md["Metadata_Well"]
        ]
    md["checksum"] = [hashlib.sha1(im.tobytes()).hexdigest() for im in images]
    arr = create_images(path, n, list(channels), size, shard_size=8)
    arr[:] = images
    write_metadata(path, md)
    write_attrs(path, stats_attrs(images, list(md["Metadata_Plate"]), channels))
    write_quarantine(path, [])
    return path


def make_checkpoint(path: Path, store: str, channels=CHANNELS, classes=CLASSES) -> Path:
    """A checkpoint in train.py's format around a tiny random model."""
    cfg = Config(
        data={"store": store},
        model={"width_mult": 0.25},
        loader={"image_size": 16, "eval_batch_size": 5, "num_workers": 0},
        eval={"top_k": 2},
    )
    torch.manual_seed(0)
    model = build_model(ModelConfig(width_mult=0.25), len(channels), len(classes))
    ckpt = {
        "model": model.state_dict(),
        "epoch": 0,
        "config": cfg.model_dump(mode="json"),
        "classes": list(classes),
        "label_column": "Metadata_pert_iname",
        "channels": list(channels),
        "image_size": 16,
        "metrics": {},
    }
    torch.save(ckpt, path)
    return path


# --------------------------------------------------------------------------- loader stores
N_ROWS, SHARD = 50, 16


def make_pixel_store(path: Path, pixels: np.ndarray, codec: str = "zstd") -> Store:
    """A finished store from (N, C, S, S) uint16 pixels, written shard by shard."""
    n, c, s, _ = pixels.shape
    channels = ["DNA", "ER", "RNA", "AGP", "Mito"][:c] if c <= 5 else [f"c{i}" for i in range(c)]
    arr = create_images(path, n, channels, s, codec=codec, shard_size=SHARD)
    for i in range(0, n, SHARD):
        arr[i : i + SHARD] = pixels[i : i + SHARD]
    write_attrs(path, stats_attrs(pixels, ["P1"] * n, channels))
    md = pd.DataFrame(
        {"Metadata_Plate": "P1", "Metadata_Well": "A01", "Metadata_Site": range(n), "checksum": ""}
    )
    write_metadata(path, md)
    write_quarantine(path, [])
    return open_store(path)


def coded_pixels(n: int = N_ROWS, c: int = 2, s: int = 20) -> np.ndarray:
    """Flat images whose value encodes the row (channel k: 1000 + 10*row + k).

    Flat images survive flips and (inside the crop) rotations, so the code stays readable.
    """
    v = 1000 + 10 * np.arange(n)[:, None] + np.arange(c)[None, :]
    return np.broadcast_to(v[:, :, None, None], (n, c, s, s)).astype(np.uint16).copy()


def textured_pixels(n: int = N_ROWS, c: int = 5, s: int = 24) -> np.ndarray:
    rng = np.random.default_rng(3)
    base = rng.gamma(2.0, 150.0, (n, c, s, s)) + 200 * np.arange(c)[None, :, None, None]
    return base.astype(np.uint16)


def loader_cfg(**kw) -> LoaderConfig:
    base = {"batch_size": 8, "eval_batch_size": 8, "image_size": 16, "num_workers": 0}
    return LoaderConfig(**{**base, **kw})


def row_labels(n: int = N_ROWS) -> np.ndarray:
    return (np.arange(n) * 7) % 5


# A convert killed by SIGKILL while packing its third shard (argv: load_data.csv, out).
KILLED_AT_SHARD_2 = """
import os, signal, sys
from cellmorph.config import ConvertConfig
from conversion.pack import convert

def killing_map(fn, tasks):
    for i, task in enumerate(tasks):
        if fn.__name__ == "pack_shard" and i == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        yield fn(task)

cfg = ConvertConfig(load_data=sys.argv[1], size=16, shard_size=2, workers=1)
convert(cfg, sys.argv[2], mapper=killing_map)
"""


def read_events(run) -> list[dict]:
    """The lines of a run's ``events.jsonl`` (local or in a bucket)."""
    import json

    if not run.events.is_file():
        return []
    return [json.loads(line) for line in run.events.read_text().splitlines() if line.strip()]


def site_key(row: pd.Series) -> str:
    """``plate/well/site`` of one site, row by row: the reference ``conversion.pack.site_keys``
    (vectorized) is checked against."""
    return f"{row['Metadata_Plate']}/{row['Metadata_Well']}/{row['Metadata_Site']}"
