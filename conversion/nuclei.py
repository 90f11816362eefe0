"""Nucleus centres on the DNA channel (``cellmorph nuclei``), as CellProfiler's
IdentifyPrimaryObjects finds them: smooth, threshold, split touching nuclei, filter by size.

1. Gaussian smoothing (sigma a fraction of the expected diameter) flattens chromatin texture.
2. A global threshold (Otsu, or Li's minimum cross entropy) of the log-intensities: nuclei span
   a decade of brightness, and on a linear scale the brightest (mitotic) ones pull it up.
3. Touching nuclei are split by a watershed of the distance transform seeded at its peaks
   (``peak_local_max`` at least ``split_distance`` x diameter apart).
   The threshold is at least ``min_contrast`` x the background (1st percentile).
4. Objects outside [min_area, max_area] x the expected area, and (by default) those touching
   the border, are dropped.

The inputs are read exactly as ``cellmorph convert`` reads them (:func:`load_inputs`); sites run
in parallel, and the CSV is streamed a site at a time into a temporary file renamed at the end.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from skimage import feature, filters, measure, morphology, segmentation
from tqdm import tqdm

from cellmorph import remote
from cellmorph.config import ConvertConfig, NucleiConfig
from cellmorph.errors import CellmorphError
from cellmorph.store import files as sfiles
from cellmorph.store.layout import KEYS
from conversion.layouts import load_inputs, no_valid_sites, summarize_reasons
from conversion.shards import Mapper, ProcessMapper, inline_map
from conversion.tables import Inputs, site_sources
from conversion.tiffs import BadImage, Source, read_site

COLUMNS = [*KEYS, "ObjectNumber", "Location_Center_X", "Location_Center_Y", "AreaShape_Area"]
TASK_BLOCK = 4096
_THRESHOLDS = {"otsu": filters.threshold_otsu, "li": filters.threshold_li}


def segment(dna: np.ndarray, cfg: NucleiConfig) -> np.ndarray:
    """A label image of the nuclei in one DNA plane (0 = background)."""
    img = dna.astype(np.float32)
    if cfg.smoothing > 0:
        img = filters.gaussian(img, sigma=cfg.smoothing * cfg.diameter, preserve_range=True)
    logs = np.log1p(np.maximum(img, 0.0))
    if logs.max() <= logs.min():  # a flat plane (blank or saturated): nothing to separate
        return np.zeros(dna.shape, dtype=np.int32)
    expected = math.pi * cfg.diameter**2 / 4
    # A global threshold always splits something: in an empty field, the noise.
    floor = math.log1p(cfg.min_contrast * np.percentile(img, 1))
    mask = logs > max(float(_THRESHOLDS[cfg.threshold](logs)), floor)
    # Specks far below a nucleus would each seed a watershed basin; holes are dim chromatin.
    mask = morphology.remove_small_objects(mask, max_size=int(0.1 * expected))
    mask = ndimage.binary_fill_holes(mask)
    distance = ndimage.distance_transform_edt(mask)
    # A little smoothing keeps one peak per round nucleus (the transform has flat ridges).
    distance = filters.gaussian(distance, sigma=0.5)
    peaks = feature.peak_local_max(
        distance,
        min_distance=max(1, int(cfg.split_distance * cfg.diameter)),
        labels=measure.label(mask),
        exclude_border=False,
    )
    markers = np.zeros(mask.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = segmentation.watershed(-distance, markers, mask=mask)
    if cfg.exclude_border:
        labels = segmentation.clear_border(labels)
    return labels


def find_nuclei(dna: np.ndarray, cfg: NucleiConfig) -> np.ndarray:
    """(n, 3) float array of the nuclei in one DNA plane: centre x, centre y (px), area (px)."""
    labels = segment(dna, cfg)
    props = measure.regionprops_table(labels, properties=("area", "centroid"))
    expected = math.pi * cfg.diameter**2 / 4
    area = props["area"].astype(np.float64)
    keep = (area >= cfg.min_area * expected) & (area <= cfg.max_area * expected)
    return np.stack([props["centroid-1"][keep], props["centroid-0"][keep], area[keep]], axis=1)


@dataclass(frozen=True)
class SiteTask:
    keys: tuple[str, str, str]  # plate, well, site as text
    sources: list[Source]
    cfg: NucleiConfig


@dataclass(frozen=True)
class SiteResult:
    keys: tuple[str, str, str]
    nuclei: np.ndarray | None  # None: the site could not be read
    reason: str = ""


def run_site(task: SiteTask) -> SiteResult:
    """One site: decode its DNA plane and find the nuclei (a process pool runs this)."""
    try:
        (plane,) = read_site(task.sources)
    except BadImage as e:
        return SiteResult(task.keys, None, str(e))
    except OSError as e:  # vanished or unreadable since the inputs were listed
        return SiteResult(task.keys, None, f"unreadable TIFF {e.filename} ({e.strerror})")
    if plane.ndim != 2:
        return SiteResult(task.keys, None, f"unsupported image shape {plane.shape}")
    return SiteResult(task.keys, find_nuclei(plane, task.cfg))


def nuclei_inputs(cfg: NucleiConfig, convert: ConvertConfig) -> Inputs:
    """The sites to segment, read as convert reads them (only the nuclear channel's files)."""
    # A multi-channel file's order comes from file_channels, or else from convert.channels
    # (the order convert would assume).
    settings: dict[str, Any] = {"channels": [cfg.channel], "allow_unlabeled": True}
    if convert.images:
        settings["file_channels"] = convert.file_channels or list(convert.channels)
    return load_inputs(convert.model_copy(update=settings))


def site_tasks(inputs: Inputs, cfg: NucleiConfig) -> Iterator[SiteTask]:
    """One task per site, built a block at a time as the mapper asks for them: a task per site
    for millions of sites at once would be GBs of Python objects."""
    sites = inputs.sites
    for start in range(0, len(sites), TASK_BLOCK):
        block = sites.iloc[start : start + TASK_BLOCK]
        keys = zip(*(block[k].astype(str) for k in KEYS))
        sources = site_sources(block, [cfg.channel], inputs.pages)
        yield from (SiteTask(k, s, cfg) for k, s in zip(keys, sources))


def _rows(result: SiteResult) -> Iterator[list[Any]]:
    for i, (x, y, area) in enumerate(result.nuclei if result.nuclei is not None else [], 1):
        yield [*result.keys, i, round(float(x), 3), round(float(y), 3), int(area)]


@contextlib.contextmanager
def _text_out(target: Any) -> Iterator[Any]:
    """A text file over what :func:`sfiles.write_file` hands over: a path, or a URL's buffer."""
    if hasattr(target, "write"):
        text = io.TextIOWrapper(target, newline="", write_through=True)
        yield text
        text.detach()  # the buffer belongs to the caller, which uploads it
        return
    with open(target, "w", newline="") as f:
        yield f


def _stream(results: Iterator[SiteResult], target: Any, total: int, summary: dict) -> None:
    """Write every site's rows as its result arrives (never more than one site in memory)."""
    with _text_out(target) as text:
        writer = csv.writer(text)
        writer.writerow(COLUMNS)
        for result in tqdm(results, total=total, unit="site", desc="nuclei"):
            if result.nuclei is None:
                summary["skipped"].append({"site": "/".join(result.keys), "reason": result.reason})
                continue
            writer.writerows(_rows(result))
            summary["sites"] += 1
            summary["nuclei"] += len(result.nuclei)
        if summary["sites"] == 0:  # raised here, the temporary file is removed, not renamed
            raise no_valid_sites(summary["skipped"], None)


def find_all(
    cfg: NucleiConfig, convert: ConvertConfig, out: str, mapper: Mapper | None = None
) -> dict[str, Any]:
    """Segment every site and write one CSV row per nucleus to ``out``; return a summary.

    Sites that cannot be read are skipped and listed (``summary["skipped"]``: site, reason),
    as are the layout's rejected rows; a run where no site could be read stops.
    """
    t0 = time.perf_counter()
    if Path(out).is_dir():
        raise CellmorphError(f"--out {out} is a folder; give the CSV file to write")
    url = remote.is_url(out)
    folder, _, name = out.rpartition("/") if url else (str(Path(out).parent), "", Path(out).name)
    inputs = nuclei_inputs(cfg, convert)
    if len(inputs.sites) == 0:
        raise no_valid_sites(inputs.quarantine, None)
    summary: dict[str, Any] = {"out": out, "sites": 0, "nuclei": 0, "skipped": []}
    summary["skipped"] += [{"site": "/".join(str(q.get(k, "")) for k in ("plate", "well", "site")),
                            "reason": q["reason"]} for q in inputs.quarantine]  # fmt: skip
    pool = ProcessMapper(cfg.workers) if mapper is None and cfg.workers > 1 else None
    run = mapper or pool or inline_map
    try:
        results = run(run_site, site_tasks(inputs, cfg))
        n = len(inputs.sites)
        sfiles.write_file(folder, name, lambda t: _stream(results, t, n, summary))
    finally:
        if pool is not None:
            pool.close()
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["reasons"] = summarize_reasons(s["reason"] for s in summary["skipped"])
    return summary
