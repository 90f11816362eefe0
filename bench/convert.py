"""Conversion throughput on JUMP-sized sites (1080x1080 uint16, one TIFF per channel).

Baseline measured in the same run: reading each site's TIFFs with tifffile and resizing them
with the same antialiased resize, in one process, nothing written. Then the full conversion
(probe, decode, resize, compress, write shards, metadata, statistics) with 1 and N workers.
Rounds alternate baseline and conversions; the best of each is reported (the machine is shared).

    .venv/bin/python bench/convert.py --sites 96 --workers 2 > bench_convert.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd
import tifffile

from cellmorph.config import ConvertConfig, SynthConfig
from cellmorph.synth import generate_plate
from conversion.pack import convert
from conversion.tiffs import resize

CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]


def make_input(root: Path, sites: int, size: int) -> Path:
    """A synthetic JUMP-like plate with at least ``sites`` sites, cached between runs."""
    per_well = 4
    wells = math.ceil(sites / per_well)
    rows = min(16, max(1, math.ceil(wells / 24)))
    cols = math.ceil(wells / rows)
    cfg = SynthConfig(out=str(root), plates=1, rows=rows, cols=cols, sites=per_well, size=size)
    csv = generate_plate(cfg)
    df = pd.read_csv(csv).head(sites)
    trimmed = root / f"load_data_{sites}.csv"
    df.to_csv(trimmed, index=False)
    return trimmed


def site_files(csv: Path) -> list[list[Path]]:
    df = pd.read_csv(csv)
    return [
        [csv.parent / row[f"PathName_Orig{ch}"] / row[f"FileName_Orig{ch}"] for ch in CHANNELS]
        for _, row in df.iterrows()
    ]


def read_and_resize(sites: list[list[Path]], size: int) -> float:
    """Seconds to read and resize every site in this process (the baseline)."""
    t = time.perf_counter()
    for files in sites:
        resize([tifffile.imread(f) for f in files], size)
    return time.perf_counter() - t


def run_convert(csv: Path, out: Path, workers: int, size: int, shard: int) -> tuple[float, float]:
    """(total seconds, seconds of the packing phase alone: decode, resize, compress, write)."""
    shutil.rmtree(out, ignore_errors=True)
    cfg = ConvertConfig(load_data=str(csv), size=size, shard_size=shard, workers=workers)
    summary = convert(cfg, out)
    return summary["seconds"], summary["phases"]["pack_s"]


def store_footprint(
    out: Path, n: int, shard_size: int, target: int, size: int = 160
) -> dict[str, float]:
    """Measured files/bytes, and the extrapolation to ``target`` images at ``shard_size``."""
    files = [p for p in out.rglob("*") if p.is_file()]
    shard_bytes = sum(p.stat().st_size for p in (out / "images" / "c").rglob("*") if p.is_file())
    other = sum(p.stat().st_size for p in files) - shard_bytes
    shards = math.ceil(target / shard_size)
    per_image = shard_bytes / n
    raw = len(CHANNELS) * size * size * 2  # uint16
    return {
        "measured_images": n,
        "measured_files": len(files),
        "measured_bytes": int(shard_bytes + other),
        "bytes_per_image": round(per_image),
        "compression_ratio": round(raw / per_image, 2),
        # shard files + 2 zarr.json + parquet + csv + manifest header + one record per shard
        f"files_for_{target}": 2 * shards + 5,
        f"bytes_for_{target}": int(per_image * target + other * target / n),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sites", type=int, default=96)
    ap.add_argument("--image-size", type=int, default=1080)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=16, help="small so N workers get shards")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--data", default=os.path.join(tempfile.gettempdir(), "cellmorph-bench-convert")
    )
    args = ap.parse_args()

    root = Path(args.data)
    csv = make_input(root / "raw", args.sites, args.image_size)
    sites = site_files(csv)
    input_mb = sum(f.stat().st_size for s in sites for f in s) / 1e6
    read_and_resize(sites, args.size)  # warm the page cache: both sides read from memory
    cn = f"convert_{args.workers}"
    times: dict[str, list[float]] = {
        "baseline": [],
        "convert_1": [],
        cn: [],
        "pack_1": [],
        f"pack_{args.workers}": [],
    }
    for _ in range(args.rounds):
        times["baseline"].append(read_and_resize(sites, args.size))
        for w, out in ((1, "store1.zarr"), (args.workers, "storeN.zarr")):
            total, pack = run_convert(csv, root / out, w, args.size, args.shard_size)
            times[f"convert_{w}"].append(total)
            times[f"pack_{w}"].append(pack)
    n = len(sites)
    best = {k: min(v) for k, v in times.items()}
    rate = {k: n / t for k, t in best.items()}
    report = {
        "machine": f"{os.cpu_count()} CPU cores, no GPU",
        "sites": n,
        "tiff": f"{args.image_size}x{args.image_size} uint16, 5 files per site",
        "store_size": args.size,
        "input_mb": round(input_mb, 1),
        "images_per_s": {k: round(v, 2) for k, v in rate.items()},
        "mb_per_s": {k: round(input_mb / t, 1) for k, t in best.items()},
        "ms_per_image": {k: round(1000 * t / n, 1) for k, t in best.items()},
        "convert_1_vs_baseline": round(rate["convert_1"] / rate["baseline"], 3),
        "pack_1_vs_baseline": round(rate["pack_1"] / rate["baseline"], 3),
        f"{cn}_vs_baseline": round(rate[cn] / rate["baseline"], 3),
        f"speedup_{args.workers}_vs_1_workers": round(rate[cn] / rate["convert_1"], 3),
        f"pack_speedup_{args.workers}_vs_1_workers": round(
            rate[f"pack_{args.workers}"] / rate["pack_1"], 3
        ),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "all_seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "store": store_footprint(root / "store1.zarr", n, 1024, 10_000, args.size),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
