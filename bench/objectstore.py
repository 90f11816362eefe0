"""Read throughput of a store in a bucket of a local S3 server against the same store on disk.

Writes a ``--images`` store (5 x 160 x 160 uint16, zstd, 256 images per shard, synthetic cell-like
texture), copies its files into a bucket of moto's standalone S3 server started here on
127.0.0.1 (from ``.venv-servers``, ``make servers``; ended by its process id), and measures the
fast reader (``ShardReader``, every chunk checked) on random batches of ``--batch`` rows, one
permutation of the store per pass:

- ``local``: the store on local disk (files in the page cache after a warm-up pass);
- ``s3``: the bucket, no cache (every pass fetches its byte ranges);
- ``s3_cache_cold``: the bucket with ``loader.cache_dir`` empty (first pass: fetch and keep);
- ``s3_cache_warm``: the next pass, served from the cache.

Ratios against ``local`` (goals on loopback: ``s3_vs_local`` >= 0.5,
``warm_cache_vs_local`` >= 0.9). Prints one JSON object.
Run: ``.venv/bin/python bench/objectstore.py [--images 1024] [--passes 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph import remote
from cellmorph import store as st
from cellmorph.loaders import ShardReader

ROOT = Path(__file__).resolve().parent.parent
CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]


def make_store(path: Path, n: int, size: int = 160, shard: int = 256) -> None:
    """Smooth blobs plus noise: compresses like microscopy (not like pure noise or zeros)."""
    rng = np.random.default_rng(0)
    arr = st.create_images(path, n, CHANNELS, size, codec="zstd", shard_size=shard)
    yy, xx = np.mgrid[0:size, 0:size]
    sums = []
    for start in range(0, n, shard):
        block = np.empty((min(shard, n - start), len(CHANNELS), size, size), np.uint16)
        for i in range(len(block)):
            cx, cy = rng.uniform(20, size - 20, (2, 12))
            blobs = np.exp(-((xx[..., None] - cx) ** 2 + (yy[..., None] - cy) ** 2) / 90).sum(-1)
            for c in range(len(CHANNELS)):
                noise = rng.normal(0, 40, (size, size))
                block[i, c] = np.clip(300 + 2500 * blobs * (0.5 + c / 5) + noise, 0, 65535)
        arr[start : start + len(block)] = block
        sums += [st.image_checksum(b) for b in block]
    md = pd.DataFrame({st.PLATE: "P1", st.WELL: [f"W{i // 4:04d}" for i in range(n)],
                       st.SITE: [i % 4 for i in range(n)], st.CHECKSUM: sums})  # fmt: skip
    st.write_metadata(path, md)
    st.write_quarantine(path, [])
    st.write_attrs(path, {"complete": True})


class S3Server:
    """moto's standalone server on a free port; ended by its process id."""

    def __init__(self) -> None:
        exe = Path(os.environ.get("CELLMORPH_SERVERS_VENV", ROOT / ".venv-servers")) / "bin"
        if not (exe / "moto_server").exists():
            raise SystemExit(f"{exe / 'moto_server'} is missing: run `make servers` first")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([str(exe / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)  # fmt: skip
        for _ in range(300):
            try:
                urllib.request.urlopen(self.url, timeout=1)
                return
            except OSError:
                time.sleep(0.1)
        raise SystemExit("the S3 server did not start")

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=20)


def passes(reader: ShardReader, n: int, batch: int, count: int, seed: int) -> list[float]:
    """Images/s of each pass: one permutation of the store in batches."""
    out = []
    for p in range(count):
        order = np.random.default_rng([seed, p]).permutation(n)
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            reader.read(order[i : i + batch])
        out.append(n / (time.perf_counter() - t0))
    return out


def run(args: argparse.Namespace, tmp: Path) -> dict:
    local = tmp / "store.zarr"
    make_store(local, args.images)
    server = S3Server()
    try:
        os.environ.update(AWS_ENDPOINT_URL=server.url, AWS_ACCESS_KEY_ID="bench",
                          AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1")  # fmt: skip
        urllib.request.urlopen(urllib.request.Request(f"{server.url}/bench", method="PUT"))
        url = "s3://bench/store.zarr"
        for f in local.rglob("*"):
            if f.is_file():
                remote.write(f"{url}/{f.relative_to(local)}", f.read_bytes())
        n, b, k, t = args.images, args.batch, args.passes, args.threads
        loc = passes(ShardReader(st.open_store(local), threads=t), n, b, k + 1, 0)[1:]
        s3 = passes(ShardReader(st.open_store(url), threads=t), n, b, k, 0)
        cached = ShardReader(st.open_store(url), threads=t, cache_dir=str(tmp / "cache"),
                             cache_bytes=8 << 30)  # fmt: skip
        cold, *warm = passes(cached, n, b, k + 1, 0)
    finally:
        server.stop()
    best = {"local": max(loc), "s3": max(s3), "s3_cache_cold": cold, "s3_cache_warm": max(warm)}
    mib = sum(f.stat().st_size for f in local.rglob("*") if f.is_file()) / 2**20
    return {
        "images": n, "batch": b, "reader_threads": t, "store_mib": round(mib, 1),
        "img_per_s": {k: round(v, 1) for k, v in best.items()},
        "s3_vs_local": round(best["s3"] / best["local"], 3),
        "warm_cache_vs_local": round(best["s3_cache_warm"] / best["local"], 3),
        "cold_cache_vs_local": round(cold / best["local"], 3),
        "fetched_bytes_cold_and_warm_pass": cached.fetched_bytes,  # the warm pass adds 0
        "goals": {"s3_vs_local": 0.5, "warm_cache_vs_local": 0.9},
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="loader.reader_threads")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cellmorph-bench-s3-"))
    try:
        print(json.dumps(run(args, tmp), indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
