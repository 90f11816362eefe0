"""Everything downstream of a cell store (rows are single-cell crops: docs/architecture.md).

The cell stores here follow the cell-store contract the conversion side writes: ``attrs.unit``
``"cell"``, ``attrs.crop``, ``ObjectNumber`` and ``Location_Center_X/Y`` per row, rows sorted by
(plate, well, site, ObjectNumber), several cells per site and several sites per well.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import CHANNELS, stats_attrs

from cellmorph.config import LoaderConfig, default_image_size, load_config, resolve_from_store
from cellmorph.loaders import build_loader
from cellmorph.loaders.transform import geometry
from cellmorph.store.read import open_store
from cellmorph.store.write import create_images, write_attrs, write_metadata, write_quarantine

pytestmark = pytest.mark.filterwarnings("ignore:Numcodecs codecs are not in the Zarr")

CELL_CLASSES = ["DMSO", "drugA", "drugB"]
NEGCON = "Metadata_control_type=negcon"


def cell_rows(plates: int = 2, wells: int = 6, sites: int = 2, seed: int = 0) -> pd.DataFrame:
    """Cells sorted by (plate, well, site, ObjectNumber): 2 to 5 per site, one site empty
    (it contributes no rows, as the contract says); wells cycle through the classes, the
    DMSO wells being the negative controls."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(plates):
        for w in range(wells):
            label = CELL_CLASSES[w % len(CELL_CLASSES)]
            for s in range(1, sites + 1):
                n = 0 if (p, w, s) == (0, 1, 2) else int(rng.integers(2, 6))
                for obj in range(1, n + 1):
                    rows.append({
                        "Metadata_Plate": f"P{p}", "Metadata_Well": f"B{w + 1:02d}",
                        "Metadata_Site": s, "Metadata_pert_iname": label,
                        "Metadata_control_type": "negcon" if label == "DMSO" else "trt",
                        "ObjectNumber": obj, "Location_Center_X": float(rng.uniform(0, 500)),
                        "Location_Center_Y": float(rng.uniform(0, 500)),
                    })  # fmt: skip
    return pd.DataFrame(rows)


def make_cell_store(path: Path, size: int = 24, **kw) -> Path:
    """A finished cell store: each class has its own mean intensity, so a model can learn."""
    md = cell_rows(**kw)
    rng = np.random.default_rng(1)
    level = md["Metadata_pert_iname"].map({c: 400 * (i + 1) for i, c in enumerate(CELL_CLASSES)})
    images = rng.integers(0, 300, (len(md), len(CHANNELS), size, size))
    images = (images + level.to_numpy()[:, None, None, None]).astype(np.uint16)
    md["checksum"] = [hashlib.sha1(im.tobytes()).hexdigest() for im in images]
    arr = create_images(path, len(md), CHANNELS, size, shard_size=16, attrs={
        "unit": "cell", "resize": {"size": size},
        "crop": {"size": size, "bin": 1, "edge": "zero-padded", "locations": "test table"},
        "sites_without_cells": 1, "label_column": "Metadata_pert_iname", "negcon": NEGCON,
    })  # fmt: skip
    arr[:] = images
    write_metadata(path, md)
    write_attrs(path, stats_attrs(images, list(md["Metadata_Plate"]), CHANNELS))
    write_quarantine(path, [{"source": "P0/B02/2", "plate": "P0", "well": "B02", "site": "2",
                             "reason": "no cells: the nuclei table has none for this site"}])  # fmt: skip
    return path


@pytest.fixture(scope="module")
def cell_store(tmp_path_factory) -> Path:
    return make_cell_store(tmp_path_factory.mktemp("cells") / "cells.zarr")


# --------------------------------------------------------------------------- store and defaults


def test_unit_says_cell_or_field(cell_store, tmp_path):
    from helpers import make_store

    assert open_store(cell_store).unit == "cell"
    assert open_store(make_store(tmp_path / "fields.zarr")).unit == "field"  # no attrs.unit


@pytest.mark.parametrize(("size", "fraction", "expected"),
                         [(160, 0.8, 128), (96, 0.8, 76), (96, 1.0, 96), (24, 0.8, 20)])  # fmt: skip
def test_default_image_size_needs_no_resize(size, fraction, expected):
    assert default_image_size(size, fraction) == expected
    cfg = LoaderConfig(view_fraction=fraction, augment=["hflip"])  # image_size unresolved
    g = geometry(size, cfg)  # the same default
    assert (g.store_size, g.resize_to, g.crop) == (size, size, expected)


def test_image_size_resolves_from_the_store_and_explicit_wins(tmp_path):
    store = make_cell_store(tmp_path / "c96.zarr", size=96, plates=1, wells=3, sites=1)
    cfg = load_config(None, [f"data.store={store}"])
    assert cfg.loader.image_size is None
    resolved = resolve_from_store(cfg)
    assert resolved.loader.image_size == 76
    assert resolved.data.label_column == "Metadata_pert_iname"
    explicit = load_config(None, [f"data.store={store}", "loader.image_size=64"])
    assert resolve_from_store(explicit).loader.image_size == 64


@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_loaders_read_cell_crops(cell_store, kind):
    store = open_store(cell_store)
    cfg = LoaderConfig(
        kind=kind,
        batch_size=4,
        eval_batch_size=8,
        num_workers=0,
        augment=[],
        intensity="linear",
        normalize="store",
    )  # affine: pixels comparable
    rows = np.arange(len(store))
    loader = build_loader(store, rows, np.zeros(len(rows), np.int64), cfg, train=False,
                          device=torch.device("cpu"))  # fmt: skip
    got = list(loader)
    seen = np.concatenate([r.numpy() for _, _, r in got])
    np.testing.assert_array_equal(seen, rows)  # every cell once, in store order
    x = torch.cat([b[0] for b in got])
    assert x.shape == (len(store), len(CHANNELS), 20, 20)  # 24 px crops -> the default 20
    # The centre 20 px of each crop, standardized: the same pixels, up to one affine map.
    raw = store.images[:].astype(np.float64)[:, 0, 2:22, 2:22].ravel()
    assert np.corrcoef(x[:, 0].numpy().ravel(), raw)[0, 1] > 0.9999
