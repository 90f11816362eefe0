"""Loaders: sampling per rank, label alignment, torch/DALI parity, clear errors."""

from __future__ import annotations

import builtins

import numpy as np
import pytest
import torch
from helpers import N_ROWS, coded_pixels, loader_cfg, make_pixel_store, row_labels, textured_pixels

from cellmorph import store as st
from cellmorph.config import LoaderConfig
from cellmorph.errors import CellmorphError
from cellmorph.loaders import build_loader
from cellmorph.loaders.normalize import from_store
from cellmorph.loaders.transform import geometry

pytestmark = pytest.mark.filterwarnings("ignore:Numcodecs codecs are not in the Zarr")

N = N_ROWS
CPU = torch.device("cpu")
ALL_OPS = ["hflip", "vflip", "rot90", "rotate", "brightness_contrast"]
make_store = make_pixel_store
_cfg, _labels = loader_cfg, row_labels


@pytest.fixture(scope="module")
def textured(tmp_path_factory) -> st.Store:
    return make_store(tmp_path_factory.mktemp("tex") / "s.zarr", textured_pixels(), codec="lz4")


def _decode_rows(x: torch.Tensor, store: st.Store, cfg: LoaderConfig) -> np.ndarray:
    """Invert normalization on channel 0 of the coded store: the row each image came from."""
    norm = from_store(store, cfg)
    v = x[:, 0].numpy().astype(np.float64) * norm.std[0, 0] + norm.mean[0, 0]
    v = np.expm1(v) if norm.log else v
    assert np.allclose(v, v.mean(axis=(1, 2), keepdims=True), atol=0.05)  # still flat
    return np.rint((v.mean(axis=(1, 2)) - 1000) / 10).astype(np.int64)


def _epoch(loader, epoch: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


@pytest.mark.parametrize("kind", ["torch", "dali"])
@pytest.mark.parametrize("augment", [[], ["hflip", "vflip", "rot90", "rotate"]])
def test_pixels_labels_and_rows_agree(coded, kind, augment):
    cfg = _cfg(kind=kind, augment=augment, rotate_degrees=15, num_workers=1)
    rows = np.arange(3, N)
    loader = build_loader(coded, rows, _labels(), cfg, train=True, device=CPU, seed=4)
    batches = _epoch(loader, 2)
    assert len(batches) == len(loader)
    for x, y, r in batches:
        assert x.dtype == torch.float32 and x.shape == (8, 2, 16, 16) and x.is_contiguous()
        assert y.dtype == torch.int64 and r.dtype == torch.int64
        np.testing.assert_array_equal(_decode_rows(x, coded, cfg), r.numpy())
        np.testing.assert_array_equal(y.numpy(), _labels()[r.numpy()])
    seen = np.concatenate([r.numpy() for _, _, r in batches])
    assert set(seen) == set(rows)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_train_epochs_equal_length_across_ranks_and_cover_rows(coded, world_size):
    rows = np.arange(N)
    cfg = _cfg(augment=[])
    per_rank = []
    for rank in range(world_size):
        loader = build_loader(
            coded, rows, _labels(), cfg, train=True, device=CPU, rank=rank, world_size=world_size
        )
        batches = _epoch(loader, 1)
        assert len(batches) == len(loader)
        per_rank.append(np.concatenate([r.numpy() for _, _, r in batches]))
    assert len({len(p) for p in per_rank}) == 1  # DDP never waits on a short rank
    assert set(np.concatenate(per_rank)) == set(rows)
    again = build_loader(
        coded, rows, _labels(), cfg, train=True, device=CPU, rank=0, world_size=world_size
    )
    e1 = np.concatenate([r.numpy() for _, _, r in _epoch(again, 1)])
    e2 = np.concatenate([r.numpy() for _, _, r in _epoch(again, 2)])
    np.testing.assert_array_equal(e1, per_rank[0])  # an epoch is reproducible
    assert not np.array_equal(e1, e2)  # and reshuffled per epoch


@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_oversampling_counts_give_the_epochs_of_the_oversampled_order(coded, kind):
    """Training takes the index's rows and counts; its batches are those of the order listed."""
    rows = np.arange(0, N, 2, dtype=np.int32)
    repeats = (np.arange(len(rows)) % 3).astype(np.uint8)  # 0, 1 or 2 copies
    cfg = _cfg(kind=kind, augment=[], num_workers=1)
    counted = build_loader(coded, rows, _labels(), cfg, train=True, device=CPU, seed=3, rank=1,
                           world_size=2, repeats=repeats)  # fmt: skip
    listed = build_loader(coded, np.repeat(rows, repeats), _labels(), cfg, train=True,
                          device=CPU, seed=3, rank=1, world_size=2)  # fmt: skip
    assert len(counted) == len(listed)
    for epoch in (0, 1):
        got, want = _epoch(counted, epoch), _epoch(listed, epoch)
        for (x, y, r), (x2, y2, r2) in zip(got, want, strict=True):
            assert torch.equal(r, r2) and torch.equal(y, y2) and torch.equal(x, x2)
    with pytest.raises(ValueError, match="an evaluation covers each row once"):
        build_loader(coded, rows, _labels(), cfg, train=False, device=CPU, repeats=repeats)


@pytest.mark.parametrize("kind", ["torch", "dali"])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_covers_each_row_once_in_order(coded, kind, world_size):
    rows = np.arange(1, N, 2)  # 25 rows: uneven parts and partial last batches
    cfg = _cfg(kind=kind, num_workers=1)
    seen = []
    for rank in range(world_size):
        loader = build_loader(
            coded, rows, _labels(), cfg, train=False, device=CPU, rank=rank, world_size=world_size
        )
        batches = list(loader)
        assert len(batches) == len(loader)
        for x, _, r in batches:
            np.testing.assert_array_equal(_decode_rows(x, coded, cfg), r.numpy())
        seen.extend(int(v) for _, _, r in batches for v in r)
    assert seen == rows.tolist()


@pytest.mark.parametrize("world_size", [2, 3])
def test_dali_epoch_lengths_match_torch_on_every_rank(coded, world_size):
    for rank in range(world_size):
        lengths = {}
        for kind in ("torch", "dali"):
            loader = build_loader(
                coded,
                np.arange(N),
                _labels(),
                _cfg(kind=kind, num_workers=1),
                train=True,
                device=CPU,
                rank=rank,
                world_size=world_size,
            )
            lengths[kind] = [len(loader), len(_epoch(loader, 0)), len(_epoch(loader, 1))]
        assert lengths["torch"] == lengths["dali"]
        assert len(set(lengths["dali"])) == 1


def test_dali_recovers_from_a_broken_off_epoch(coded):
    cfg = _cfg(kind="dali", augment=[], num_workers=1)
    ref = build_loader(coded, np.arange(N), _labels(), _cfg(), train=True, device=CPU)
    loader = build_loader(coded, np.arange(N), _labels(), cfg, train=True, device=CPU)
    loader.set_epoch(0)
    next(iter(loader))  # e.g. train.max_steps_per_epoch stops early
    for epoch in (1, 3):  # and a resumed run may skip epochs
        got = [r for _, _, r in _epoch(loader, epoch)]
        want = [r for _, _, r in _epoch(ref, epoch)]
        assert len(got) == len(want)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("image_size", [16, 12])  # 24 px store: crop only / resize to 15 + crop
def test_dali_cpu_matches_torch_without_augmentation(textured, image_size):
    cfg = _cfg(augment=[], image_size=image_size)
    out = {}
    for kind in ("torch", "dali"):
        loader = build_loader(
            textured, np.arange(N), _labels(), cfg.model_copy(update={"kind": kind}),
            train=True, device=CPU, seed=2,
        )  # fmt: skip
        out[kind] = _epoch(loader, 0)
    for (x1, y1, r1), (x2, y2, r2) in zip(out["torch"], out["dali"]):
        assert torch.equal(r1, r2) and torch.equal(y1, y2)
        assert x1.shape == x2.shape == (8, 5, image_size, image_size)
        torch.testing.assert_close(x1, x2, atol=1e-4, rtol=1e-4)


def test_dali_cpu_matches_torch_statistically_with_augmentation(textured):
    cfg = _cfg(augment=ALL_OPS, rotate_degrees=15, brightness=0.2, contrast=0.2)
    xs = {}
    for kind in ("torch", "dali"):
        loader = build_loader(
            textured, np.arange(N), _labels(), cfg.model_copy(update={"kind": kind}),
            train=True, device=CPU, seed=5,
        )  # fmt: skip
        xs[kind] = torch.cat([x for x, _, _ in _epoch(loader, 0)])
    plain = build_loader(
        textured, np.arange(N), _labels(), _cfg(augment=[]), train=True, device=CPU
    )
    x0 = torch.cat([x for x, _, _ in _epoch(plain, 0)])
    assert xs["torch"].shape == xs["dali"].shape == x0.shape
    assert not torch.allclose(xs["torch"], x0, atol=1e-2)  # augmentation did something
    m_t, m_d = xs["torch"].mean(dim=(0, 2, 3)), xs["dali"].mean(dim=(0, 2, 3))
    s_t, s_d = xs["torch"].std(dim=(0, 2, 3)), xs["dali"].std(dim=(0, 2, 3))
    torch.testing.assert_close(m_t, m_d, atol=0.02, rtol=0)
    torch.testing.assert_close(s_t, s_d, atol=0.02, rtol=0.02)
    # Both loaders draw the same per-sample parameters, so beyond statistics the images agree
    # up to interpolation rounding: a swapped flip axis or rotation sign would fail here.
    # (The crop's outer pixel ring can sample the rotation's fill in this tiny store, where the
    # two libraries treat the edge differently; it is excluded.)
    inner = (..., slice(1, -1), slice(1, -1))
    torch.testing.assert_close(xs["torch"][inner], xs["dali"][inner], atol=2e-3, rtol=1e-3)


def test_geometry_keeps_rotation_corners_in_the_margin():
    g = geometry(160, LoaderConfig())
    assert (g.store_size, g.resize_to, g.crop) == (160, 160, 128)  # defaults: crop, no resize
    g = geometry(256, LoaderConfig(image_size=128, view_fraction=0.8))
    assert (g.resize_to, g.crop) == (160, 128)


def test_imagenet_normalization(tmp_path, coded):
    with pytest.raises(CellmorphError, match="loader.normalize"):
        build_loader(
            coded, np.arange(N), _labels(), _cfg(normalize="imagenet", intensity="linear"),
            train=False, device=CPU,
        )  # fmt: skip
    rgb = make_store(tmp_path / "rgb.zarr", coded_pixels(c=3))
    loader = build_loader(
        rgb, np.arange(4), _labels(), _cfg(normalize="imagenet", intensity="linear"),
        train=False, device=CPU,
    )  # fmt: skip
    x, _, _ = next(iter(loader))
    want = (1000 / 65535 - 0.485) / 0.229  # row 0, channel 0 in [0, 1] units
    assert abs(float(x[0, 0].mean()) - want) < 1e-4


def test_bad_inputs_name_the_key(coded, monkeypatch):
    with pytest.raises(CellmorphError, match="labels"):
        build_loader(coded, np.arange(N), _labels(N - 1), _cfg(), train=True, device=CPU)
    with pytest.raises(CellmorphError, match="rows outside"):
        build_loader(coded, np.array([0, N]), _labels(), _cfg(), train=True, device=CPU)
    real_import = builtins.__import__

    def no_dali(name, *args, **kwargs):
        if name.startswith("nvidia.dali"):
            raise ImportError("No module named 'nvidia.dali'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_dali)
    with pytest.raises(CellmorphError, match="loader.kind"):
        build_loader(coded, np.arange(N), _labels(), _cfg(kind="dali"), train=True, device=CPU)


@pytest.mark.gpu
@pytest.mark.parametrize("augment", [[], ALL_OPS])
def test_dali_gpu_inflate_matches_cpu(tmp_path, augment):
    store = make_store(tmp_path / "lz4.zarr", textured_pixels(), codec="lz4")
    gpu = torch.device("cuda", torch.cuda.current_device())
    out = {}
    for device in (CPU, gpu):
        loader = build_loader(
            store, np.arange(N), _labels(), _cfg(kind="dali", augment=augment, num_workers=1),
            train=True, device=device, seed=1,
        )  # fmt: skip
        assert getattr(loader, "raw", False) is (device.type == "cuda")  # GPU inflate in use
        out[device.type] = _epoch(loader, 0)
    for (x1, y1, r1), (x2, y2, r2) in zip(out["cpu"], out["cuda"]):
        assert x2.device.type == "cuda" and y2.device.type == "cuda" and r2.device.type == "cpu"
        assert torch.equal(r1, r2) and torch.equal(y1, y2.cpu())
        torch.testing.assert_close(x1, x2.cpu(), atol=1e-3, rtol=1e-3)


def test_high_uint16_values_survive_the_float_conversion():
    from cellmorph.loaders.transform import to_float

    a = np.array([[0, 1, 32768, 65535]], dtype=np.uint16)
    want = torch.tensor([[0.0, 1.0, 32768.0, 65535.0]])
    assert torch.equal(to_float(torch.from_numpy(a)), want)
    assert torch.equal(to_float(torch.from_numpy(a.view(np.int16))), want)  # the GPU path's bits


@pytest.mark.gpu
def test_torch_loader_on_cuda_matches_cpu(textured):
    gpu = torch.device("cuda", torch.cuda.current_device())
    cfg = _cfg(augment=["hflip", "vflip", "brightness_contrast"], num_workers=1)
    out = {}
    for device in (CPU, gpu):
        loader = build_loader(textured, np.arange(N), _labels(), cfg, train=True, device=device)
        out[device.type] = _epoch(loader, 0)
    for (x1, y1, r1), (x2, y2, r2) in zip(out["cpu"], out["cuda"]):
        assert x2.device.type == "cuda" and torch.equal(r1, r2) and torch.equal(y1, y2.cpu())
        torch.testing.assert_close(x1, x2.cpu(), atol=1e-4, rtol=1e-4)
