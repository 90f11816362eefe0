"""Ray Train on the shared two-node local cluster (one CPU per node), on a cell store.

A real-scale synthetic plate is converted to cell stores with its locations and with the nuclei
finder; the finder's store (the path without a table) trains with the built-in defaults (only
the run's length, the two one-CPU nodes and one restart set): two workers, one per node, as one
world of 2; rank 0 is killed after epoch 0's checkpoint and the run resumes from it. The run
then gives its report and its predictions at cell, site and well level.

One run proves all of it: a Ray Train run costs about a minute to start on 2 cores. The Tune
sweep runs to its end in tests/test_readme.py (``ray job submit ... ray_jobs.tune``); the
kill and resume from a bucket in tests/test_objectstore_e2e.py."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import read_events

from cellmorph.checkpoint import load_checkpoint
from cellmorph.config import ConvertConfig, NucleiConfig, SynthConfig, load_config
from cellmorph.rundir import RunDir
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


def _wait_for(condition, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _convert_both(plate: Path, tmp_path: Path) -> dict[str, Path]:
    """Both conversions find the same cells (within 15%: the finder keeps border nuclei here,
    as the true centres do)."""
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
    return stores


def _train_killing_rank0(cfg, epochs: int) -> RunDir:
    """Run ``cfg`` on Ray; SIGKILL rank 0 (the one that writes the run's files) once epoch 0
    is checkpointed; return when the resumed run has ended."""
    from cellmorph.launch import run_ray_training

    run, outcome = RunDir(cfg.run_dir), {}

    def train() -> None:
        try:
            outcome["run"] = run_ray_training(cfg, quiet=True)
        except Exception as e:  # reported by the assertion below
            outcome["error"] = e

    thread = threading.Thread(target=train)
    thread.start()
    # The run names its worker processes in its start event.
    _wait_for(lambda: run.last_checkpoint.is_file(), "epoch 0's checkpoint")
    start = read_events(run)[0]
    assert start["event"] == "start" and [w["rank"] for w in start["workers"]] == [0, 1]
    assert len(run.history()) < epochs, "the run finished before the kill"
    os.kill(start["workers"][0]["pid"], signal.SIGKILL)
    thread.join(timeout=400)
    assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
    resumes = [e for e in read_events(run) if e["event"] == "resume"]
    assert len(resumes) == 1 and 1 <= resumes[0]["epoch"] < epochs
    assert resumes[0]["workers"][0]["pid"] != start["workers"][0]["pid"]
    return run


def test_cells_train_on_two_nodes_survive_a_killed_worker_and_report_and_predict(
    ray_cluster, plate, tmp_path, capsys, epochs_of
):
    import ray

    from cellmorph import cli
    from cellmorph.store import open_store

    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 2 and all(n["Resources"]["CPU"] == 1 for n in nodes)
    store = _convert_both(plate, tmp_path)["finder"]
    st = open_store(store)
    n_wells = st.metadata[["Metadata_Plate", "Metadata_Well"]].drop_duplicates().shape[0]

    # The built-in defaults; only the run's length, the two one-CPU nodes and a restart are set.
    epochs = 4
    cfg = load_config(None, ["name=cells", f"run_root={tmp_path / 'runs'}", f"data.store={store}",
                             f"train.epochs={epochs}", "train.min_steps=0",
                             "train.max_steps_per_epoch=2", "ray.num_workers=2",
                             "ray.cpus_per_worker=1", "ray.max_failures=1"])  # fmt: skip
    run = _train_killing_rank0(cfg, epochs)
    assert epochs_of(run.path) == list(range(epochs))  # every epoch once, across the restart
    records = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert {r["world_size"] for r in records} == {2}
    ckpt = load_checkpoint(run.last_checkpoint)
    assert ckpt["epoch"] == epochs - 1 and ckpt["channels"] == ["DNA", "ER", "RNA", "AGP", "Mito"]
    assert (run.path / "config.yaml").is_file()
    assert not list(run.path.rglob("*.tmp"))  # the killed writer's temporary files are gone

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
