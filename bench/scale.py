"""Scale rehearsal: every stage whose cost grows with the number of images, at N images.

Builds a store of N small images (1 channel of 16 x 16 px, so that millions fit on a laptop
disk and build in minutes) whose metadata is real-shaped: the JUMP release's plates, wells,
perturbation ids and plate types (977 plates, 3.1 M sites; ``bench/jump_metadata/``, sources
noted there), expanded to N sites with each plate's sites per well, with the five
``source_<Ch>`` file paths, checksums and chunk crcs a 5-channel conversion writes. The images are written with the
store helpers: 8 shards of random pixels through zarr, the other shards copies of those files
(pixels repeat every 32,768 images; nothing measured here looks at them).

Then it runs each stage in a fresh process and records its wall time and peak RSS:

- ``convert_plan``: conversion's driver on N sites, from a LoadData CSV of them (the layout's
  reading and checks, header probes answered without files, site keys, the plan's
  fingerprint, every shard's task, then the finish: metadata.parquet written from the
  N / shard_size shard records, the quarantine list, the per-plate statistics);
- ``open_store``: opening the store with every metadata column (``cellmorph inspect``) and
  with the training columns (shared per node);
- ``index``: ``build_index`` (grouped by well, oversampled);
- ``train``: ``cellmorph train`` on 2 Ray workers, one epoch capped at ``--steps`` steps,
  validation over the whole validation fold, then the end of the run (best.pt on the test
  fold, both folds' per-image outputs, phenotypic activity); ``per_worker_peak_rss_mb`` is
  the largest peak of a training worker (polled from ``/proc``);
- ``report``: ``report.html`` of that run;
- ``predict``: ``cellmorph predict`` over the whole store.

Prints one JSON object::

    {"images": N, "stages": {"<stage>": {"seconds": s, "peak_rss_mb": m, ...}},
     "per_worker_peak_rss_mb": m, ...}

``peak_rss_mb`` is the kernel's peak resident set (VmHWM): it counts the pages of shared
libraries (~0.5 GB of torch and friends) and of memory-mapped files (the metadata columns a node
shares) in every process; ``peak_anon_mb`` is the largest private memory (RssAnon, polled every
0.2 s), what a process adds to its node.

Cells (``--cells N``, the single-cell rehearsal of a cell store, ``convert --crop-size``): the
sites of the JUMP plates above with a seeded, variable number of nuclei each (negative binomial,
mean 125 a site as in the pilot's 75 M cells over its ~600 k sites, sd ~73; a few sites have none and
are quarantined), N in all, as a LoadData CSV and CellProfiler's Nuclei table (``ImageNumber``,
``ObjectNumber``, ``Location_Center_X/Y``). Stages, each in a fresh process:

- ``convert_cells``: ``conversion.pack.convert`` end to end on them (the LoadData layout, the
  header probes answered from memory, the locations table read a block at a time, the cell
  plan, every shard's task, then the finish: metadata.parquet, one row per cell, gathered shard
  by shard), each shard writer replaced by the manifest record it writes (random checksums and
  crcs, as real ones are). No pixel is written: the store's shards stay absent, which only a
  pixel reader (``inspect --verify``, training) would refuse; ``open_store`` and ``index`` read
  none. Its store is the one the next stages open;
- ``open_store``: the readers' columns (keys, checksums, label; every column is left out: no
  cellmorph command opens them, and five file paths per cell do not fit at 75 M);
- ``index``: ``build_index`` on the cell store (what ``cellmorph train``'s driver does before
  it starts the workers);
- ``plan``: a training rank's planning: ``build_index``, then its loader's rows and the first
  epoch's batches (``cellmorph.loaders.plan.BatchSource`` over the oversampled order with the
  store's reader, rank 0 of 8), no pixel read.

Stages that do not train run without torch (a training rank adds torch's ~300 MB).

The JSON adds the store's bytes per cell: metadata.parquet and the manifest measured; pixels
from docs/sizing.md (70,953 bytes a 96 px cell with a cell store's default codec, Blosc LZ4,
measured on a real site), not here.

Run: ``.venv/bin/python bench/scale.py --images 300000 [--work DIR] [--steps 200]`` (the
smallest N with two plate types, a smoke run: ``--images 10000 --steps 2``); it exits 1 when a
stage failed. The work
folder keeps the store between runs of the same N (``--rebuild`` to build it again). Cells:
``.venv/bin/python bench/scale.py --cells 75000000 [--work DIR]``.
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: import this checkout's cellmorph

from cellmorph import store as cstore  # noqa: E402

JUMP = Path(__file__).resolve().parent / "jump_metadata"
CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]  # the metadata's sources (a 5-channel convert)
STORE_CHANNELS = ["DNA"]  # the pixels: 1 channel, to fit millions of images on this disk
SIZE, SHARD, TEMPLATES = 16, 4096, 8
NEGCON = "Metadata_JCP2022=JCP2022_033924"  # DMSO
GALLERY = "s3://cellpainting-gallery/"
LOAD_DATA = "load_data.csv"  # the sites as conversion reads them (convert_plan's input)
STAGES = ["convert_plan", "open_store", "index", "train", "report", "predict"]
CELL_STAGES = ["convert_cells", "open_store", "index", "plan"]
TORCH_STAGES = {"train", "report", "predict"}
PLAN_WORLD = 8  # the plan stage plans rank 0 of a node's 8 training ranks
LOCATIONS = "nuclei.csv"  # the cells as CellProfiler's Nuclei table (convert_cells' --locations)
# Cells per site: negative binomial of mean NB_N (1 - NB_P) / NB_P = 125, the pilot's 75 M cells
# over its ~600 k sites (~3 M TIFFs, five channels a site; the real site in tests/data has 109
# nuclei), sd ~73 (dense and sparse fields), P(no cell) ~1e-5. (Until 2026-12-03: mean 25 over
# ~3 M sites, which took the pilot's TIFFs for its sites: five times the sites per cell.)
NB_N, NB_P = 3, 3 / 128
FIELD_PX = 1080  # the pilot's field: nucleus centres fall anywhere in it
# docs/sizing.md: a 96 px, 5-channel crop with a cell store's default codec (Blosc LZ4), in a
# converted store of the real site's 109 cells (tests/data/cpg0000_BR00116991_A01_f01). This
# rehearsal writes no pixels.
PIXEL_BYTES_PER_CELL_96PX = 70_953


# --------------------------------------------------------------------------- real-shaped metadata


def make_jump_metadata(src: Path, out: Path = JUMP, sites: int = 3_100_000) -> None:
    """Write the bench's compact copy of the JUMP tables in ``src`` (the shared real-metadata
    folder): a seeded random half of the plates (``sites`` sites), their wells and perturbation
    ids as integers (``wells.npz.xz``), and the plates' source, batch, type and sites per well
    (``plates.csv``). Kept small: every device call carries the repository."""
    keys = ["Metadata_Source", "Metadata_Plate"]
    wells = pd.read_csv(src / "well_2022-12-22_81fd6c6.csv.gz", dtype=str)
    plates = pd.read_csv(src / "plate.csv.gz", dtype=str)
    per = pd.read_csv(src / "cpg0016_site_count.csv", dtype={k: str for k in keys}).merge(
        pd.read_csv(src / "cpg0016_well_count.csv", dtype={k: str for k in keys}), on=keys
    )
    per["sites"] = (per["n_sites"] / per["n_wells"]).round().clip(lower=1).astype(int)
    wells = wells.merge(per[[*keys, "sites"]], on=keys)
    total = wells.groupby("Metadata_Plate")["sites"].sum()
    order = np.random.default_rng(0).permutation(total.index.to_numpy())
    chosen = order[: int(np.searchsorted(total[order].cumsum().to_numpy(), sites)) + 1]
    wells = wells[wells["Metadata_Plate"].isin(chosen)].sort_values(
        ["Metadata_Plate", "Metadata_Well"]
    )
    table = (wells.drop_duplicates("Metadata_Plate")[[*keys, "sites"]]
             .merge(plates, on=keys, how="left").reset_index(drop=True))  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    table[["Metadata_Source", "Metadata_Batch", "Metadata_Plate", "Metadata_PlateType",
           "sites"]].to_csv(out / "plates.csv", index=False)  # fmt: skip
    well = wells["Metadata_Well"]
    jcp = pd.to_numeric(wells["Metadata_JCP2022"].str.removeprefix("JCP2022_"), errors="coerce")
    buf = io.BytesIO()
    np.savez(buf, plate=pd.factorize(wells["Metadata_Plate"], sort=True)[0].astype(np.int16),
             well=((well.str[0].map(ord) - 65) * 48 + well.str[1:].astype(int) - 1).astype(np.int16),
             jcp=jcp.fillna(-1).astype(np.int32))  # fmt: skip
    (out / "wells.npz.xz").write_bytes(lzma.compress(buf.getvalue(), preset=9))


def _jump_wells() -> pd.DataFrame:
    """Every well of the bench's JUMP plates with its plate's source, batch, type and sites."""
    plates = pd.read_csv(JUMP / "plates.csv", dtype=str)
    arrays = np.load(io.BytesIO(lzma.decompress((JUMP / "wells.npz.xz").read_bytes())))
    well, jcp = arrays["well"].astype(int), arrays["jcp"]
    wells = plates.iloc[arrays["plate"]].reset_index(drop=True)
    wells["sites"] = wells["sites"].astype(int)
    wells["Metadata_Well"] = [f"{chr(65 + w // 48)}{w % 48 + 1:02d}" for w in well]
    wells["Metadata_JCP2022"] = np.where(
        jcp < 0, "JCP2022_UNKNOWN", np.char.add("JCP2022_", np.char.zfill(jcp.astype(str), 6))
    )
    return wells


def jump_metadata(n: int, seed: int = 0) -> pd.DataFrame:
    """``n`` sites of real plates (seeded random order, all sources mixed), their real wells and
    perturbations, each plate's sites per well; sorted by (plate, well, site) as a conversion
    sorts them. Beyond the 3.1 M sites of the bench's plates, they repeat as ``<plate>-r2``..."""
    wells = _jump_wells()
    order = np.random.default_rng(seed).permutation(wells["Metadata_Plate"].unique())
    rank = pd.Series(np.arange(len(order)), index=order)
    wells = wells.assign(_rank=wells["Metadata_Plate"].map(rank)).sort_values(
        ["_rank", "Metadata_Well"], kind="stable"
    )
    reps, total = wells["sites"].to_numpy(), int(wells["sites"].sum())
    start = np.r_[0, np.cumsum(reps)[:-1]]  # each well's first site in one pass over the table
    parts: list[pd.DataFrame] = []
    for cycle in range(-(-n // total)):
        need = n - sum(len(p) for p in parts)
        used = int(np.searchsorted(start, need))  # the wells whose sites start before `need`
        idx = np.repeat(np.arange(used), reps[:used])
        part = wells.iloc[idx].reset_index(drop=True)
        part["Metadata_Site"] = np.arange(len(idx)) - np.repeat(start[:used], reps[:used]) + 1
        part["Metadata_Site"] = part["Metadata_Site"].astype(str)
        if cycle:
            part["Metadata_Plate"] = part["Metadata_Plate"] + f"-r{cycle + 1}"
        parts.append(part.iloc[:need])
    md = pd.concat(parts, ignore_index=True).drop(columns=["_rank", "sites"])
    md = md.sort_values(cstore.KEYS, kind="stable").reset_index(drop=True)
    return _with_sources(md)


def _with_sources(md: pd.DataFrame) -> pd.DataFrame:
    """The columns a conversion adds: one TIFF path per channel, as the gallery names them."""
    cols = ["Metadata_Source", "Metadata_Batch", "Metadata_Plate", "Metadata_PlateType",
            "Metadata_Well", "Metadata_Site", "Metadata_JCP2022"]  # fmt: skip
    md = md[cols].copy()
    row = md["Metadata_Well"].str[0].map(lambda c: f"{ord(c) - 64:02d}")
    col = md["Metadata_Well"].str[1:]
    folder = (GALLERY + "cpg0016-jump/" + md["Metadata_Source"] + "/images/"
              + md["Metadata_Batch"] + "/images/" + md["Metadata_Plate"]
              + "__2022-01-01T00_00_00-Measurement1/Images/r" + row + "c" + col + "f"
              + md["Metadata_Site"].str.zfill(2) + "p01-ch")  # fmt: skip
    for i, ch in enumerate(CHANNELS, start=1):
        md[f"source_{ch}"] = folder + f"{i}sk1fk1fl1.tiff"
    return md


def cell_counts(n: int, seed: int = 0) -> np.ndarray:
    """Nuclei per site, ``n`` in all (:data:`NB_N`, :data:`NB_P`); the last site keeps what is
    left of ``n`` (at least one)."""
    rng = np.random.default_rng(seed)
    parts, total = [], 0
    while total < n:
        part = rng.negative_binomial(NB_N, NB_P, size=max(1024, (n - total) // 20))
        parts.append(part)
        total += int(part.sum())
    counts = np.concatenate(parts).astype(np.int64)
    cum = np.cumsum(counts)
    sites = int(np.searchsorted(cum, n)) + 1  # up to the site that reaches n
    counts = counts[:sites]
    counts[-1] -= int(cum[sites - 1]) - n
    return counts.astype(np.int32)


def write_locations(counts: np.ndarray, path: Path, seed: int = 0) -> int:
    """CellProfiler's Nuclei table of the sites: ``ImageNumber`` (the LoadData CSV's row, from
    1), ``ObjectNumber`` (1.. per site) and the centre in native px (to 1/1000 px, as
    CellProfiler writes it), a block of sites at a time; returns the rows written."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rng = np.random.default_rng(seed)
    schema = pa.schema([("ImageNumber", pa.int32()), ("ObjectNumber", pa.int32()),
                        ("Location_Center_X", pa.float64()),
                        ("Location_Center_Y", pa.float64())])  # fmt: skip
    tmp, rows, block = path.with_suffix(".tmp"), 0, 200_000
    with pacsv.CSVWriter(str(tmp), schema) as writer:
        for first in range(0, len(counts), block):
            c = counts[first : first + block]
            image = np.repeat(np.arange(first + 1, first + 1 + len(c), dtype=np.int32), c)
            starts = np.repeat(np.cumsum(c) - c, c)
            obj = (np.arange(len(image)) - starts + 1).astype(np.int32)
            x, y = (rng.uniform(0, FIELD_PX, len(image)).round(3) for _ in range(2))
            writer.write_table(pa.table([image, obj, x, y], schema=schema))
            rows += len(image)
    os.replace(tmp, path)
    return rows


# --------------------------------------------------------------------------- the store


def build_store(path: Path, md: pd.DataFrame) -> dict[str, Any]:
    """Write the store: template shards through zarr, the rest copies of their files."""
    t0 = time.perf_counter()
    n = len(md)
    if path.exists():
        shutil.rmtree(path)
    arr = cstore.create_images(path, n, STORE_CHANNELS, SIZE, "zstd", SHARD,
                               {"label_column": "Metadata_JCP2022", "complete": False})  # fmt: skip
    rng = np.random.default_rng(0)
    n_shards = -(-n // SHARD)
    templates: list[tuple[np.ndarray, list[str], list[int]]] = []
    checksums: list[str] = []
    crcs: list[int] = []
    sums = []
    groups = [cstore.group_key(p, f) for p, f in zip(
        md["Metadata_Plate"], md["Metadata_JCP2022"] == NEGCON.split("=")[1])]  # fmt: skip
    for s in range(n_shards):
        start, stop = s * SHARD, min(n, (s + 1) * SHARD)
        if s < TEMPLATES or stop - start < SHARD:  # written by zarr
            block = rng.integers(100, 4000, (stop - start, 1, SIZE, SIZE), dtype=np.uint16)
            arr[start:stop] = block
            made = (block, [cstore.image_checksum(b) for b in block],
                    cstore.shard_chunk_crcs(path, arr, s, stop - start))  # fmt: skip
            if s < TEMPLATES:
                templates.append(made)
        else:  # a copy of a template shard's file
            made = templates[s % TEMPLATES]
            src = path / cstore.shard_key(arr, s % TEMPLATES)
            dst = path / cstore.shard_key(arr, s)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        checksums += made[1]
        crcs += made[2]
        sums.append(cstore.sums_by_group(made[0], groups[start:stop]))
    return _finish_store(path, md, checksums, crcs, sums, templates, t0)


def _finish_store(path: Path, md: pd.DataFrame, checksums: list[str], crcs: list[int],
                  sums: list, templates: list, t0: float) -> dict[str, Any]:  # fmt: skip
    md = md.assign(**{cstore.CHECKSUM: checksums, cstore.CHUNK_CRC: crcs})
    cstore.write_metadata(path, md)
    per_plate = cstore.plate_stats_from_sums(sums, STORE_CHANNELS, SIZE * SIZE)
    stats = cstore.channel_stats(templates[0][0][:256], STORE_CHANNELS)
    for name, exact in cstore.pooled_stats(per_plate, STORE_CHANNELS).items():
        stats[name].update(exact)
    cstore.write_quarantine(path, [])
    cstore.write_attrs(path, {"stats": stats, "plate_stats": per_plate, "negcon": NEGCON,
                              "images": len(md), "quarantined": 0, "complete": True})  # fmt: skip
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {"seconds": round(time.perf_counter() - t0, 1), "bytes": size,
            "metadata_bytes": (path / cstore.METADATA).stat().st_size}  # fmt: skip


# --------------------------------------------------------------------------- measuring


def _status(pid: int | str, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def peak_rss_mb(pid: int | str = "self") -> float:
    """The process's peak resident set (VmHWM), in MB: shared library pages and memory-mapped
    files (the shared metadata columns) included."""
    return _status(pid, "VmHWM:")


def anon_mb(pid: int | str = "self") -> float:
    """The process's private memory now (RssAnon), in MB: what no other process shares."""
    return _status(pid, "RssAnon:")


class AnonPeak:
    """The largest RssAnon of some processes, polled every 0.2 s."""

    def __init__(self, pids: Any):
        self.pids, self.peaks = pids, {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.stop.wait(0.2):
            for key, pid in self.pids().items():
                try:
                    self.peaks[key] = max(self.peaks.get(key, 0.0), anon_mb(pid))
                except OSError:  # ended
                    continue

    def result(self) -> dict[Any, float]:
        self.stop.set()
        self.thread.join()
        return self.peaks


class WorkerWatch:
    """Polls the peak RSS (and private memory) of the run's workers (events.jsonl names them)."""

    def __init__(self, run: Path):
        self.events, self.peaks, self.workers = run / "events.jsonl", {}, {}
        self.anon = AnonPeak(lambda: dict(self.workers))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.stop.wait(0.5):
            try:
                lines = self.events.read_text().splitlines()
            except FileNotFoundError:
                continue
            for line in lines:
                for w in json.loads(line).get("workers", []):
                    self.workers[w["rank"]] = w["pid"]
                    try:
                        peak = peak_rss_mb(w["pid"])
                    except OSError:  # the worker has ended
                        continue
                    self.peaks[w["rank"]] = max(self.peaks.get(w["rank"], 0.0), peak)

    def result(self) -> tuple[dict[int, float], dict[int, float]]:
        self.stop.set()
        self.thread.join()
        return self.peaks, self.anon.result()


# --------------------------------------------------------------------------- stages


def _config(work: Path, args: argparse.Namespace) -> Any:
    from cellmorph.config import load_config

    return load_config(None, [
        "name=scale", f"run_root={work / 'runs'}", f"data.store={work / 'store.zarr'}",
        f"data.label_column={args.label_column}", f"data.top_k={args.top_k}",
        "loader.image_size=16", "loader.view_fraction=1.0", "loader.augment=[hflip,vflip]",
        "loader.batch_size=64",
        "loader.eval_batch_size=512", "loader.num_workers=0", "model.width_mult=0.35",
        "train.epochs=1", f"train.max_steps_per_epoch={args.steps}", "train.log_every=50",
        "ray.num_workers=2", "ray.cpus_per_worker=1",
    ])  # fmt: skip


def stage_convert_plan(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Conversion's planning, statistics and metadata on N sites: its own code end to end,
    with the TIFF headers answered from memory and each shard's record written as a writer
    would (no pixels are packed)."""
    from cellmorph.config import ConvertConfig
    from conversion import finish, layouts, pack, tiffs
    from conversion.manifest import Manifest

    cfg = ConvertConfig(load_data=str(work / LOAD_DATA), channels=CHANNELS, size=SIZE,
                        shard_size=SHARD, negcon=NEGCON, label_column="Metadata_JCP2022",
                        stats_images=64)  # fmt: skip
    t = {"start": time.perf_counter()}
    inputs = layouts.load_inputs(cfg)  # the LoadData layout: read, join paths, check keys
    t["read_s"] = time.perf_counter()

    # The TIFF headers are answered from memory (one 1080 x 1080 uint16 plane per file); the
    # rest of the probe (per-site checks, the stat digest) is conversion's own code.
    header = tiffs.FileInfo(1, 1080, 1080, "uint16", 2_332_800, 1_700_000_000_000_000_000)
    tiffs.probe_file = lambda path: header
    finish.read_rows = _no_pixels  # finish's statistics sample: no shard holds pixels here

    sites = pack.probe_all(inputs, cfg, {}, pack.inline_map)
    t["probe_s"] = time.perf_counter()
    sites["_key"] = pack.site_keys(sites)
    inputs.sites = sites
    fp = pack.fingerprint(sites, cfg, {})
    t["fingerprint_s"] = time.perf_counter()
    out = str(work / "plan.zarr")
    shutil.rmtree(out, ignore_errors=True)
    state, _ = pack.prepare(out, fp, len(sites), inputs, cfg, False, None)
    manifest, shards = Manifest(out), 0
    for task in pack.shard_tasks(sites, out, SHARD, fp, cfg, {}, inputs.pages):
        manifest.write_shard(task.index, _record(task))  # what its writer records
        shards += 1
    t["tasks_s"] = time.perf_counter()
    plan = pack.FieldPlan(sites, cfg, {}, inputs.pages)
    pack.finish(out, plan, inputs, cfg)  # metadata.parquet, quarantine, statistics
    t["finish_s"] = time.perf_counter()
    steps = dict(zip(list(t)[1:], np.diff(list(t.values())).round(2).tolist()))
    written = pq.ParquetFile(Path(out) / cstore.METADATA).metadata.num_rows
    shutil.rmtree(out, ignore_errors=True)
    return {"sites": written, "shards": shards, "quarantined": len(inputs.quarantine),
            "state": state, **steps}  # fmt: skip


def stage_convert_cells(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The cell store's conversion, ``conversion.pack.convert`` itself, with the TIFF headers
    answered from memory and each shard's writer replaced by the record it writes (no pixels);
    leaves the store the next stages open (its shards absent)."""
    from cellmorph.config import ConvertConfig
    from conversion import cells, finish, pack, tiffs

    cfg = ConvertConfig(load_data=str(work / LOAD_DATA), channels=CHANNELS, size=SIZE,
                        shard_size=SHARD, negcon=NEGCON, label_column="Metadata_JCP2022",
                        stats_images=64, crop_size=SIZE,
                        locations=str(work / LOCATIONS))  # fmt: skip
    header = tiffs.FileInfo(1, 1080, 1080, "uint16", 2_332_800, 1_700_000_000_000_000_000)
    tiffs.probe_file = lambda path: header
    finish.read_rows = _no_pixels  # finish's statistics sample: no shard holds pixels here

    def mapper(fn: Any, tasks: Any) -> Any:  # probes inline; shards: their records only
        if fn is cells.pack_cells:
            return (_cell_record(task) for task in tasks)
        return pack.inline_map(fn, tasks)

    out = work / "store.zarr"
    shutil.rmtree(out, ignore_errors=True)
    done = pack.convert(cfg, out, mapper=mapper)
    files = [f for f in (out / ".convert").iterdir() if f.name.startswith("shard-")]
    return {"cells": done["images"], "sites": done["sites"],
            "sites_without_cells": done["sites_without_cells"],
            "quarantined": done["quarantined"], "shards": len(files), **done["phases"],
            "metadata_bytes": (out / cstore.METADATA).stat().st_size,
            "manifest_bytes": sum(f.stat().st_size for f in files)}  # fmt: skip


def _no_pixels(out: str, arr: Any, rows: np.ndarray) -> np.ndarray:
    """What finish's sample read returns here: zeros, as the shards are never written."""
    return np.zeros((len(rows), *arr.shape[1:]), dtype=arr.dtype)


def _cell_record(task: Any) -> Any:
    """What a cell shard's writer records (conversion.shards.write_shard), without pixels:
    checksums and crcs random (seeded by the shard), per-group counts of its cells."""
    from conversion.manifest import Manifest
    from conversion.shards import ShardResult

    n = len(task.xy)
    rng = np.random.default_rng(task.index)
    per_group: dict[str, int] = {}
    for group, count in zip(task.groups, task.counts):
        per_group[group] = per_group.get(group, 0) + count
    ones = [1.0] * len(CHANNELS)
    sums = {g: {"n": c, "sum": ones, "sumsq": ones, "log_sum": ones, "log_sumsq": ones}
            for g, c in per_group.items()}  # fmt: skip
    record = {"key": task.key, "start": task.start,
              "checksums": [f"{v:016x}" for v in rng.integers(0, 2**64, n, dtype=np.uint64)],
              "chunk_crcs": rng.integers(0, 2**32, n, dtype=np.int64).tolist(), "sums": sums,
              "saturated": [0] * len(CHANNELS), "pixels": 0}  # fmt: skip
    Manifest(task.out).write_shard(task.index, record)
    return ShardResult(task.index, n)


def write_load_data(md: pd.DataFrame, path: Path) -> None:
    """The sites as a CellProfiler LoadData CSV (PathName/FileName per channel), paths on a
    local mount of the gallery."""
    table = md.drop(columns=[f"source_{c}" for c in CHANNELS])
    for c in CHANNELS:
        parts = (
            md[f"source_{c}"]
            .str.replace(GALLERY, "/data/cellpainting-gallery/")
            .str.rpartition("/")
        )
        table[f"PathName_Orig{c}"], table[f"FileName_Orig{c}"] = parts[0], parts[2]
    tmp = path.with_suffix(".tmp")
    table.to_csv(tmp, index=False, chunksize=200_000)
    os.replace(tmp, path)


def _record(task: Any) -> dict[str, Any]:
    """What a shard writer records in the manifest (checksums, crcs, per-group sums)."""
    n = len(task.sites)
    sums = {g: {"n": 1, "sum": [1.0] * len(CHANNELS), "sumsq": [1.0] * len(CHANNELS),
                "log_sum": [1.0] * len(CHANNELS), "log_sumsq": [1.0] * len(CHANNELS)}
            for g in dict.fromkeys(task.groups)}  # fmt: skip
    return {"key": task.key, "start": task.start, "checksums": [f"{i:016x}" for i in range(n)],
            "chunk_crcs": list(range(n)), "sums": sums}  # fmt: skip


def stage_open_store(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The columns a reader opens (training, evaluation, predict and ``cellmorph inspect``:
    keys, checksums and the label, shared per node), then every column (a notebook's
    ``open_store(path)``); peak RSS after each."""
    t0 = time.perf_counter()
    shared = cstore.open_store(work / "store.zarr", columns=[args.label_column])
    t1 = time.perf_counter()
    shared_mb, shared_anon = peak_rss_mb(), anon_mb()
    training_columns = len(shared.metadata.columns)
    del shared
    opened = {"training_columns_s": round(t1 - t0, 2), "training_columns_peak_rss_mb": shared_mb,
              "training_columns_anon_mb": shared_anon,
              "training_columns": training_columns}  # fmt: skip
    if args.cells:  # every column of a cell store: five file paths a cell (~56 GB at 75 M)
        return opened
    full = cstore.open_store(work / "store.zarr")
    return {**opened, "all_columns_s": round(time.perf_counter() - t1, 2),
            "all_columns_peak_rss_mb": peak_rss_mb(),
            "columns": len(full.metadata.columns)}  # fmt: skip


def stage_index(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from cellmorph.index import build_index

    cfg = _config(work, args)
    store = cstore.open_store(cfg.data.store, columns=[cfg.data.label_column])
    t0 = time.perf_counter()
    index = build_index(store.metadata, cfg.data, warn=False)
    return {"build_index_s": round(time.perf_counter() - t0, 2), "classes": len(index.classes),
            "train": len(index.train), "val": len(index.val), "test": len(index.test),
            "train_order": index.epoch_size}  # fmt: skip


def stage_train(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from cellmorph.launch import run_ray_training

    cfg = _config(work, args)
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    watch = WorkerWatch(cfg.run_dir)
    run = run_ray_training(cfg, quiet=True)
    peaks, anon = watch.result()
    epoch = run.history()[-1]
    train_s = epoch["train_images"] / epoch["train_images_per_s"]
    result = run.read_result()
    ckpt_time = run.last_checkpoint.stat().st_mtime
    return {"per_worker_peak_rss_mb": peaks, "per_worker_peak_anon_mb": anon,
            "epoch_s": round(epoch["seconds"], 1),
            "train_steps_s": round(train_s, 1), "train_images": epoch["train_images"],
            "validation_s": round(epoch["seconds"] - train_s, 1),
            "val_images": epoch["n_images"], "test_images": result.get("n_images"),
            "finish_s": round(run.result.stat().st_mtime - ckpt_time, 1),
            "profiled": (result.get("profiling") or {}).get("sampled"),
            "accuracy": epoch.get("accuracy")}  # fmt: skip


def stage_report(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from cellmorph.report import build_report
    from cellmorph.rundir import RunDir

    page = build_report(RunDir(_config(work, args).run_dir))
    return {"report_bytes": page.stat().st_size}


def stage_predict(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from cellmorph.predict import predict
    from cellmorph.rundir import RunDir

    run = RunDir(_config(work, args).run_dir)
    out = work / "predict"
    shutil.rmtree(out, ignore_errors=True)
    summary = predict(run.eval_checkpoint(), work / "store.zarr", out, device="cpu",
                      loader_overrides={"num_workers": 0, "eval_batch_size": 512})  # fmt: skip
    sizes = {p.name: p.stat().st_size for p in out.iterdir()}
    return {"images": summary["images"], "wells": summary["wells"], "bytes": sizes,
            "profiled": summary["profiling"].get("sampled")}  # fmt: skip


# --------------------------------------------------------------------------- driver


def stage_plan(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """A training rank's planning: the index, then its loader's rows and epoch 0's batches
    (``BatchSource`` over the training rows and their oversampling counts with the store's
    reader, as ``build_loader`` makes it, for rank 0 of :data:`PLAN_WORLD`); no pixel is read."""
    from cellmorph.index import build_index
    from cellmorph.loaders.plan import BatchSource
    from cellmorph.loaders.reader import ShardReader

    cfg = _config(work, args)
    store = cstore.open_store(cfg.data.store, columns=[cfg.data.label_column])
    t0 = time.perf_counter()
    index = build_index(store.metadata, cfg.data, warn=False)
    t1 = time.perf_counter()
    index_anon = anon_mb()
    source = BatchSource(ShardReader(store), index.train, cfg.loader, train=True, seed=cfg.seed,
                         rank=0, world_size=PLAN_WORLD, repeats=index.train_repeats)  # fmt: skip
    batches = source.batches(0)
    return {"build_index_s": round(t1 - t0, 2), "plan_s": round(time.perf_counter() - t1, 2),
            "anon_after_index_mb": index_anon, "world_size": PLAN_WORLD,
            "epoch_entries": index.epoch_size, "rank_batches": len(batches),
            "batch_size": cfg.loader.batch_size}  # fmt: skip


def run_stage(name: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run one stage in a fresh process (its own peak RSS); returns its JSON."""
    size = ["--cells", str(args.cells)] if args.cells else ["--images", str(args.images)]
    cmd = [sys.executable, __file__, "--stage", name, "--work", str(args.work), *size,
           "--steps", str(args.steps),
           "--label-column", args.label_column, "--top-k", str(args.top_k)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"failed": done.returncode, "stderr": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def child(name: str, work: Path, args: argparse.Namespace) -> None:
    if name in TORCH_STAGES:  # the others are measured without torch (~300 MB private)
        import torch

        torch.set_num_threads(args.threads)
    anon = AnonPeak(lambda: {"self": os.getpid()})
    t0 = time.perf_counter()
    out = globals()[f"stage_{name}"](work, args)
    seconds = round(time.perf_counter() - t0, 1)
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb(),
                      "peak_anon_mb": anon.result().get("self"), **out}, default=str))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--images", type=int, help="a field store of this many sites")
    size.add_argument("--cells", type=int, help="a cell store of this many cells (stages "
                      f"{','.join(CELL_STAGES)})")  # fmt: skip
    p.add_argument("--work", type=Path, default=Path("data/scale"))
    p.add_argument("--steps", type=int, default=200, help="training steps of the epoch")
    p.add_argument("--stages", help=f"default: {','.join(STAGES)}")
    p.add_argument("--label-column", default="Metadata_PlateType")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--make-metadata", type=Path, metavar="SRC",
                   help="rewrite bench/jump_metadata/ from the JUMP tables in SRC")  # fmt: skip
    args = p.parse_args()
    if args.make_metadata:
        make_jump_metadata(args.make_metadata)
        return
    if not (args.images or args.cells):
        p.error("give --images N or --cells N")
    args.work = args.work.resolve()
    work = args.work / (f"cells-{args.cells}" if args.cells else str(args.images))
    if args.stage:
        child(args.stage, work, args)
        return
    args.stages = args.stages or ",".join(CELL_STAGES if args.cells else STAGES)
    result = (run_cells if args.cells else run_all)(work, args)
    print(json.dumps(result))
    failed = [name for name, stage in result["stages"].items() if "failed" in stage]
    if failed:  # the JSON above says why; a failed stage is no measurement
        sys.exit(f"stages failed: {', '.join(failed)}")


def run_all(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    load = list(os.getloadavg())
    work.mkdir(parents=True, exist_ok=True)
    store = work / "store.zarr"
    built = None
    if args.rebuild or not (store / cstore.METADATA).is_file() or not (work / LOAD_DATA).is_file():
        t = time.perf_counter()
        md = jump_metadata(args.images)
        built = {"metadata_s": round(time.perf_counter() - t, 1), **build_store(store, md)}
        t = time.perf_counter()
        write_load_data(md, work / LOAD_DATA)
        built["load_data_s"] = round(time.perf_counter() - t, 1)
        del md
    stages = {name: run_stage(name, work, args) for name in args.stages.split(",")}
    train = stages.get("train") or {}
    workers = train.get("per_worker_peak_rss_mb") or {}
    anon = train.get("per_worker_peak_anon_mb") or {}
    return {"images": args.images, "stages": stages,
            "per_worker_peak_rss_mb": max(workers.values()) if workers else None,
            "per_worker_peak_anon_mb": max(anon.values()) if anon else None,
            "build_store": built, "load_average_before": load,
            "load_average_after": list(os.getloadavg()),
            "machine": f"{os.cpu_count()} cores, torch threads {args.threads}",
            "label_column": args.label_column, "steps": args.steps}  # fmt: skip


def run_cells(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The cells rehearsal: its inputs (kept between runs of the same N), then its stages."""
    load = list(os.getloadavg())
    work.mkdir(parents=True, exist_ok=True)
    built = None
    if args.rebuild or not (work / LOAD_DATA).is_file() or not (work / LOCATIONS).is_file():
        t = time.perf_counter()
        counts = cell_counts(args.cells)
        md = jump_metadata(len(counts))
        write_load_data(md, work / LOAD_DATA)
        del md
        built = {"sites": len(counts), "sites_without_cells": int((counts == 0).sum()),
                 "load_data_s": round(time.perf_counter() - t, 1)}  # fmt: skip
        t = time.perf_counter()
        built["locations_rows"] = write_locations(counts, work / LOCATIONS)
        built["locations_s"] = round(time.perf_counter() - t, 1)
    stages = {name: run_stage(name, work, args) for name in args.stages.split(",")}
    store = work / "store.zarr"
    per_cell = None
    if (store / cstore.METADATA).is_file():  # what the store holds a cell, as written
        manifest = sum(f.stat().st_size for f in (store / ".convert").iterdir())
        per_cell = {"metadata": round((store / cstore.METADATA).stat().st_size / args.cells, 2),
                    "manifest": round(manifest / args.cells, 2),
                    "pixels_96px_from_sizing_md": PIXEL_BYTES_PER_CELL_96PX}  # fmt: skip
    return {"cells": args.cells, "stages": stages, "bytes_per_cell": per_cell,
            "inputs": built, "load_average_before": load,
            "load_average_after": list(os.getloadavg()),
            "machine": f"{os.cpu_count()} cores, torch threads {args.threads}",
            "label_column": args.label_column}  # fmt: skip


if __name__ == "__main__":
    main()
