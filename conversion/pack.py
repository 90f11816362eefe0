"""Plan, pack and finish a store: the one conversion routine every entry point calls.

1. Plan: read the layout (structural checks), probe every TIFF header in parallel (missing,
   unreadable, truncated, mismatched channels go to quarantine), sort the survivors by
   (plate, well, site) and give each a row. The plan's fingerprint identifies the job.
2. Pack: one task per shard decodes, corrects, resizes and writes its rows in one write, then
   records itself in the manifest. Tasks run inline, in a process pool, or as Ray tasks; they
   produce the same bytes because a shard's content depends only on the plan.
3. A site whose pixels fail to decode although its header was fine is only found while packing:
   it is quarantined, the plan is recomputed without it (later rows move up), and the shards
   whose content changed are packed again. No row ever holds a placeholder image.
4. Finish: metadata.parquet (row i == images[i], with checksums), quarantine.csv, channel
   statistics from a sample of stored images, then ``complete: true``.

The steps live in their own modules: :mod:`conversion.probes` (headers, illumination),
:mod:`conversion.fieldplan` (a field store's plan and shard task; a cell store's is
:mod:`conversion.cells`), :mod:`conversion.target` (what ``--out`` may be) and
:mod:`conversion.finish`; this module runs them in order.

One convert writes a store at a time and its writers never outlive it
(:mod:`conversion.ownership`); ``--overwrite`` of a finished store builds the new one beside it
and swaps it in when complete, so readers of the old one never see a mix. ``--out`` must be
absent, empty or a cellmorph store, and never holds an input.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import zarr
from tqdm import tqdm

from cellmorph.config import ConvertConfig, NucleiConfig
from cellmorph.errors import CellmorphError
from cellmorph.store import files as sfiles
from cellmorph.store import layout as slayout
from cellmorph.store import write as swrite
from cellmorph.store.layout import PLATE
from conversion import cells, ownership
from conversion.fieldplan import FieldPlan as FieldPlan
from conversion.fieldplan import ShardTask as ShardTask
from conversion.fieldplan import fingerprint as fingerprint
from conversion.fieldplan import pack_shard as pack_shard
from conversion.fieldplan import shard_tasks as shard_tasks
from conversion.fieldplan import site_keys as site_keys
from conversion.finish import finish as finish
from conversion.finish import quarantine_rows, saturation_warning, stored_reasons
from conversion.layouts import check_settings, load_inputs, no_valid_sites
from conversion.manifest import Manifest
from conversion.ownership import Owner
from conversion.probes import illum_files
from conversion.probes import probe_all as probe_all
from conversion.shards import IN_FLIGHT_PER_WORKER as IN_FLIGHT_PER_WORKER
from conversion.shards import Mapper
from conversion.shards import ProcessMapper as ProcessMapper
from conversion.shards import describe_task as describe_task
from conversion.shards import inline_map as inline_map
from conversion.tables import Inputs
from conversion.target import check_inputs_outside, check_out, input_paths, local_out, out_kind
from conversion.target import older_format as older_format


def _attrs(inputs: Inputs, cfg: ConvertConfig) -> dict[str, Any]:
    return {
        "complete": False,
        "source": inputs.description,
        "label_column": None if cfg.allow_unlabeled else cfg.label_column,
        "resize": {
            "size": cfg.size,
            "policy": "center-crop to square, antialiased bilinear (Pillow)",
        },
        "illumination": "divide by <plate>_Illum<Ch>.npy" if cfg.illum_dir else None,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def prepare(out: str, fp: str, n: int, inputs: Inputs, cfg: ConvertConfig, overwrite: bool,
            owner: Owner | None, extra: dict[str, Any] | None = None) -> tuple[str, str]:  # fmt: skip
    """Decide between fresh, resume and done, and where to build: ``(state, target)``.

    ``--overwrite`` of a finished local store builds at the staging path beside it (resuming a
    killed overwrite of the same job there) and :func:`convert` swaps it in when complete."""
    kind = out_kind(out)
    check_out(out, kind)
    header = Manifest(out).header()
    if header is not None and header.get("fingerprint") == fp and not overwrite:
        return ("done" if kind == "store" else "resume"), out
    if kind == "started" and older_format(out) and not overwrite:
        raise CellmorphError(
            f"{out} holds a store of an older cellmorph format, which this version cannot "
            "read; convert again with --overwrite"
        )
    if kind in ("store", "started") and not overwrite:
        raise CellmorphError(
            f"{out} holds a conversion of different inputs or settings (or a store written "
            "by another cellmorph version); choose a new --out or pass --overwrite"
        )
    target = out
    if overwrite and kind == "store" and owner is not None:
        target = str(ownership.staging(out))
        header = Manifest(target).header()
        if header is not None and header.get("fingerprint") == fp:  # a killed overwrite
            return ("done" if out_kind(target) == "store" else "resume"), target
    _create(target, fp, n, inputs, cfg, extra or {})
    return "fresh", target


def _create(target: str, fp: str, n: int, inputs: Inputs, cfg: ConvertConfig,
            extra: dict[str, Any]) -> None:  # fmt: skip
    if sfiles.path_kind(target) != "absent":
        sfiles.remove_folder(target)
    attrs = {**_attrs(inputs, cfg), **extra}  # a cell store's unit, crop and resize
    swrite.create_images(target, n, list(cfg.channels), cfg.size, cfg.codec, cfg.shard_size, attrs)
    Manifest(target).write_header({"fingerprint": fp, "images": n, "shard_size": cfg.shard_size})


def _fit_array(out: str, n: int) -> int:
    """Resize ``images`` to the plan's length; returns the shard length."""
    arr = zarr.open_array(
        store=sfiles.zarr_store(out), path=slayout.IMAGES, mode="r+", zarr_format=3
    )
    if arr.shape[0] != n:
        arr.resize((n, *arr.shape[1:]))
    return int(arr.shards[0])


def pack_all(units: Any, out: str, fp: str, mapper: Mapper,
             owner: Owner | None = None) -> tuple[Any, int]:  # fmt: skip
    """Pack every shard not yet recorded; repeat while decode failures reshape the plan.

    ``units`` is a :class:`FieldPlan` or a :class:`conversion.cells.CellPlan`; returns the final
    plan (without the sites that failed to decode) and the rows written by this run."""
    manifest = Manifest(out)
    written = 0
    while True:
        bad = manifest.bad()
        plan = units.without(bad)
        if len(plan) == 0:  # every site failed to decode: the caller stops with the reasons
            return plan, written
        shard = _fit_array(out, len(plan))
        spans = {  # the shards not recorded with this plan's content: (start, rows)
            index: (start, rows)
            for index, start, rows, key in plan.shard_keys(shard, fp)
            if (manifest.shard(index) or {}).get("key") != key
        }
        done_images = len(plan) - sum(rows for _, rows in spans.values())
        tasks = plan.tasks(out, shard, fp, owner, only=spans)
        new_bad = {}
        with tqdm(
            total=len(plan), initial=done_images, unit="img", desc="convert", smoothing=0.1
        ) as bar:
            for res in mapper(plan.pack, tasks):
                if res.abandoned:  # cannot happen while we hold the lock; never write past it
                    raise CellmorphError(f"{out}: another convert took over this store")
                start, rows = spans[res.index]
                bar.update(rows)
                written += res.count
                for row, reason in res.failures.items():
                    new_bad[plan.site_key(start + row)] = reason
        if not new_bad:
            return plan, written
        manifest.write_bad({**bad, **new_bad})


def convert(
    cfg: ConvertConfig,
    out: str | Path,
    overwrite: bool = False,
    mapper: Mapper | None = None,
    nuclei: NucleiConfig | None = None,
) -> dict[str, Any]:
    """Convert the inputs ``cfg`` describes into the store at ``out`` (resumable, idempotent).

    ``mapper`` runs tasks (default: inline for one worker, a process pool otherwise); the Ray
    job passes one that runs each shard as a Ray task. Holds the store's writer lock throughout.
    With ``cfg.crop_size`` the store holds one crop per nucleus (:mod:`conversion.cells`);
    ``nuclei`` configures the finder used when ``cfg.locations`` is not given.
    """
    t0 = time.perf_counter()
    check_settings(cfg)
    # file:// is a local path; zarr's fsspec store would not create its folders.
    out = str(out).removeprefix("file://")
    if not out.strip():
        raise CellmorphError("--out is empty; give the path of the store to write")
    out = local_out(out)
    check_out(out, out_kind(out))  # before reading anything
    check_inputs_outside(out, input_paths(cfg))
    cells.check_locations(cfg)
    with ownership.hold(out) as owner:
        pool = ProcessMapper(cfg.workers) if mapper is None and cfg.workers > 1 else None
        try:
            run = mapper or pool or inline_map
            return _convert(cfg, out, overwrite, run, owner, t0, nuclei or NucleiConfig())
        finally:
            if pool is not None:
                pool.close()


def _unit(cfg: ConvertConfig) -> str:
    return "cell" if cfg.crop_size else "field"


def _convert(cfg: ConvertConfig, out: str, overwrite: bool, run: Mapper, owner: Owner | None,
             t0: float, nuclei: NucleiConfig) -> dict[str, Any]:  # fmt: skip
    # The codec the store gets, before the fingerprint: "auto" is "zstd" for fields, so their
    # stores and reruns are those of before "auto" existed.
    cfg = cfg.model_copy(update={"codec": swrite.store_codec(cfg.codec, _unit(cfg))})
    inputs = load_inputs(cfg)
    if len(inputs.sites) == 0:  # stop before reading a single TIFF
        _stop_all_quarantined(out, inputs)
    illum = illum_files(cfg, inputs.sites[PLATE].astype(str))
    # A cell's crop may pass the field's edge (zeros): any field that bins to a pixel will do.
    probe_cfg = cfg.model_copy(update={"size": cfg.bin}) if cfg.crop_size else cfg
    sites = probe_all(inputs, probe_cfg, illum, run)
    if len(sites) == 0:
        _stop_all_quarantined(out, inputs)
    if ownership.is_local(out) and os.path.exists(out):  # else nothing can be inside it
        check_inputs_outside(out, input_paths(cfg, sites))
    sites["_key"] = site_keys(sites)
    inputs.sites = sites
    fp = fingerprint(sites, cfg, illum)
    units: Any = FieldPlan(sites, cfg, illum, inputs.pages)
    if cfg.crop_size:  # one row per nucleus: locations read or found, sites without any listed
        units, fp = cells.plan_cells(units, fp, inputs, nuclei, run, out)
        cfg = cfg.model_copy(update={"size": cfg.crop_size})  # the stored image size
        if len(units) == 0:
            _stop_all_quarantined(out, inputs)
    phases = {"plan_s": time.perf_counter() - t0}
    state, target = prepare(out, fp, len(units), inputs, cfg, overwrite, owner, units.attrs())
    written = 0
    if state != "done":
        units.save(target)
        t1 = time.perf_counter()
        plan, written = pack_all(units, target, fp, run, owner)
        if len(plan) == 0:
            _stop_none_decoded(target, inputs)
        t2 = time.perf_counter()
        finish(target, plan, inputs, cfg)
        phases.update(pack_s=t2 - t1, finish_s=time.perf_counter() - t2)
    replaced = ownership.swap_in(Path(target), Path(out)) if target != out else None
    unfinished = owner is not None and ownership.staging(out).exists()
    group = zarr.open_group(store=sfiles.zarr_store(out, True), mode="r", zarr_format=3)
    saturated = group.attrs.get("illumination_saturated")
    warning = saturation_warning(saturated)
    if warning:  # on every run, also "nothing to do": the store keeps those pixels
        print(warning, file=sys.stderr)
    return {
        "illumination_saturated": saturated,
        "unit": group.attrs.get("unit", "field"),
        "sites_without_cells": group.attrs.get("sites_without_cells"),
        "sites": group.attrs.get("sites"),  # a cell store: the sites its cells come from
        "store": out,
        "images": int(group.attrs["images"]),
        "written": written,
        "quarantined": int(group.attrs["quarantined"]),
        "seconds": round(time.perf_counter() - t0, 3),
        "nothing_to_do": state == "done" and replaced is None,
        "replaced": replaced,
        "unfinished_overwrite": str(ownership.staging(out)) if unfinished else None,
        "phases": {k: round(v, 3) for k, v in phases.items()},
        "quarantine_reasons": stored_reasons(out),
    }


def _stop_none_decoded(target: str, inputs: Inputs) -> None:
    """Every site passed the header probe and failed to decode: write quarantine.csv beside the
    unfinished store (a rerun stops the same way), then stop with the reasons."""
    quarantine = quarantine_rows(inputs, Manifest(target).bad())
    swrite.write_quarantine(target, quarantine)
    raise no_valid_sites(quarantine, f"{target}/{slayout.QUARANTINE}")


def _stop_all_quarantined(out: str, inputs: Inputs) -> None:
    """Write quarantine.csv (no store), then stop with the reasons and the options that fix them."""
    present = sfiles.folder_names(out) if sfiles.path_kind(out) == "folder" else set()
    if present - {slayout.QUARANTINE}:  # never touch what is already there (another store?)
        raise no_valid_sites(inputs.quarantine, None)
    sfiles.make_folder(out)
    swrite.write_quarantine(out, inputs.quarantine)
    raise no_valid_sites(inputs.quarantine, f"{out}/{slayout.QUARANTINE}")
