"""Per-plate statistics at conversion, log transform and per-plate standardization in the loaders,
and the normalization a trained model applies to a new plate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import make_loaddata

from cellmorph import store as st
from cellmorph.config import ConvertConfig, LoaderConfig
from cellmorph.errors import CellmorphError
from cellmorph.loaders import build_loader
from cellmorph.loaders.normalize import Normalization, for_inference, from_store
from conversion.pack import convert

CPU = torch.device("cpu")


def two_plate_store(path: Path, gains=(1.0, 3.0), n_per_plate: int = 12) -> st.Store:
    """Two plates of flat-ish images, the second plate ``gains[1]`` times brighter; the first
    half of each plate's wells are negative controls (dimmer)."""
    rng = np.random.default_rng(0)
    images, rows = [], []
    for p, gain in enumerate(gains):
        for i in range(n_per_plate):
            negcon = i < n_per_plate // 2
            base = (400.0 if negcon else 900.0) * gain
            images.append(rng.normal(base, base * 0.1, (2, 16, 16)).clip(1, 65000))
            rows.append({"Metadata_Plate": f"P{p}", "Metadata_Well": f"A{i:02d}", "Metadata_Site": 1,
                         "Metadata_control_type": "negcon" if negcon else "trt"})  # fmt: skip
    pixels = np.stack(images).astype(np.uint16)
    md = pd.DataFrame(rows).assign(checksum="")
    arr = st.create_images(path, len(md), ["DNA", "ER"], 16, shard_size=8)
    arr[:] = pixels
    negcon = (md["Metadata_control_type"] == "negcon").tolist()
    groups = [st.group_key(p, n) for p, n in zip(md["Metadata_Plate"], negcon)]
    sums = st.sums_by_group(pixels, groups)
    st.write_attrs(path, st.store_stats([sums], pixels, ["DNA", "ER"], 16 * 16))
    st.write_metadata(path, md)
    st.write_quarantine(path, [])
    return st.open_store(path)


def _batch(store: st.Store, **kw) -> tuple[torch.Tensor, np.ndarray]:
    cfg = LoaderConfig(image_size=16, view_fraction=1.0, augment=["hflip", "vflip", "rot90"],
                       eval_batch_size=64, num_workers=0, **kw)  # fmt: skip
    loader = build_loader(store, np.arange(len(store)), np.zeros(len(store), np.int64), cfg,
                          train=False, device=CPU)  # fmt: skip
    x, _, rows = next(iter(loader))
    return x, rows.numpy()


def test_conversion_records_exact_plate_statistics(tmp_path: Path):
    csv = make_loaddata(tmp_path, plates=2, wells=3, sites=2, size=24)
    md = pd.read_csv(csv)
    md["Metadata_control_type"] = np.where(
        md["Metadata_Well"] == md["Metadata_Well"].min(), "negcon", "trt"
    )
    md.to_csv(csv, index=False)
    out = tmp_path / "s.zarr"
    convert(ConvertConfig(load_data=str(csv), size=16, shard_size=4, workers=1), out)
    store = st.open_store(out)
    pixels = store.images[:].astype(np.float64)
    plates = store.metadata["Metadata_Plate"].to_numpy()
    negcon = (store.metadata["Metadata_control_type"] == "negcon").to_numpy()
    table = store.attrs["plate_stats"]
    assert sorted(table) == sorted(set(plates))
    for plate in table:
        for scope, sel in (("all", plates == plate), ("negcon", (plates == plate) & negcon)):
            for c, ch in enumerate(store.channels):
                v = pixels[sel][:, c]
                got = table[plate][scope][ch]
                assert got["mean"] == pytest.approx(v.mean(), rel=1e-9)
                assert got["std"] == pytest.approx(v.std(), rel=1e-6)
                assert got["log_mean"] == pytest.approx(np.log1p(v).mean(), rel=1e-9)
                assert got["log_std"] == pytest.approx(np.log1p(v).std(), rel=1e-6)
                assert got["images"] == int(sel.sum())
    # the store-wide figures pool the plates exactly
    for c, ch in enumerate(store.channels):
        assert store.stats[ch]["log_mean"] == pytest.approx(np.log1p(pixels[:, c]).mean())


def test_per_plate_standardization_removes_plate_gain(tmp_path: Path):
    store = two_plate_store(tmp_path / "s.zarr")
    plates = store.metadata["Metadata_Plate"].to_numpy()
    x, rows = _batch(store, intensity="log", normalize="plate")
    for p in ("P0", "P1"):  # every plate is centred and scaled on its own
        v = x[plates[rows] == p]
        assert abs(float(v.mean())) < 0.05 and abs(float(v.std()) - 1) < 0.05
    x, rows = _batch(store, intensity="log", normalize="store")  # one set for both: plates differ
    gap = float(x[plates[rows] == "P1"].mean() - x[plates[rows] == "P0"].mean())
    assert gap > 1.0
    x, rows = _batch(store, intensity="log", normalize="negcon")  # controls at 0, treated above
    ctrl = (store.metadata["Metadata_control_type"] == "negcon").to_numpy()[rows]
    assert abs(float(x[ctrl].mean())) < 0.05 and float(x[~ctrl].mean()) > 1.0


def test_log_intensity_is_log1p_then_standardized(tmp_path: Path):
    store = two_plate_store(tmp_path / "s.zarr")
    x, rows = _batch(store, intensity="log", normalize="store")
    norm = from_store(store, LoaderConfig(intensity="log", normalize="store"))
    raw = torch.from_numpy(store.images[:][rows].astype(np.float32))
    want = (raw.log1p() - torch.tensor(norm.mean[0])[None, :, None, None]) / torch.tensor(
        norm.std[0]
    )[None, :, None, None]
    torch.testing.assert_close(x, want, atol=1e-4, rtol=1e-4)


def test_new_plate_brings_its_own_statistics_and_store_scope_keeps_the_training_ones(tmp_path):
    train = two_plate_store(tmp_path / "train.zarr")
    new = two_plate_store(tmp_path / "new.zarr", gains=(5.0, 7.0))
    per_plate = Normalization.from_dict(from_store(train, LoaderConfig()).to_dict())  # round trip
    applied = for_inference(per_plate, new)
    np.testing.assert_allclose(applied.mean, from_store(new, LoaderConfig()).mean)
    store_wide = from_store(train, LoaderConfig(normalize="store"))
    assert for_inference(store_wide, new) is store_wide
    legacy = Normalization.from_dict({"mean": [1.0, 2.0], "std": [3.0, 4.0]})  # old checkpoints
    assert (legacy.transform, legacy.scope, legacy.mean.shape) == ("linear", "store", (1, 2))


def test_missing_statistics_are_a_clear_error(tmp_path: Path):
    store = two_plate_store(tmp_path / "s.zarr")
    attrs = dict(store.attrs)
    st.write_attrs(tmp_path / "s.zarr", {"plate_stats": {}})
    with pytest.raises(CellmorphError, match="re-run convert"):
        _batch(st.open_store(tmp_path / "s.zarr"))
    no_ctrl = {p: {"all": v["all"], "negcon": None} for p, v in attrs["plate_stats"].items()}
    st.write_attrs(tmp_path / "s.zarr", {"plate_stats": no_ctrl})
    with pytest.raises(CellmorphError, match="no negative-control wells.*normalize=plate"):
        _batch(st.open_store(tmp_path / "s.zarr"), normalize="negcon")
