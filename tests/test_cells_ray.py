"""A real-scale synthetic plate, converted to cell stores with its locations and with the nuclei
finder, trains through Ray Train with the defaults (only the run's length cut), then gives its
report and its predictions at cell, site and well level."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from cellmorph.config import ConvertConfig, NucleiConfig, SynthConfig, load_config
from cellmorph.synth import LOCATIONS, generate_plate
from conversion.pack import convert

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def plate(tmp_path_factory) -> Path:
    """2 plates x 24 wells x 1 site of 256 px at the pilot's nucleus size (~6 cells a site)."""
    root = tmp_path_factory.mktemp("cells_ray") / "raw"
    cfg = SynthConfig(out=str(root), plates=2, rows=4, cols=6, sites=1, size=256,
                      nucleus_diameter=29.8)  # fmt: skip
    return generate_plate(cfg, progress=False)


def test_cell_store_trains_on_ray_and_reports_and_predicts(ray_cluster, plate, tmp_path, capsys):
    """Both conversions find the same cells (within 15%: the finder keeps border nuclei here,
    as the true centres do); the finder's store, the path without a table, runs the job."""
    from cellmorph import cli
    from cellmorph.launch import run_ray_training
    from cellmorph.store import open_store

    stores = {}
    for where in ("locations", "finder"):
        locations = str(plate.parent / LOCATIONS) if where == "locations" else None
        stores[where] = tmp_path / f"{where}.zarr"
        convert(ConvertConfig(load_data=str(plate), crop_size=64, locations=locations,
                              workers=1), stores[where],
                nuclei=NucleiConfig(diameter=29.8, exclude_border=False, workers=1))  # fmt: skip
    true, found = (open_store(stores[w]) for w in ("locations", "finder"))
    assert true.unit == found.unit == "cell" and true.attrs["crop"]["size"] == 64
    assert true.shape[0] > 48 * 3  # cells, not sites
    assert abs(found.shape[0] - true.shape[0]) <= 0.15 * true.shape[0]
    store, st, where = stores["finder"], found, "finder"
    n_wells = st.metadata[["Metadata_Plate", "Metadata_Well"]].drop_duplicates().shape[0]

    # The built-in defaults; only the run's length and the two one-CPU nodes are set.
    cfg = load_config(None, [f"name=cells-{where}", f"run_root={tmp_path / 'runs'}",
                             f"data.store={store}", "train.epochs=1", "train.min_steps=0",
                             "train.max_steps_per_epoch=2", "ray.num_workers=2",
                             "ray.cpus_per_worker=1"])  # fmt: skip
    run = run_ray_training(cfg, quiet=True)
    m = json.loads((run.path / "metrics.json").read_text())
    assert m["unit"] == "cell" and m["headline"] == "well_balanced_accuracy"
    assert m["fold"] == "test" and 0.0 <= m["well_balanced_accuracy"] <= 1.0
    for fold in ("validation", "test"):
        assert m[fold]["n_wells"] > 0 and m[fold]["n_sites"] >= m[fold]["n_wells"]
    cells = pd.read_parquet(run.path / "test_predictions.parquet")
    assert {"ObjectNumber", "Location_Center_X", "Location_Center_Y"} <= set(cells.columns)
    assert len(cells) == m["n_images"]
    wells = pd.read_parquet(run.path / "test_wells.parquet")
    assert len(wells) == m["test"]["n_wells"]
    assert (run.path / "profiles.parquet").is_file()

    assert cli.main(["evaluate", str(run.path), "--report-only"]) == 0
    html = (run.path / "report.html").read_text()
    assert "well" in html and "cells" in html

    out = tmp_path / "pred"
    assert cli.main(["predict", "--checkpoint", str(run.path / "checkpoints" / "best.pt"),
                     "--store", str(store), "--out", str(out)]) == 0  # fmt: skip
    assert "well-level balanced accuracy" in capsys.readouterr().out
    assert len(pd.read_parquet(out / "predictions.parquet")) == st.shape[0]
    assert len(pd.read_parquet(out / "wells.parquet")) == n_wells
