"""Evaluation at scale: per-rank sums give the single-process result, outputs stream to disk.

Two ranks in a gloo process group (torch.multiprocessing, no Ray) score the same model on the
same folds as one process: scores, well profiles and the per-image output files must agree,
including the wells whose images are split between the two ranks.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import make_store

from cellmorph.config import Config
from cellmorph.distributed import Context
from cellmorph.model import build_model
from cellmorph.rundir import RunDir
from cellmorph.train import score_folds
from cellmorph.train_setup import build_data


def _config(store: Path, run_root: Path) -> Config:
    return Config(
        name="dist", run_root=str(run_root), seed=0,
        data={"store": str(store), "val_fraction": 0.25, "test_fraction": 0.3},
        loader={"image_size": 16, "eval_batch_size": 7, "num_workers": 0},
        model={"width_mult": 0.25}, eval={"top_k": 2},
    )  # fmt: skip


def _score(rank: int, world: int, cfg: Config, out: Path, init: str) -> None:
    """One rank: score the folds, rank 0 pickles the results."""
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    ctx = Context(rank=rank, world_size=world)
    data = build_data(cfg, ctx, training=False)
    torch.manual_seed(0)  # the same weights on every rank
    model = build_model(cfg.model, len(data.store.channels), len(data.index.classes)).eval()
    results = score_folds(RunDir(cfg.run_dir), model, data, cfg, ctx)
    if ctx.is_main:
        out.write_bytes(pickle.dumps(results))
    if world > 1:
        dist.destroy_process_group()


def _split_wells(cfg: Config, fold: str) -> int:
    """Wells of ``fold`` whose rows the two ranks share (the evaluation split is contiguous)."""
    data = build_data(cfg, Context(), training=False)
    rows = np.unique(getattr(data.index, fold))
    parts = np.array_split(rows, 2)
    wells = data.index.well_ids
    return len(np.intersect1d(wells[parts[0]], wells[parts[1]]))


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("dist")
    # 4 plates x 12 wells x 5 sites = 240 images; 5 sites per well makes the ranks split wells.
    store = make_store(root / "store.zarr", plates=4, wells=12, sites=5, size=16)
    out = {}
    for world in (1, 2):
        cfg = _config(store, root / f"runs{world}")
        pickled = root / f"results{world}.pkl"
        if world == 1:
            _score(0, 1, cfg, pickled, "")
        else:
            init = f"file://{root / 'pg'}"
            mp.spawn(_score, args=(world, cfg, pickled, init), nprocs=world, join=True)
        out[world] = (cfg, pickle.loads(pickled.read_bytes()))
    return out


def test_two_ranks_score_like_one_process(scored):
    (_cfg1, one), (cfg2, two) = scored[1], scored[2]
    assert _split_wells(cfg2, "val") >= 1  # 11 wells of 5 images: the merge is exercised
    assert set(one) == set(two) == {"val", "test"}
    for fold in ("val", "test"):
        a, b = one[fold].metrics, two[fold].metrics
        assert a["confusion_matrix"] == b["confusion_matrix"]
        assert a["n_images"] == b["n_images"] and a["n_wells"] == b["n_wells"]
        for key in ("accuracy", "balanced_accuracy", "macro_f1", "top2_accuracy",
                    "well_accuracy", "well_balanced_accuracy"):  # fmt: skip
            assert a[key] == b[key], key
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-9)
        assert a["per_class"] == b["per_class"]
    # Every fold's wells table: the same wells, in store order, with the same means.
    for fold in ("val", "test"):
        w1 = pd.read_parquet(RunDir(_cfg1.run_dir).outputs(fold).wells)
        w2 = pd.read_parquet(RunDir(cfg2.run_dir).outputs(fold).wells)
        assert len(w1) == one[fold].wells == two[fold].wells == one[fold].metrics["n_wells"]
        assert list(w1["Metadata_Well"]) == list(w2["Metadata_Well"])
        pd.testing.assert_frame_equal(w1, w2, rtol=1e-6, atol=1e-7)


def test_output_files_match_and_agree_with_the_scores(scored):
    (cfg1, one), (cfg2, _two) = scored[1], scored[2]
    for fold in ("val", "test"):
        r1, r2 = RunDir(cfg1.run_dir), RunDir(cfg2.run_dir)
        a, b = pd.read_parquet(r1.predictions(fold)), pd.read_parquet(r2.predictions(fold))
        pd.testing.assert_frame_equal(a, b)
        np.testing.assert_array_equal(np.load(r1.embeddings(fold)), np.load(r2.embeddings(fold)))
        assert not (r2.path / f".{fold}_outputs").exists()  # the rank parts were merged
        # one row per fold image, in store order, with every metadata column
        assert a["store_row"].is_monotonic_increasing and a["store_row"].is_unique
        assert {"Metadata_Plate", "Metadata_Well", "checksum", "label_name", "pred"} <= set(a)
        probs = a[[c for c in a if c.startswith("prob:")]].to_numpy()
        m = one[fold].metrics
        assert (probs.argmax(1) == a["label"]).mean() == pytest.approx(m["accuracy"])
        assert len(np.load(r1.embeddings(fold))) == len(a) == m["n_images"]
        # A well's row holds the mean of its images' probabilities and embeddings.
        wells = pd.read_parquet(r1.outputs(fold).wells)
        first = wells.iloc[0]
        members = (a["Metadata_Plate"] == first["Metadata_Plate"]) & (
            a["Metadata_Well"] == first["Metadata_Well"])  # fmt: skip
        emb = np.load(r1.embeddings(fold))[members.to_numpy()].mean(axis=0)
        emb_cols = [c for c in wells if c.startswith("emb_")]
        np.testing.assert_allclose(first[emb_cols].to_numpy(float), emb, rtol=1e-4, atol=1e-6)
        assert first["n_images"] == members.sum() and "Metadata_Site" not in wells
