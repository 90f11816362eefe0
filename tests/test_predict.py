"""cellmorph predict: per-image CSV, embeddings parquet and well table on an unlabeled store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from helpers import CLASSES, make_checkpoint, make_store

from cellmorph.checkpoint import read_checkpoint
from cellmorph.cli import main
from cellmorph.config import ModelConfig
from cellmorph.errors import CellmorphError
from cellmorph.model import build_model
from cellmorph.predict import PredictionWriter, infer, model_from_checkpoint, predict


@pytest.fixture
def unlabeled(tmp_path: Path) -> tuple[Path, Path]:
    store = make_store(tmp_path / "store.zarr", labels=False)
    ckpt = make_checkpoint(tmp_path / "best.pt", str(store))
    return store, ckpt


def test_predict_unlabeled_store_writes_three_outputs(unlabeled, tmp_path: Path):
    store, ckpt = unlabeled
    out = tmp_path / "pred"
    rc = main(
        [
            "predict",
            "--checkpoint",
            str(ckpt),
            "--store",
            str(store),
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    md = pd.read_parquet(store / "metadata.parquet")
    n = len(md)

    preds = pd.read_csv(out / "predictions.csv")
    assert sorted(preds["store_row"]) == list(range(n))  # every image once
    assert {
        "Metadata_Plate",
        "Metadata_Well",
        "Metadata_Site",
        "top1_class",
        "top1_prob",
        "top2_class",
        "top2_prob",
    } <= set(preds.columns)
    assert "top3_class" not in preds  # eval.top_k=2 from the checkpoint
    assert set(preds["top1_class"]) <= set(CLASSES)
    assert (preds["top1_prob"] >= preds["top2_prob"]).all()
    # metadata travels with its row
    by_row = preds.set_index("store_row").sort_index()
    assert (by_row["Metadata_Well"].to_numpy() == md["Metadata_Well"].to_numpy()).all()

    emb = pd.read_parquet(out / "embeddings.parquet")
    emb_cols = [c for c in emb.columns if c.startswith("emb_")]
    assert (
        len(emb) == n and len(emb_cols) == build_model(ModelConfig(width_mult=0.25), 5, 3).embed_dim
    )

    # The streamed outputs equal a direct, in-memory inference.
    ck = read_checkpoint(ckpt)
    model = model_from_checkpoint(ck)
    from cellmorph.loaders import build_loader
    from cellmorph.store import open_store

    s = open_store(store)
    loader = build_loader(
        s,
        np.arange(n),
        np.zeros(n, np.int64),
        ck.config.loader,
        train=False,
        device=torch.device("cpu"),
        norm=ck.norm,
    )
    rows, probs, embs, _ = infer(model, loader, torch.device("cpu"))
    emb_sorted = emb.set_index("store_row").sort_index()[emb_cols].to_numpy()
    np.testing.assert_allclose(emb_sorted, embs[np.argsort(rows)], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        by_row["top1_prob"].to_numpy(), probs[np.argsort(rows)].max(1), rtol=1e-4
    )

    wells = pd.read_parquet(out / "wells.parquet")
    assert len(wells) == 8  # 2 plates x 4 wells
    assert (wells["n_images"] == 3).all()
    # A well's mean embedding is the mean of its images' embeddings.
    first = wells.iloc[0]
    members = emb[
        (emb["Metadata_Plate"] == first["Metadata_Plate"])
        & (emb["Metadata_Well"] == first["Metadata_Well"])
    ]
    np.testing.assert_allclose(
        first[emb_cols].to_numpy(float), members[emb_cols].mean().to_numpy(), rtol=1e-4, atol=1e-5
    )
    prob_cols = [f"prob:{c}" for c in CLASSES]
    np.testing.assert_allclose(wells[prob_cols].sum(axis=1), 1.0, rtol=1e-5)
    assert "Metadata_Site" not in wells  # varies within a well: not a well property


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
    assert not (tmp_path / "out" / "predictions.csv").exists()


def test_cli_reports_bad_checkpoint_in_one_line(tmp_path: Path, capsys):
    store = make_store(tmp_path / "store.zarr", labels=False)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    rc = main(
        ["predict", "--checkpoint", str(bad), "--store", str(store), "--out", str(tmp_path / "o")]
    )
    assert rc == 2
    assert "bad.pt" in capsys.readouterr().err


def test_writer_memory_holds_open_wells_only(tmp_path: Path):
    """The writer keeps running sums of the wells still open, not rows or every well: a well
    is closed (and its sums freed) as soon as its images were written; repeated rows (padding)
    are written once."""
    from cellmorph.store import open_store

    store = open_store(make_store(tmp_path / "s.zarr", plates=1, wells=3, sites=2, size=8),
                       columns=[])  # fmt: skip
    w = PredictionWriter(tmp_path, store, ["a", "b"], top_k=1, dim=3)
    probs = np.array([[0.9, 0.1]] * 4, np.float32)
    emb = np.arange(12, dtype=np.float32).reshape(4, 3)
    feats = np.ones((4, 5), np.float32)
    assert w.write(np.array([0, 1, 2]), probs[:3], emb[:3], feats[:3]) == 3
    assert len(w.sums.open_wells()[0]) == 1  # well 1 closed, well 2 has 1 of its 2 images
    assert w.write(np.array([2, 3, 4, 5]), probs, emb, feats) == 3  # row 2 repeated
    assert len(w.sums.open_wells()[0]) == 0 and w.sums.sums[1].shape[0] <= 2  # slots reused
    assert w.close() == 3
    wells = pd.read_parquet(tmp_path / "wells.parquet")
    assert list(wells["n_images"]) == [2, 2, 2]
    assert list(wells["Metadata_Well"]) == ["A01", "A02", "A03"]
    np.testing.assert_allclose(wells["emb_0000"], [1.5, 4.5, 7.5])  # (0+3)/2, (6+3)/2, (6+9)/2
    assert len(pq.read_table(tmp_path / "embeddings.parquet")) == 6
