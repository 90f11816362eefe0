"""Leakage audit: both protocols trained on one tiny store, written side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from helpers import make_store

from cellmorph.audit import audit, format_table, study_config
from cellmorph.config import Config
from cellmorph.errors import CellmorphError
from cellmorph.rundir import RunDir
from cellmorph.store import write_metadata


def _tiny_config(tmp_path: Path) -> Config:
    store = make_store(tmp_path / "store.zarr", plates=2, wells=6, sites=3, size=20)
    # Imbalanced classes (24/6/6 images), so that oversampling has copies to make.
    md = pd.read_parquet(store / "metadata.parquet")
    md["Metadata_pert_iname"] = (
        md["Metadata_Well"].map({"A05": "drugB", "A06": "drugC"}).fillna("drugA")
    )
    write_metadata(store, md)  # through the store: re-binds its digest
    return Config(
        name="tiny",
        run_root=str(tmp_path / "runs"),
        data={"store": str(store), "split": "grouped", "val_fraction": 0.34},
        loader={
            "batch_size": 8,
            "eval_batch_size": 16,
            "num_workers": 0,
            "image_size": 16,
            "augment": [],
        },
        model={"width_mult": 0.25},
        train={"epochs": 1, "min_steps": 0, "log_every": 100},
        eval={"sample_grid_per_class": 0},
    )


def test_study_config_is_the_leaky_protocol(tmp_path: Path):
    cfg = Config(name="x", data={"split": "grouped"})
    study = study_config(cfg)
    assert study.name == "x-study-protocol"
    assert (study.data.split, study.data.oversample_before_split, study.data.balance) == (
        "image",
        True,
        "both",
    )
    assert cfg.data.split == "grouped"  # the given config is untouched


def test_audit_refuses_a_leaky_default():
    with pytest.raises(CellmorphError, match="leak-free"):
        audit(Config(data={"split": "image"}))


@pytest.mark.slow
def test_audit_trains_both_protocols_and_counts_copies(tmp_path: Path):
    cfg = _tiny_config(tmp_path)
    result = audit(cfg)
    study, default = result["protocols"]
    out = tmp_path / "runs" / "tiny" / "audit.json"
    assert json.loads(out.read_text()) == result
    assert Path(study["run_dir"]).name == "tiny-study-protocol"
    for row in (study, default):
        for key in ("accuracy", "balanced_accuracy", "macro_f1", "well_accuracy"):
            assert 0.0 <= row[key] <= 1.0, (row["name"], key)
        # the scores are the runs' own final metrics
        metrics = json.loads((Path(row["run_dir"]) / "metrics.json").read_text())
        assert row["accuracy"] == metrics["accuracy"]
    # Oversampling before the split puts copies of validation images in training; the
    # grouped split with oversampling of the training fold only puts none there.
    assert study["val_copies_in_train"] > 0
    assert default["val_copies_in_train"] == 0
    assert default["n_val_images"] > 0 and study["n_val_images"] > 0
    table = format_table(result)
    assert "study protocol" in table and "val_copies_in_train" in table

    # Reusing the trained default run only retrains the study protocol (already done: no-op).
    again = audit(cfg, reuse_default_run=RunDir(tmp_path / "runs" / "tiny"))
    assert again["protocols"][1]["accuracy"] == default["accuracy"]
