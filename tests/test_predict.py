"""cellmorph predict: the per-image, embedding and well outputs a run writes, on any store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import CLASSES, make_checkpoint, make_store

from cellmorph.checkpoint import read_checkpoint
from cellmorph.cli import main
from cellmorph.config import ModelConfig
from cellmorph.errors import CellmorphError
from cellmorph.evaluation import iter_infer, model_from_checkpoint
from cellmorph.loaders import build_loader
from cellmorph.model import build_model
from cellmorph.predict import predict
from cellmorph.store.read import open_store
from cellmorph.train import run_local


@pytest.fixture
def unlabeled(tmp_path: Path) -> tuple[Path, Path]:
    store = make_store(tmp_path / "store.zarr", labels=False)
    ckpt = make_checkpoint(tmp_path / "best.pt", str(store))
    return store, ckpt


def test_predict_unlabeled_store_writes_three_outputs(unlabeled, tmp_path: Path):
    store, ckpt = unlabeled
    out = tmp_path / "pred"
    argv = ["predict", "--checkpoint", str(ckpt), "--store", str(store), "--out", str(out),
            "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    md = pd.read_parquet(store / "metadata.parquet")
    n = len(md)

    preds = pd.read_parquet(out / "predictions.parquet")
    assert list(preds["store_row"]) == list(range(n))  # every image once, in store order
    assert {"Metadata_Plate", "Metadata_Well", "Metadata_Site", "pred", "pred_name"} <= set(preds)
    assert set(preds["pred_name"]) <= set(CLASSES) and (preds["label"] == -1).all()
    assert (preds["Metadata_Well"].to_numpy() == md["Metadata_Well"].to_numpy()).all()
    emb = np.load(out / "embeddings.npy")
    assert emb.shape == (n, build_model(ModelConfig(width_mult=0.25), 5, 3).embed_dim)
    assert not (out / "metrics.json").exists()  # no labels: nothing to score against

    # The streamed outputs equal a direct, in-memory inference.
    ck = read_checkpoint(ckpt)
    s = open_store(store)
    loader = build_loader(s, np.arange(n), np.zeros(n, np.int64), ck.config.loader, train=False,
                          device=torch.device("cpu"), norm=None)  # fmt: skip
    rows, probs, embs, _ = (np.concatenate(c) for c in zip(
        *iter_infer(model_from_checkpoint(ck), loader, torch.device("cpu"), None)))  # fmt: skip
    np.testing.assert_allclose(emb, embs[np.argsort(rows)], rtol=1e-4, atol=1e-5)
    prob_cols = [f"prob:{c}" for c in CLASSES]
    np.testing.assert_allclose(preds[prob_cols].to_numpy(), probs[np.argsort(rows)], rtol=1e-4)

    wells = pd.read_parquet(out / "wells.parquet")
    assert len(wells) == 8 and (wells["n_images"] == 3).all()  # 2 plates x 4 wells
    # A well's mean embedding is the mean of its images' embeddings.
    members = (preds["Metadata_Plate"] == wells["Metadata_Plate"][0]) & (
        preds["Metadata_Well"] == wells["Metadata_Well"][0])  # fmt: skip
    emb_cols = [c for c in wells.columns if c.startswith("emb_")]
    np.testing.assert_allclose(wells.loc[0, emb_cols].to_numpy(float),
                               emb[members.to_numpy()].mean(0), rtol=1e-4, atol=1e-5)  # fmt: skip
    np.testing.assert_allclose(wells[prob_cols].sum(axis=1), 1.0, rtol=1e-5)
    assert "Metadata_Site" not in wells  # varies within a well: not a well property


def test_run_test_fold_outputs_equal_predict_on_the_same_rows(small_cfg, tiny_plate, tmp_path):
    """One evaluation path: what a run writes for its test fold is what ``cellmorph predict``
    writes for the same rows with the same checkpoint."""
    cfg = small_cfg("same", "train.epochs=1", "train.max_steps_per_epoch=2",
                    f"data.test_plates=[{_plates(tiny_plate)[-1]}]")  # fmt: skip
    run = run_local(cfg)
    assert run.read_result()["fold"] == "test"
    out = tmp_path / "pred"
    predict(run.best_checkpoint, tiny_plate, out, device="cpu")
    mine = pd.read_parquet(run.predictions("test"))
    theirs = pd.read_parquet(out / "predictions.parquet").set_index("store_row")
    theirs = theirs.loc[mine["store_row"]].reset_index()
    pd.testing.assert_frame_equal(mine, theirs[mine.columns], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.load(run.embeddings("test")),
                               np.load(out / "embeddings.npy")[mine["store_row"].to_numpy()],
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    wells = pd.read_parquet(run.outputs("test").wells)
    all_wells = pd.read_parquet(out / "wells.parquet")
    same = all_wells.merge(wells[["Metadata_Plate", "Metadata_Well"]])
    pd.testing.assert_frame_equal(wells, same[wells.columns], rtol=1e-5, atol=1e-6)
    # the store's labels are the run's: predict scores the plate like the run's test fold
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_images"] == len(pd.read_parquet(tiny_plate / "metadata.parquet")) > len(mine)


def _plates(store: Path) -> list[str]:
    return sorted(pd.read_parquet(store / "metadata.parquet")["Metadata_Plate"].unique())


def test_predict_refuses_other_channels(tmp_path: Path):
    store = make_store(
        tmp_path / "store.zarr", channels=["DNA", "ER", "RNA", "Mito", "AGP"], labels=False
    )
    ckpt = make_checkpoint(tmp_path / "best.pt", str(store))
    with pytest.raises(CellmorphError) as err:
        predict(ckpt, store, tmp_path / "out", device="cpu")
    msg = str(err.value)
    assert (
        "['DNA', 'ER', 'RNA', 'Mito', 'AGP']" in msg
        and "['DNA', 'ER', 'RNA', 'AGP', 'Mito']" in msg
    )
    assert not (tmp_path / "out" / "predictions.parquet").exists()


def test_cli_reports_bad_checkpoint_in_one_line(tmp_path: Path, capsys):
    store = make_store(tmp_path / "store.zarr", labels=False)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    rc = main(
        ["predict", "--checkpoint", str(bad), "--store", str(store), "--out", str(tmp_path / "o")]
    )
    assert rc == 2
    assert "bad.pt" in capsys.readouterr().err


def test_a_killed_predicts_leftovers_are_removed_by_the_rerun(unlabeled, tmp_path: Path):
    store, ckpt = unlabeled
    out = tmp_path / "pred"
    (out / ".outputs").mkdir(parents=True)
    leftovers = [out / ".predictions.parquet.123.ab12cd34.tmp",
                 out / ".outputs" / "rank00000.images.parquet"]  # fmt: skip
    for p in leftovers:
        p.write_bytes(b"half")
    predict(ckpt, store, out, device="cpu")
    assert not any(p.exists() for p in leftovers)
    assert sorted(p.name for p in out.iterdir()) == [
        "embeddings.npy",
        "predictions.parquet",
        "profiling.json",
        "wells.parquet",
    ]
