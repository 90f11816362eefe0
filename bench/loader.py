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
- ``train_cpu``: MobileNetV2 forward+backward at batch 64, 128 px on the CPU — what CPU
  training consumes;
- ``g_dali_gpu`` (only with CUDA): DALI on the GPU from a page-cached LZ4 store at 128 px.

Ratios: ``store_vs_original`` = best of (b, c) / a (goal >= 10), ``read_vs_decode`` = d / e
(goal >= 0.5), ``loader_vs_train_cpu`` = best of (b, c) / train_cpu (goal >= 3). Prints one
JSON object. Run: ``.venv/bin/python bench/loader.py [--sites 96] [--workers 2]`` (a smoke run:
``--sites 8 --tiff-size 64 --batch 4 --seconds 0 --rounds 1``);
``--read-only`` measures only the read path (d, d_read_unchecked, e, zarr_rows).
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
from cellmorph.config import LoaderConfig, ModelConfig, SynthConfig
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


def bench_train_cpu(batch: int = 64, steps: int = 3) -> float:
    from cellmorph.model import build_model

    model = build_model(ModelConfig(), 5, 10)
    opt = torch.optim.AdamW(model.parameters())
    x, y = torch.randn(batch, 5, 128, 128), torch.randint(0, 10, (batch,))
    for i in range(steps + 1):
        if i == 1:
            t = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return batch * steps / (time.perf_counter() - t)


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
    ap.add_argument("--sites", type=int, default=96)
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--dir", default=None, help="keep the TIFFs and store here (default: temp)")
    ap.add_argument("--read-only", action="store_true", help="measure only the read path")
    ap.add_argument("--tiff-size", type=int, default=1080, help="px of the synthetic TIFFs")
    ap.add_argument("--seconds", type=float, default=4, help="least seconds timed per loader")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (best kept)")
    args = ap.parse_args()
    tmp = Path(args.dir or tempfile.mkdtemp(prefix="cm-bench-loader-"))
    try:
        run(args, tmp)
    finally:
        if args.dir is None:  # ~1 GB of TIFFs at the default size
            shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, tmp: Path) -> None:
    t0 = time.perf_counter()
    df = make_sites(tmp / "tiffs", args.sites, args.tiff_size)
    store = build_store(tmp / "store.zarr", df, 160, "zstd")
    prep_s = time.perf_counter() - t0

    w = args.workers
    # Epochs of ~1,000 images over the same sites, so per-epoch start-up is amortized as in
    # a real dataset; the sampling still draws a fresh permutation per epoch.
    rows = np.resize(np.arange(len(store)), 16 * args.batch)
    base = LoaderConfig(batch_size=args.batch, num_workers=w, reader_threads=w, dali_threads=w)
    res: dict[str, float | int | str | None] = {
        "machine": f"{os.cpu_count()} cores, cuda={torch.cuda.is_available()}",
        "sites": len(df),
        "tiff": f"{args.tiff_size}x{args.tiff_size} uint16, 5 files per site",
        "store": f"{store.shape[-1]} px, zstd, {len(store)} images",
        "workers": w,
        "prep_s": round(prep_s, 1),
    }
    if args.read_only:
        res.update(bench_read(store, w, args.batch, 30))
        res["total_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}))
        return
    # The machine is shared and noisy: interleave two rounds and keep each path's best.
    sec = args.seconds
    for _ in range(args.rounds):
        for key, fn in (
            ("a_original", lambda: bench_original(df, w, 16, sec)),
            (
                "b_torch",
                lambda: bench_loader(
                    store, base.model_copy(update={"kind": "torch"}), rows, seconds=sec
                ),  # fmt: skip
            ),
            (
                "c_dali_cpu",
                lambda: bench_loader(
                    store, base.model_copy(update={"kind": "dali"}), rows, seconds=sec
                ),  # fmt: skip
            ),
        ):
            res[key] = max(res.get(key) or 0.0, fn())
    res.update(bench_read(store, w, args.batch, 30))
    res["train_cpu"] = bench_train_cpu(args.batch)
    res["g_dali_gpu"] = bench_dali_gpu(df, tmp, 8) if torch.cuda.is_available() else None
    best = max(res["b_torch"], res["c_dali_cpu"])
    res["store_vs_original"] = best / res["a_original"]
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
