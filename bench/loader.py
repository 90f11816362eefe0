"""Loader throughput on the same sites and the same cores, against the original study's path.

Writes ``--sites`` synthetic sites as JUMP-sized TIFFs (1080x1080 uint16, one file per
channel, 5 channels; ``cellmorph.synth``) and packs them into a 160 px store, then measures
images/s of:

- ``a_original``: the original study's path: a torch Dataset reading each site's TIFFs with
  tifffile, resizing and augmenting with torchvision transforms, in a DataLoader with workers;
- ``b_torch``: the torch loader on the store; ``c_dali_cpu``: DALI (CPU) on the store;
- ``d_read``: the store read path alone (rows -> decoded uint16, ShardReader, no augmentation),
  every chunk checked (its crc32c, and that it is the row's chunk);
- ``d_read_unchecked``: the same reader with the per-chunk checks removed (a subclass here, not
  a product option), so ``verify_cost`` = d_read / d_read_unchecked is the price of the checks;
  ``crc32c_1thread``: the check alone over the same chunks, ``crc_vs_decode`` its time as a
  fraction of decoding them (one thread each: the low-noise figure on a busy machine);
- ``e_decode``: its ceiling: numcodecs decoding the same chunks from bytes already in memory
  (same thread count as the reader; ``e_decode_1thread`` on one thread);
- ``zarr_rows``: zarr-python reading the same rows one call per image (what the reader replaces);
- ``train_cpu``: MobileNetV2 forward+backward on the CPU at the batch and the image size the
  loaders produce (128 px from the 160 px store) — what CPU training consumes;
- ``g_dali_gpu`` (only with CUDA): DALI on the GPU from a page-cached LZ4 store at 128 px.

Ratios: ``store_vs_original`` = best of (b, c) / a (goal >= 10), ``read_vs_decode`` = d / e
(goal >= 0.5), ``loader_vs_train_cpu`` = best of (b, c) / train_cpu (goal >= 3). Prints one
JSON object. Run: ``.venv/bin/python bench/loader.py [--sites 96] [--workers 2]`` (a smoke run:
``--sites 8 --tiff-size 64 --batch 4 --seconds 0 --rounds 1``);
``--read-only`` measures only the read path (d, d_read_unchecked, e, zarr_rows).

Cell stores (``--crop-size 96``): the store is a cell store converted the way
bench/convert_cells.py builds it (``--sites`` copies of the real JUMP site in tests/data, 109
nuclei each from CellProfiler's table, ``convert --crop-size --locations`` with the converter's
default codec and shard size), so the crops are real pixels. The loaders run with what a user's
config gets on that store: ``loader.image_size`` resolved from it (96 px -> 76 px), the default
augmentations, and ``loader.batch_size``'s default unless ``--batch`` is given; ``train_cpu`` is
measured at that batch and image size. b, c, d, e, zarr_rows and ``loader_vs_train_cpu`` are
measured as above (rates are crops/s); ``a_original`` and ``store_vs_original`` are null (the
original study's path reads whole sites, it never cut crops), ``g_dali_gpu`` is null (the GPU
check measures DALI on the GPU), ``--tiff-size`` does not apply (the real site is 1080 px).
Smoke run: ``--crop-size 32 --sites 1 --batch 4 --seconds 0 --rounds 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numcodecs
import numpy as np
import pandas as pd
import tifffile
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from cellmorph import store as st
from cellmorph.config import (
    Config,
    ConvertConfig,
    DataConfig,
    LoaderConfig,
    ModelConfig,
    SynthConfig,
    resolve_from_store,
)
from cellmorph.loaders import ShardReader, build_loader
from cellmorph.loaders.stats import group_key, store_stats, sums_by_group
from cellmorph.shardfile import crc32c
from cellmorph.synth import CHANNELS, generate_plate

CPU = torch.device("cpu")


def make_sites(out: Path, sites: int, size: int = 1080) -> pd.DataFrame:
    """JUMP-sized synthetic TIFFs; one row per site with its five channel paths."""
    per_well = 4
    wells = -(-sites // per_well)
    cols = min(24, wells)
    rows = -(-wells // cols)
    cfg = SynthConfig(out=str(out), size=size, plates=1, rows=rows, cols=cols, sites=per_well)
    csv = generate_plate(cfg, progress=False)
    df = pd.read_csv(csv).head(sites)
    for ch in CHANNELS:
        df[ch] = [
            str(csv.parent / p / f)
            for p, f in zip(df[f"PathName_Orig{ch}"], df[f"FileName_Orig{ch}"])
        ]
    return df


def build_store(path: Path, df: pd.DataFrame, size: int, codec: str) -> st.Store:
    """Pack the sites at ``size`` px (torch antialiased resize), shard-aligned writes.

    The statistics attrs (``stats``, ``plate_stats``) are computed as conversion computes them:
    per-shard sums by plate (``sums_by_group``), pooled by ``store_stats``."""
    n, shard = len(df), 64
    arr = st.create_images(path, n, list(CHANNELS), size, codec=codec, shard_size=shard)
    sample, sums = [], []
    plates = df["Metadata_Plate"].astype(str).tolist()
    for s in range(0, n, shard):
        block = np.stack([_read_resized(df.iloc[i], size) for i in range(s, min(n, s + shard))])
        arr[s : s + len(block)] = block
        sample.append(block[:8])
        sums.append(sums_by_group(block, [group_key(p, False) for p in plates[s : s + shard]]))
    stats = store_stats(sums, np.concatenate(sample), list(CHANNELS), size * size)
    st.write_attrs(path, stats)
    md = df[["Metadata_Plate", "Metadata_Well", "Metadata_Site"]].assign(checksum="")
    st.write_metadata(path, md)
    st.write_quarantine(path, [])
    return st.open_store(path)


def build_cell_store(root: Path, sites: int, crop: int) -> st.Store:
    """A cell store of ``crop`` px crops from ``sites`` copies of the real site, converted as
    bench/convert_cells.py converts it (one worker, the converter's default codec and shards)."""
    # bench/ is sys.path[0] when a bench script runs; its input builder is the one to share.
    from convert_cells import make_input, run_convert

    csv, locs, _ = make_input(root / "cells_input", sites)
    defaults = ConvertConfig()
    out = root / "cells.zarr"
    run_convert(csv, locs, out, crop, defaults.shard_size, defaults.codec)
    return st.open_store(out)


def _read_resized(site: pd.Series, size: int) -> np.ndarray:
    img = torch.from_numpy(
        np.stack([tifffile.imread(site[ch]) for ch in CHANNELS]).astype(np.float32)
    )
    small = F.interpolate(img[None], size=(size, size), mode="bilinear", antialias=True)[0]
    return small.round().clamp(0, 65535).numpy().astype(np.uint16)


class OriginalDataset(Dataset):
    """The original study's input path: TIFFs per site, torchvision transforms per image."""

    def __init__(self, df: pd.DataFrame, size: int):
        self.paths = df[list(CHANNELS)].to_numpy().tolist()
        self.tf = v2.Compose(
            [
                v2.ToDtype(torch.float32),
                v2.Resize(size, antialias=True),
                v2.RandomHorizontalFlip(),
                v2.RandomVerticalFlip(),
                v2.RandomRotation(10),
                v2.Normalize([500.0] * 5, [300.0] * 5),
            ]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = np.stack([tifffile.imread(p) for p in self.paths[i]]).astype(np.int32)
        return self.tf(torch.from_numpy(img)), 0


def rate(batches: Iterable, min_images: int, min_seconds: float) -> float:
    """Images/s over a stream of batches, the first batch (start-up) excluded."""
    it = iter(batches)
    next(it)
    n, t0 = 0, time.perf_counter()
    for b in it:
        n += len(b[0])
        if n >= min_images and time.perf_counter() - t0 >= min_seconds:
            break
    return n / (time.perf_counter() - t0)


def epochs(loader, first: int = 0):
    e = first
    while True:
        loader.set_epoch(e)
        yield from loader
        e += 1


def bench_original(df: pd.DataFrame, workers: int, batch: int, seconds: float = 4) -> float:
    dl = DataLoader(OriginalDataset(df, 128), batch_size=batch, num_workers=workers, shuffle=True)

    def forever():
        while True:
            yield from dl

    return rate(forever(), min_images=len(df), min_seconds=seconds)


def bench_loader(
    store: st.Store, cfg: LoaderConfig, rows: np.ndarray, device=CPU, seconds: float = 4
) -> float:
    loader = build_loader(
        store, rows, np.zeros(len(store), np.int64), cfg, train=True, device=device
    )
    r = rate(epochs(loader), min_images=2 * len(rows), min_seconds=seconds)
    if hasattr(loader, "close"):
        loader.close()
    return r


class UncheckedReader(ShardReader):
    """The baseline for the checks' cost: the same reads, each chunk's crc32c cut off unread."""

    def _payload(self, raw: memoryview, shard: int, row: int) -> memoryview:
        return raw[:-4]


def _read_rate(reader: ShardReader, batches: list[np.ndarray]) -> float:
    reader.read(batches[0])  # parse shard indexes, start threads
    t = time.perf_counter()
    for b in batches:
        reader.read(b)
    return sum(len(b) for b in batches) / (time.perf_counter() - t)


def bench_read(store: st.Store, threads: int, batch: int, nbatches: int) -> dict[str, float]:
    """Reader (checked and unchecked) vs decode-from-memory vs zarr-python, same batches."""
    rng = np.random.default_rng(0)
    # Distinct rows per batch: the reader decodes a repeated row once, the ceiling would not.
    batch = min(batch, len(store))
    batches = [rng.choice(len(store), batch, replace=False) for _ in range(nbatches)]
    reader = ShardReader(store, threads=threads)
    unchecked = UncheckedReader(store, threads=threads)
    d, u = 0.0, 0.0
    for _ in range(3):  # interleaved rounds, best of each: the machine is shared and noisy
        d = max(d, _read_rate(reader, batches))
        u = max(u, _read_rate(unchecked, batches))

    raw = reader.read_raw(np.arange(len(store)))
    codec = numcodecs.get_codec({"id": reader.codec_id})
    out = np.empty((batch, *store.shape[1:]), np.uint16)

    def decode_all(mapper: Callable) -> float:
        t = time.perf_counter()
        for b in batches:
            list(mapper(lambda j, b=b: codec.decode(raw[b[j]], out=out[j]), range(batch)))
        return batch * nbatches / (time.perf_counter() - t)

    with ThreadPoolExecutor(threads) as pool:
        e = decode_all(pool.map)
    e1 = decode_all(map)
    t = time.perf_counter()
    for b in batches:  # what the check adds per chunk: one crc32c over its compressed bytes
        for j in range(batch):
            crc32c(raw[b[j]])
    c1 = batch * nbatches / (time.perf_counter() - t)
    store.images[0]  # first-call set-up excluded, as for the reader
    t = time.perf_counter()
    for b in batches[:3]:
        for r in b:
            store.images[int(r)]
    z = 3 * batch / (time.perf_counter() - t)
    return {"d_read": d, "d_read_unchecked": u, "verify_cost": d / u, "e_decode": e,
            "e_decode_1thread": e1, "crc32c_1thread": c1, "crc_vs_decode": e1 / c1,
            "zarr_rows": z}  # fmt: skip


def bench_train_cpu(batch: int = 64, size: int = 128, steps: int = 3,
                    seconds: float = 0.0) -> float:  # fmt: skip
    """Images/s of MobileNetV2 forward+backward+AdamW on the CPU at ``batch`` x 5 x ``size``
    px: at least ``steps`` steps and ``seconds`` timed, the first step (set-up) excluded."""
    from cellmorph.model import build_model

    model = build_model(ModelConfig(), 5, 10)
    opt = torch.optim.AdamW(model.parameters())
    x, y = torch.randn(batch, 5, size, size), torch.randint(0, 10, (batch,))
    n, t = -1, 0.0
    while n < steps or time.perf_counter() - t < seconds:
        if n == 0:
            t = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        n += 1
    return batch * n / (time.perf_counter() - t)


def bench_dali_gpu(df: pd.DataFrame, tmp: Path, workers: int) -> float:
    store = build_store(tmp / "store128_lz4.zarr", df, 128, "lz4")
    cfg = LoaderConfig(
        kind="dali",
        batch_size=512,
        image_size=128,
        view_fraction=1.0,
        augment=["hflip", "vflip", "rot90"],
        num_workers=workers,
        prefetch=4,
    )
    rows = np.resize(np.arange(len(store)), 512 * 40)
    for _ in range(2):  # page-cache the store
        ShardReader(store).read_raw(np.arange(len(store)))
    return bench_loader(store, cfg, rows, device=torch.device("cuda", 0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=None,
                    help="sites (default 96); with --crop-size, copies of the real site (default 24)")  # fmt: skip
    ap.add_argument("--crop-size", type=int, default=None,
                    help="measure a cell store of crops this size (96: the pilot's) instead")  # fmt: skip
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--batch", type=int, default=None,
                    help="default 64; with --crop-size, loader.batch_size's default")  # fmt: skip
    ap.add_argument("--dir", default=None, help="keep the TIFFs and store here (default: temp)")
    ap.add_argument("--read-only", action="store_true", help="measure only the read path")
    ap.add_argument("--tiff-size", type=int, default=1080, help="px of the synthetic TIFFs")
    ap.add_argument("--seconds", type=float, default=4, help="least seconds timed per path")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (best kept)")
    args = ap.parse_args()
    cells = args.crop_size is not None
    if args.sites is None:
        args.sites = 24 if cells else 96
    if args.batch is None:
        args.batch = LoaderConfig().batch_size if cells else 64
    tmp = Path(args.dir or tempfile.mkdtemp(prefix="cm-bench-loader-"))
    try:
        run(args, tmp)
    finally:
        if args.dir is None:  # ~1 GB of TIFFs at the default size
            shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, tmp: Path) -> None:
    t0 = time.perf_counter()
    cells = args.crop_size is not None
    if cells:
        df = None
        store = build_cell_store(tmp, args.sites, args.crop_size)
        what = f"{len(store)} crops of {args.crop_size} px, {store.attrs.get('codec', '?')}"
        source = "copies of the real JUMP site (1080x1080 uint16 LZW, 109 nuclei each)"
    else:
        df = make_sites(tmp / "tiffs", args.sites, args.tiff_size)
        store = build_store(tmp / "store.zarr", df, 160, "zstd")
        what = f"{store.shape[-1]} px, zstd, {len(store)} images"
        source = f"{args.tiff_size}x{args.tiff_size} uint16, 5 files per site"
    prep_s = time.perf_counter() - t0
    # The image size a run on this store trains at: resolved from the store as a run resolves it.
    size = resolve_from_store(Config(data=DataConfig(store=str(store.path)))).loader.image_size
    assert size is not None

    w = args.workers
    # Epochs of >= ~1,000 images (or the whole store), so per-epoch start-up is amortized as
    # in a real dataset; the sampling still draws a fresh permutation per epoch.
    rows = np.resize(np.arange(len(store)), max(16 * args.batch, len(store)))
    base = LoaderConfig(batch_size=args.batch, num_workers=w, reader_threads=w, dali_threads=w,
                        image_size=size)  # fmt: skip
    res: dict[str, float | int | str | list | None] = {
        "machine": f"{os.cpu_count()} cores, cuda={torch.cuda.is_available()}",
        "sites": args.sites,
        "tiff": source,
        "store": what,
        "image_size": size,
        "batch": args.batch,
        "workers": w,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "prep_s": round(prep_s, 1),
    }
    if args.read_only:
        res.update(bench_read(store, w, args.batch, 30))
        res["total_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}))
        return
    sec = args.seconds

    def loader(kind: str) -> Callable[[], float]:
        cfg = base.model_copy(update={"kind": kind})
        return lambda: bench_loader(store, cfg, rows, seconds=sec)

    paths: dict[str, Callable[[], float]] = {}
    if df is not None:
        paths["a_original"] = lambda: bench_original(df, w, 16, sec)
    else:  # the original study read whole sites; it has no cell crops to compare
        res["a_original"] = None
    paths.update(b_torch=loader("torch"), c_dali_cpu=loader("dali"),
                 train_cpu=lambda: bench_train_cpu(args.batch, size, seconds=sec))  # fmt: skip
    # The machine is shared and noisy: interleave the rounds and keep each path's best (the
    # training side included, so the ratio is not flattered by one slow training sample).
    for _ in range(args.rounds):
        for key, fn in paths.items():
            res[key] = max(res.get(key) or 0.0, fn())
    res.update(bench_read(store, w, args.batch, 30))
    on_gpu = torch.cuda.is_available() and df is not None
    res["g_dali_gpu"] = bench_dali_gpu(df, tmp, 8) if on_gpu else None
    best = max(res["b_torch"], res["c_dali_cpu"])
    res["store_vs_original"] = best / res["a_original"] if df is not None else None
    res["read_vs_decode"] = res["d_read"] / res["e_decode"]
    res["loader_vs_train_cpu"] = best / res["train_cpu"]
    res["total_s"] = round(time.perf_counter() - t0, 1)
    print(
        json.dumps(
            {k: round(v, 2) if isinstance(v, float) else v for k, v in res.items()}, indent=2
        )
    )


if __name__ == "__main__":
    main()
