"""``cellmorph predict``: a trained model on any store, labelled or not.

It writes into ``--out`` what a run writes for each of its folds (:mod:`cellmorph.outputs`):
``predictions.parquet``, ``embeddings.npy`` and ``wells.parquet`` (and ``sites.parquet`` for
a cell store), through the same scoring path as training (:func:`cellmorph.evaluation.score`),
so a run's test-fold outputs and ``predict`` on the same rows and checkpoint are the same
numbers. It adds ``profiles.parquet`` (every well, :mod:`cellmorph.profiles`), ``profiling.json``
(phenotypic activity, when the store names treatments and negative controls) and, when the store
has the checkpoint's label column, ``metrics.json`` with the scores against those labels.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import numpy as np

from cellmorph import atomic
from cellmorph.cells import CELL, site_codes
from cellmorph.checkpoint import Checkpoint, read_checkpoint
from cellmorph.config import LoaderConfig, validate
from cellmorph.distributed import Context
from cellmorph.errors import CellmorphError
from cellmorph.evaluation import (
    Fold,
    model_from_checkpoint,
    resolve_amp,
    resolve_device,
    score,
)
from cellmorph.labels import encode_labels
from cellmorph.loaders import build_loader
from cellmorph.loaders.normalize import Normalization, for_inference, from_store
from cellmorph.outputs import EMBEDDINGS, PREDICTIONS, PROFILES, SITES, WELLS, OutputSet
from cellmorph.profiles import profile
from cellmorph.rundir import lead
from cellmorph.store.layout import well_codes
from cellmorph.store.read import Store, open_store
from cellmorph.urlpath import AnyPath, URLPath, as_path

PROFILING_JSON = "profiling.json"
WRITE_FAULTS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
METRICS_JSON = "metrics.json"


def check_channels(ckpt_channels: list[str], store: Any) -> None:
    """The store must have the checkpoint's channels, by name and in the same order."""
    if list(ckpt_channels) != list(store.channels):
        raise CellmorphError(
            f"{store.path}: store channels {list(store.channels)} differ from the checkpoint's "
            f"{list(ckpt_channels)} (same names in the same order are required)"
        )


def _loader_cfg(ckpt: Checkpoint, overrides: dict[str, Any]) -> LoaderConfig:
    base = ckpt.config.loader.model_dump()
    base.update({k: v for k, v in overrides.items() if v is not None})
    return validate(LoaderConfig, base, "predict: loader options")


def inference_norm(ckpt: Checkpoint, store: Store, cfg: LoaderConfig) -> Normalization:
    """The checkpoint's recipe on ``store``: a new plate brings its own per-plate statistics;
    store-wide statistics are the training store's. Checkpoints without one use ``cfg``."""
    if ckpt.norm is None:
        return from_store(store, cfg)
    return for_inference(Normalization.from_dict(ckpt.norm), store)


def predict(checkpoint: str | Path, store_path: str | Path, out: str | Path, *,
            device: str = "auto", loader_overrides: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Score every image of a store with a checkpoint and write the outputs into ``out``;
    returns a small summary."""
    ckpt = read_checkpoint(checkpoint)
    label_column = ckpt.state.get("label_column")
    store = open_store(store_path, columns=[label_column] if label_column else [])
    check_channels(ckpt.channels, store)
    _check_out_outside(out, store)
    dev = resolve_device(device)
    cfg = _loader_cfg(ckpt, loader_overrides or {})
    model = model_from_checkpoint(ckpt).to(dev)
    n, labelled = len(store), bool(label_column and label_column in store.metadata.columns)
    labels = (encode_labels(store.metadata, label_column, ckpt.classes) if labelled
              else np.full(n, -1, np.int64))  # fmt: skip
    # The loader wants a class per row; the model never sees it.
    loader = build_loader(store, np.arange(n), np.zeros(n, np.int64), cfg, train=False,
                          device=dev, norm=inference_norm(ckpt, store, cfg))  # fmt: skip
    outs = OutputSet(_output_dir(out))
    outs.remove_stale()  # a killed predict's temporary files
    amp, _ = resolve_amp(ckpt.config.train.amp, dev)
    wells = well_codes(store.metadata)[0]
    sites = site_codes(store.metadata, wells) if store.unit == CELL else None
    fold = Fold(ckpt.classes, labels, wells, sites)
    try:
        result = score(model, loader, np.arange(n), fold, Context(device=dev),
                       ckpt.config.eval.top_k, amp, outs, store, progress=True)  # fmt: skip
    except OSError as e:  # pyarrow names no file when the disk under --out fills up
        outs.remove_stale()
        if e.filename is None and e.errno in WRITE_FAULTS:
            raise OSError(e.errno, e.strerror or str(e), str(outs.folder)) from e
        raise
    except BaseException:
        outs.remove_stale()  # nothing half-written stays in --out
        raise
    if result.images != n:
        raise CellmorphError(f"predicted {result.images} of {n} images (the loader skipped rows)")
    summary = {"images": n, "wells": result.wells, "classes": len(ckpt.classes),
               "out": str(outs.folder), "unit": store.unit,
               "profiling": _profiling(outs, store, ckpt, labelled)}  # fmt: skip
    atomic.write_text(
        as_path(outs.folder) / PROFILING_JSON, json.dumps(summary["profiling"], indent=2)
    )
    if result.metrics is not None:
        summary["metrics"] = {**lead(store.unit, result.metrics), **result.metrics}
        atomic.write_text(as_path(outs.folder) / METRICS_JSON,
                          json.dumps(summary["metrics"], indent=2))  # fmt: skip
    return summary


def _profiling(outs: OutputSet, store: Store, ckpt: Checkpoint, labelled: bool) -> dict[str, Any]:
    label_column = ckpt.state.get("label_column")
    if not labelled:
        return {"skipped": f"the store has no label column {label_column!r} naming treatments"}
    return profile([outs], label_column, store.attrs.get("negcon", ""), ckpt.config.seed,
                   "all wells of the store", as_path(outs.folder) / PROFILES)  # fmt: skip


def _check_out_outside(out: str | Path, store: Store) -> None:
    """Outputs never go into the store: it is a converted artefact, bound by its checksums."""
    root = store.path.resolve()
    target = as_path(out).resolve()
    if type(root) is type(target) and (target == root or root in target.parents):
        raise CellmorphError(f"--out {out} is inside the store {store.path}; choose another folder")


def _output_dir(out: str | AnyPath) -> AnyPath:
    p = as_path(out)
    if isinstance(p, URLPath):
        if p.is_file():
            raise CellmorphError(
                f"--out {p} is an object; give a prefix for the prediction outputs"
            )
        return p
    if p.exists() and not p.is_dir():
        raise CellmorphError(f"--out {p} is a file; give a folder for the prediction outputs")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CellmorphError(f"--out {p}: cannot create the folder ({e.strerror})") from None
    for name in (PREDICTIONS, EMBEDDINGS, WELLS, SITES, PROFILES, PROFILING_JSON, METRICS_JSON):
        if (p / name).exists() and not (p / name).is_file():
            raise CellmorphError(f"--out {p}: {name} there is not a file; move it away")
    return p
