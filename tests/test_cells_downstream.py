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


def test_splits_never_put_a_wells_cells_in_two_folds():
    from cellmorph.config import DataConfig
    from cellmorph.index import build_index

    md = cell_rows(plates=4, wells=15, sites=3)
    index = build_index(md, DataConfig(label_column="Metadata_pert_iname", seed=3), warn=False)
    unit = ["Metadata_Plate", "Metadata_Well"]
    folds = [set(map(tuple, md.iloc[np.unique(r)][unit].to_numpy()))
             for r in (index.train, index.val, index.test)]  # fmt: skip
    assert all(folds) and not (folds[0] & folds[1] or folds[0] & folds[2] or folds[1] & folds[2])
    assert len(index.train) + len(index.val) + len(index.test) == len(md)  # every cell, once
    assert set(index.train_order) <= set(index.train)  # balancing copies training cells only


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


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_loaders_on_the_gpu_read_the_same_cell_crops(cell_store, kind):
    store = open_store(cell_store)
    cfg = LoaderConfig(kind=kind, eval_batch_size=8, num_workers=1, augment=[])
    rows, out = np.arange(len(store)), {}
    for device in (torch.device("cpu"), torch.device("cuda", torch.cuda.current_device())):
        loader = build_loader(store, rows, np.zeros(len(rows), np.int64), cfg, train=False,
                              device=device)  # fmt: skip
        out[device.type] = torch.cat([x.cpu() for x, _, _ in loader])
    assert out["cuda"].shape == (len(store), len(CHANNELS), 20, 20)
    torch.testing.assert_close(out["cpu"], out["cuda"], atol=1e-3, rtol=1e-3)


# --------------------------------------------------------------------------- site and well scores


class _LogitsInPixels(torch.nn.Module):
    """A stand-in model: the logits are the first K pixels of channel 0 (set per row)."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward_with_embedding(self, x):
        return x[:, 0, 0, : self.k], x[:, 1].flatten(1)[:, :4]


def _scored(store_path: Path, tmp: Path, batch: int = 7):
    from cellmorph.cells import site_codes
    from cellmorph.distributed import Context
    from cellmorph.evaluation import Fold, score
    from cellmorph.labels import encode_labels
    from cellmorph.outputs import OutputSet
    from cellmorph.store.layout import well_codes

    store = open_store(store_path)
    n, k = len(store), len(CELL_CLASSES)
    logits = np.random.default_rng(5).normal(0, 2, (n, k)).astype(np.float32)
    labels = encode_labels(store.metadata, "Metadata_pert_iname", CELL_CLASSES)
    wells = well_codes(store.metadata)[0]
    fold = Fold(CELL_CLASSES, labels, wells, site_codes(store.metadata, wells))
    x = torch.zeros(n, 2, 4, 4)
    x[:, 0, 0, :k] = torch.from_numpy(logits)
    # embeddings: noise plus a shift by class, so wells differ from the controls
    x[:, 1] = torch.randn(n, 4, 4, generator=torch.Generator().manual_seed(0))
    x[:, 1, 0, :4] += torch.from_numpy(labels[:, None] * np.array([1.0, -1.0, 0.5, 0.0]))
    rows = np.arange(n)
    loader = [
        (x[i : i + batch], None, torch.from_numpy(rows[i : i + batch])) for i in range(0, n, batch)
    ]
    out = OutputSet(tmp)
    result = score(_LogitsInPixels(k), loader, rows, fold, Context(), 2, None, out, store)
    probs = torch.softmax(torch.from_numpy(logits), 1).numpy()
    return store, result, out, probs, labels


def _by_hand(md: pd.DataFrame, probs: np.ndarray, labels: np.ndarray, keys: list[str]) -> dict:
    """Each group's mean probability against its label: accuracy, balanced accuracy, macro F1."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    frame = md[keys].assign(label=labels).join(pd.DataFrame(probs, index=md.index))
    groups = frame.groupby(keys, sort=False)
    mean = groups[list(range(probs.shape[1]))].mean().to_numpy()
    truth, pred = groups["label"].first().to_numpy(), mean.argmax(axis=1)
    return {"accuracy": accuracy_score(truth, pred),
            "balanced_accuracy": balanced_accuracy_score(truth, pred),
            "macro_f1": f1_score(truth, pred, average="macro"), "n": len(truth), "mean": mean}  # fmt: skip


def test_site_and_well_scores_match_a_hand_computation(cell_store, tmp_path, monkeypatch):
    store, result, out, probs, labels = _scored(cell_store, tmp_path)
    m, md = result.metrics, store.metadata
    sites = _by_hand(md, probs, labels, ["Metadata_Plate", "Metadata_Well", "Metadata_Site"])
    wells = _by_hand(md, probs, labels, ["Metadata_Plate", "Metadata_Well"])
    for level, ref in (("site", sites), ("well", wells)):
        assert m[f"n_{level}s"] == ref["n"]
        for name in ("accuracy", "balanced_accuracy", "macro_f1"):
            assert m[f"{level}_{name}"] == pytest.approx(ref[name]), (level, name)
    assert m["n_images"] == len(store) and m["n_sites"] == 23  # one site without cells
    # sites.parquet: the same means, a row per site in store order, with its metadata.
    table = pd.read_parquet(out.sites)
    assert len(table) == 23 and table["n_cells"].sum() == len(store)
    np.testing.assert_allclose(table[[f"prob:{c}" for c in CELL_CLASSES]], sites["mean"], rtol=1e-5)
    assert {"Metadata_Site", "Metadata_pert_iname"} <= set(table.columns)
    # Sites that straddle the row groups it reads (5 rows each) come out whole.
    from cellmorph import cells

    monkeypatch.setattr(cells, "OUTPUT_ROWS", 5)
    assert cells.write_sites(out, CELL_CLASSES) == 23
    pd.testing.assert_frame_equal(pd.read_parquet(out.sites), table)
    # Per-cell rows carry the cell's identity and place in its site.
    preds = pd.read_parquet(out.predictions)
    cols = ["ObjectNumber", "Location_Center_X", "Location_Center_Y"]
    pd.testing.assert_frame_equal(preds[cols], md[cols].reset_index(drop=True))


# --------------------------------------------------------------------------- profiles


def test_profiles_are_pycytominers_pipeline_on_the_cells(cell_store, tmp_path):
    import pycytominer

    from cellmorph.profiles import SELECT, build_profiles

    store, _result, out, _probs, _labels = _scored(cell_store, tmp_path)
    target = tmp_path / "profiles.parquet"
    summary = build_profiles([out], NEGCON, target, block_rows=7)  # whole wells, 7+ cells a time
    got = pd.read_parquet(target)
    # The reference: every cell at once, pycytominer's own calls, negcon as its query string.
    preds = pd.read_parquet(out.predictions)
    emb = np.load(out.embeddings)
    feats = [f"emb_{i:04d}" for i in range(emb.shape[1])]
    cells = preds.filter(like="Metadata_").join(pd.DataFrame(emb, columns=feats))
    keys = ["Metadata_Plate", "Metadata_Well"]
    agg = pycytominer.aggregate(cells, strata=keys, features=feats, operation="median")
    meta = cells.drop_duplicates(keys).filter(like="Metadata_").drop(columns="Metadata_Site")
    wells = meta.merge(agg, on=keys)
    plates = [
        pycytominer.normalize(frame.reset_index(drop=True), features=feats,
                              meta_features=list(meta.columns),
                              samples="Metadata_control_type == 'negcon'")
        for _, frame in wells.groupby("Metadata_Plate")
    ]  # fmt: skip
    ref = pycytominer.feature_select(pd.concat(plates, ignore_index=True), features=feats,
                                     operation=SELECT)  # fmt: skip
    kept = [c for c in feats if c in ref.columns]
    assert kept and list(got.columns) == [*meta.columns, "Metadata_Object_Count", *kept]
    pd.testing.assert_frame_equal(got[list(meta.columns)], ref[list(meta.columns)])
    np.testing.assert_allclose(got[kept], ref[kept], rtol=1e-5, atol=1e-5)
    counts = preds.groupby(keys, sort=True).size().to_numpy()
    np.testing.assert_array_equal(got["Metadata_Object_Count"], counts)
    assert summary["wells"] == 12 and summary["plates_normalized_to_all_wells"] == []
    # By hand for one well: the median of its cells, standardized by its plate's DMSO wells.
    f = kept[0]
    med = cells.groupby(keys, sort=True)[f].median()
    p0 = med.loc["P0"]
    dmso = p0[wells.set_index(keys).loc["P0"]["Metadata_control_type"] == "negcon"]
    expected = (p0.iloc[1] - dmso.mean()) / dmso.std(ddof=0)
    assert got[f].iloc[1] == pytest.approx(expected, rel=1e-4)


# --------------------------------------------------------------------------- train, predict, report


def test_train_predict_report_on_a_cell_store(tmp_path, capsys):
    """``cellmorph train`` with the defaults (tiny steps), then ``predict`` and the report."""
    import json

    import yaml

    from cellmorph import cli

    store = make_cell_store(tmp_path / "cells.zarr", wells=15)  # 5 wells a class per plate
    runs = tmp_path / "runs"
    rc = cli.main(["train", "--local", f"data.store={store}", "name=cells", f"run_root={runs}",
                   "train.max_steps_per_epoch=2", "train.epochs=1", "model.width_mult=0.25",
                   "loader.batch_size=8", "loader.num_workers=0",
                   "train.bn_calibration_images=16"])  # fmt: skip
    assert rc == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("test fold"))
    assert "cells in" in line and line.index("well-level") < line.index("cell-level")
    run = runs / "cells"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["loader"]["image_size"] == 20  # 24 px crops, view_fraction 0.8: recorded
    m = json.loads((run / "metrics.json").read_text())
    assert list(m)[:5] == ["fold", "epoch", "unit", "headline", "well_balanced_accuracy"]
    assert m["fold"] == "test" and m["headline"] == "well_balanced_accuracy"
    for fold in ("validation", "test"):
        assert {"site_balanced_accuracy", "site_accuracy", "site_macro_f1", "n_sites",
                "well_balanced_accuracy", "balanced_accuracy"} <= set(m[fold])  # fmt: skip
    for name in ("test_predictions.parquet", "test_embeddings.npy", "test_sites.parquet",
                 "val_sites.parquet", "test_wells.parquet", "profiles.parquet"):  # fmt: skip
        assert (run / name).is_file(), name
    sites = pd.read_parquet(run / "test_sites.parquet")
    assert sites["n_cells"].sum() == m["n_images"] and len(sites) == m["n_sites"]
    profiles = pd.read_parquet(run / "profiles.parquet")  # held-out wells: validation + test
    assert len(profiles) == m["validation"]["n_wells"] + m["test"]["n_wells"]
    assert m["profiling"]["profiles"]["wells"] == len(profiles)
    # Cells of one well never in two folds.
    folds = [pd.read_parquet(run / f"{f}_predictions.parquet") for f in ("val", "test")]
    keys = [set(zip(f["Metadata_Plate"], f["Metadata_Well"], strict=True)) for f in folds]
    assert not keys[0] & keys[1]

    out = tmp_path / "pred"
    assert cli.main(["predict", "--checkpoint", str(run / "checkpoints" / "best.pt"),
                     "--store", str(store), "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "cells in" in printed and "well-level balanced accuracy" in printed
    for name in ("predictions.parquet", "embeddings.npy", "wells.parquet", "sites.parquet",
                 "profiles.parquet", "metrics.json", "profiling.json"):  # fmt: skip
        assert (out / name).is_file(), name
    pm = json.loads((out / "metrics.json").read_text())
    assert pm["unit"] == "cell" and pm["n_sites"] == 59 and pm["n_wells"] == 30
    assert len(pd.read_parquet(out / "profiles.parquet")) == 30

    assert cli.main(["evaluate", str(run), "--report-only"]) == 0
    page = (run / "report.html").read_text()
    assert 'id="levels"' in page and "Sample cells per class" in page
    assert page.index("well-level balanced accuracy") < page.index("cell-level balanced accuracy")
