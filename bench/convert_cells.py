"""Cell-store conversion throughput: crops per second per core from 1080 px LZW TIFFs, against
tifffile's decode ceiling of the same TIFFs measured in the same run.

Input: copies of the real JUMP site (tests/data/cpg0000_BR00116991_A01_f01: five 1080 x 1080
LZW TIFFs, 109 nuclei) under distinct names, one site per copy, with CellProfiler's centres
in DeepProfiler's folder layout. Ceiling: decoding every site's five TIFFs with tifffile in
one process (nothing else), as crops per second (sites/s x cells per site). Conversion:
``convert --crop-size --locations`` with one worker: the whole command (plan, locations, pack,
metadata, statistics) and its packing phase alone. Rounds alternate the two; the best of each
is reported (the machine is shared). Goal: conversion >= 0.7 x the ceiling. ``cpu_*``: the same
ratio from this process's CPU seconds (one worker runs inline, so every thread of the
conversion counts), steadier than wall time on a loaded machine.

The converter decodes a plain LZW plane with libtiff (through Pillow), faster than tifffile:
``own_decode`` is the converter's own decode of the same files (``conversion.tiffs.read_site``,
nothing else) and the conversion against it, so the gap to decoding alone stays visible.
``store``: the bytes the images take per crop, and the store's codec and zstd level.

    .venv/bin/python bench/convert_cells.py --sites 24 > bench_convert_cells.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd
import tifffile

from cellmorph.config import ConvertConfig
from conversion.pack import convert
from conversion.tiffs import read_site

ROOT = Path(__file__).resolve().parent.parent
REAL = ROOT / "tests" / "data" / "cpg0000_BR00116991_A01_f01"
FILES = {"DNA": 5, "ER": 4, "RNA": 3, "AGP": 2, "Mito": 1}  # CPJUMP1's channel numbers
PLATE = "BR00116991"


def make_input(root: Path, sites: int) -> tuple[Path, Path, list[list[Path]]]:
    """``sites`` copies of the real site (LoadData CSV), its centres per site in DeepProfiler's
    layout, and each site's five files."""
    images, locs = root / "images", root / "locations" / PLATE
    images.mkdir(parents=True, exist_ok=True)
    locs.mkdir(parents=True, exist_ok=True)
    nuclei = pd.read_csv(REAL / "Nuclei.csv")
    centres = nuclei[["Location_Center_X", "Location_Center_Y"]].set_axis(
        ["Nuclei_Location_Center_X", "Nuclei_Location_Center_Y"], axis=1
    )
    rows, files = [], []
    for i in range(sites):
        well, site = f"A{i // 9 + 1:02d}", i % 9 + 1
        row = {"Metadata_Plate": PLATE, "Metadata_Well": well, "Metadata_Site": site,
               "Metadata_pert_iname": "DMSO"}  # fmt: skip
        mine = []
        for ch, k in FILES.items():
            name = f"s{i:04d}-ch{k}.tiff"
            if not (images / name).exists():
                shutil.copyfile(REAL / f"r01c01f01p01-ch{k}sk1fk1fl1.tiff", images / name)
            row[f"FileName_Orig{ch}"], row[f"PathName_Orig{ch}"] = name, "images"
            mine.append(images / name)
        centres.to_csv(locs / f"{well}-{site}-Nuclei.csv", index=False)
        rows.append(row)
        files.append(mine)
    csv = root / "load_data.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv, root / "locations", files


def decode_all(files: list[list[Path]]) -> tuple[float, float]:
    """(wall, CPU) seconds to decode every site's TIFFs with tifffile in this process."""
    t, cpu = time.perf_counter(), time.process_time()
    for site in files:
        for f in site:
            tifffile.imread(f)
    return time.perf_counter() - t, time.process_time() - cpu


def decode_own(files: list[list[Path]]) -> tuple[float, float]:
    """(wall, CPU) seconds to decode every site as the converter does (read_site)."""
    t, cpu = time.perf_counter(), time.process_time()
    for site in files:
        read_site([(str(f), -1) for f in site])
    return time.perf_counter() - t, time.process_time() - cpu


def store_bytes(out: Path) -> dict[str, object]:
    """Bytes of the shard files per crop, and the codec the store records."""
    attrs = json.loads((out / "zarr.json").read_text())["attributes"]
    shards = sum(f.stat().st_size for f in (out / "images").rglob("*") if f.is_file()
                 and f.name != "zarr.json")  # fmt: skip
    return {"codec": attrs["codec"], "codec_level": attrs.get("codec_level"),
            "bytes_per_crop": round(shards / attrs["images"])}  # fmt: skip


def run_convert(csv: Path, locs: Path, out: Path, crop: int, shard: int,
                codec: str) -> tuple[float, float, float]:  # fmt: skip
    """(whole command seconds, packing phase seconds, whole command CPU seconds) of one
    cell-store conversion."""
    shutil.rmtree(out, ignore_errors=True)
    cfg = ConvertConfig(load_data=str(csv), crop_size=crop, locations=str(locs),
                        shard_size=shard, workers=1, codec=codec)  # fmt: skip
    cpu = time.process_time()
    summary = convert(cfg, out)
    return summary["seconds"], summary["phases"]["pack_s"], time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sites", type=int, default=24)
    ap.add_argument("--crop-size", type=int, default=96)
    ap.add_argument("--shard-size", type=int, default=1024)
    ap.add_argument(
        "--codec",
        choices=["auto", "zstd", "lz4", "blosc-lz4"],
        default="auto",
        help="auto: the converter's default (a cell store: blosc-lz4)",
    )
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "cellmorph-bench-cells"))
    args = ap.parse_args()
    root = Path(args.data)
    csv, locs, files = make_input(root, args.sites)
    cells = args.sites * len(pd.read_csv(REAL / "Nuclei.csv"))
    decode_all(files)  # warm the page cache: both sides read from memory
    times: dict[str, list[float]] = {"decode": [], "convert": [], "pack": [], "own_decode": []}
    cpu: dict[str, list[float]] = {"decode": [], "convert": [], "own_decode": []}
    for _ in range(args.rounds):
        wall, decode_cpu = decode_all(files)
        times["decode"].append(wall)
        cpu["decode"].append(decode_cpu)
        wall, own_cpu = decode_own(files)
        times["own_decode"].append(wall)
        cpu["own_decode"].append(own_cpu)
        total, pack, convert_cpu = run_convert(csv, locs, root / "cells.zarr", args.crop_size,
                                               args.shard_size, args.codec)  # fmt: skip
        times["convert"].append(total)
        times["pack"].append(pack)
        cpu["convert"].append(convert_cpu)
    best = {k: min(v) for k, v in times.items()}
    rate = {k: cells / t for k, t in best.items()}
    own = rate.pop("own_decode")
    report = {
        "machine": f"{os.cpu_count()} CPU cores, no GPU",
        "sites": args.sites,
        "tiff": "1080x1080 uint16 LZW, 5 files per site (copies of the real JUMP site)",
        "cells": cells,
        "crop_size": args.crop_size,
        "codec": args.codec,
        "crops_per_s": {k: round(v, 1) for k, v in rate.items()},
        "convert_vs_decode": round(rate["convert"] / rate["decode"], 3),
        "pack_vs_decode": round(rate["pack"] / rate["decode"], 3),
        "cpu_convert_vs_decode": round(min(cpu["decode"]) / min(cpu["convert"]), 3),
        "goal": ">= 0.7 x the decode ceiling, one worker",
        "own_decode": {
            "crops_per_s": round(own, 1),
            "convert_vs_it": round(rate["convert"] / own, 3),
            "pack_vs_it": round(rate["pack"] / own, 3),
            "cpu_convert_vs_it": round(min(cpu["own_decode"]) / min(cpu["convert"]), 3),
        },
        "store": store_bytes(root / "cells.zarr"),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "all_seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "cpu_seconds": {k: [round(x, 3) for x in v] for k, v in cpu.items()},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
