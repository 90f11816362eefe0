"""Inference: validation outputs for a run, and ``cellmorph predict`` on any store.

``predict`` streams: each batch's predictions and embeddings are appended to CSV/parquet as
they come (the metadata columns read a row group at a time), and each well is closed as soon as
its images were seen (running sums, then one row of the well table), so memory holds a batch, a
row group and the open wells: it does not grow with the number of images.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch
from torch import nn
from tqdm import tqdm

from cellmorph import atomic, remote
from cellmorph.checkpoint import Checkpoint, read_checkpoint
from cellmorph.config import LoaderConfig, validate
from cellmorph.errors import CellmorphError
from cellmorph.loaders import build_loader
from cellmorph.loaders.normalize import Normalization, for_inference, from_store
from cellmorph.metrics import WellSums
from cellmorph.model import CellNet, build_model
from cellmorph.profiling import NEGCON_FLAG, activity_report, intensity_features, negcon_mask
from cellmorph.remote import AnyPath, URLPath, as_path
from cellmorph.rundir import OUTPUT_ROWS
from cellmorph.sampling import PROFILE_SAMPLE, sample_wells
from cellmorph.store.layout import PLATE, STORE_ROW, WELL, well_ids
from cellmorph.store.read import Store, open_store

PREDICTIONS_CSV = "predictions.csv"
EMBEDDINGS_PARQUET = "embeddings.parquet"
WELLS_PARQUET = "wells.parquet"
PROFILING_JSON = "profiling.json"


def prob_columns(classes: list[str]) -> list[str]:
    return [f"prob:{c}" for c in classes]


def embedding_columns(dim: int) -> list[str]:
    return [f"emb_{i:04d}" for i in range(dim)]


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` picks the first GPU when torch sees one, else the CPU."""
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise CellmorphError(
            f"--device {spec}: not a device (use auto, cpu, cuda or cuda:N)"
        ) from None
    if dev.type not in ("cpu", "cuda"):
        raise CellmorphError(f"--device {spec}: cellmorph runs on cpu or cuda devices")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CellmorphError(f"--device {spec}: torch sees no CUDA GPU on this machine")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise CellmorphError(
            f"--device {spec}: this machine has {torch.cuda.device_count()} GPU(s) (cuda:0..)"
        )
    return dev


# --------------------------------------------------------------------------- model


def model_from_checkpoint(ckpt: Checkpoint) -> CellNet:
    """Rebuild the network from the checkpoint's own config (no pretrained file needed)."""
    model_cfg = ckpt.config.model.model_copy(update={"pretrained": None})
    model = build_model(model_cfg, len(ckpt.channels), len(ckpt.classes))
    model.load_state_dict(ckpt.state["model"])
    return model.eval()


def check_channels(ckpt_channels: list[str], store: Any) -> None:
    """The store must have the checkpoint's channels, by name and in the same order."""
    if list(ckpt_channels) != list(store.channels):
        raise CellmorphError(
            f"{store.path}: store channels {list(store.channels)} differ from the checkpoint's "
            f"{list(ckpt_channels)} (same names in the same order are required)"
        )


# --------------------------------------------------------------------------- inference


def iter_infer(
    model: nn.Module, loader: Any, device: torch.device
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per batch: store rows, softmax probabilities, embeddings and the intensity statistics of
    the model's input (all float32)."""
    net = getattr(model, "module", model)
    net = getattr(net, "_orig_mod", net)  # a compiled model's plain module
    net.eval()
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    with torch.inference_mode():
        for x, _y, rows in loader:
            x = x.to(device, non_blocking=True)
            ctx = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()
            with ctx:
                logits, emb = net.forward_with_embedding(x)
            probs = torch.softmax(logits.float(), dim=1)
            yield (
                np.asarray(torch.as_tensor(rows).cpu(), dtype=np.int64),
                probs.cpu().numpy().astype(np.float32),
                emb.float().cpu().numpy().astype(np.float32),
                intensity_features(x),
            )


def infer(model: nn.Module, loader: Any, device: torch.device) -> tuple[np.ndarray, ...]:
    """All of a loader's outputs: rows, probabilities (N x K), embeddings (N x D) and intensity
    statistics (N x F)."""
    parts = list(iter_infer(model, loader, device))
    if not parts:
        net = getattr(model, "module", model)
        k = net.head[-1].out_features
        return (np.zeros(0, np.int64), np.zeros((0, k), np.float32),
                np.zeros((0, net.embed_dim), np.float32), np.zeros((0, 0), np.float32))  # fmt: skip
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(4))


# --------------------------------------------------------------------------- streaming outputs


def well_codes(metadata: pd.DataFrame) -> np.ndarray:
    """int64 per store row: one code per (plate, well), in order of first appearance."""
    plate = pd.factorize(metadata[PLATE])[0].astype(np.int64)
    well = pd.factorize(metadata[WELL])[0].astype(np.int64)
    return pd.factorize(plate * (int(well.max()) + 1) + well)[0].astype(np.int64)


class _Constants:
    """Which metadata columns have one value in each well, found while streaming: the hash of
    each well's first value per column; a column drops out at its first well with two."""

    def __init__(self, names: list[str], n_wells: int):
        self.hashes = {c: np.zeros(n_wells, np.uint64) for c in names}
        self.seen = np.zeros(n_wells, bool)

    def add(self, codes: np.ndarray, table: pa.Table) -> None:
        wells, first = np.unique(codes, return_index=True)
        new = wells[~self.seen[wells]]
        for name in list(self.hashes):
            values = table.column(name).to_numpy(zero_copy_only=False)
            h = pd.util.hash_array(np.asarray(values, dtype=object))
            ref = self.hashes[name]
            ref[new] = h[first][~self.seen[wells]]
            if name not in (PLATE, WELL) and (h != ref[codes]).any():
                del self.hashes[name]
        self.seen[wells] = True

    @property
    def names(self) -> list[str]:
        return list(self.hashes)


class _WellTable:
    """Closed wells (mean probabilities and embeddings) streamed to a temporary parquet file;
    :meth:`finish` adds their constant metadata and writes ``wells.parquet``."""

    def __init__(self, tmp: Path, classes: list[str], dim: int):
        self.classes, self.dim = classes, dim
        self.tmp = tmp
        self.writer: pq.ParquetWriter | None = None
        self.buffer: list[tuple[np.ndarray, ...]] = []  # closed wells, OUTPUT_ROWS at a time

    def add(self, codes: np.ndarray, counts: np.ndarray, probs: np.ndarray,
            emb: np.ndarray) -> None:  # fmt: skip
        self.buffer.append((codes, counts, probs, emb))
        if sum(len(b[0]) for b in self.buffer) >= OUTPUT_ROWS:
            self._flush()

    def _flush(self) -> None:
        """One row group: a writer's footer grows with row groups x columns (1,280 here)."""
        if not self.buffer:
            return
        codes, counts, probs, emb = (np.concatenate(c) for c in zip(*self.buffer))
        self.buffer = []
        cols = {"_code": pa.array(codes, pa.int64()), "n_images": pa.array(counts, pa.int64()),
                "pred_name": pa.array(np.asarray(self.classes, object)[probs.argmax(axis=1)],
                                      pa.string()),
                "pred_prob": pa.array(probs.max(axis=1)),
                **{c: pa.array(probs[:, i]) for i, c in enumerate(prob_columns(self.classes))},
                **{c: pa.array(emb[:, i].astype(np.float32))
                   for i, c in enumerate(embedding_columns(self.dim))}}  # fmt: skip
        table = pa.table(cols)
        self.writer = self.writer or pq.ParquetWriter(self.tmp, table.schema)
        self.writer.write_table(table)

    def finish(self, path: Path, constants: pa.Table, position: np.ndarray) -> int:
        """Write ``path``: per well its constants (row ``position[code]`` of ``constants``)
        then the streamed columns; returns the number of wells."""
        self.close()
        if not self.tmp.exists():
            raise CellmorphError("no wells were predicted")
        n, writer = 0, None
        with atomic.atomic_path(path) as target:
            wells = pq.ParquetFile(self.tmp, pre_buffer=False)  # not the whole file ahead
            for batch in wells.iter_batches(batch_size=OUTPUT_ROWS):
                codes = batch.column("_code").to_numpy()
                info = constants.take(pa.array(position[codes]))
                cols = dict(zip(info.column_names, info.columns))
                cols.update({n_: batch.column(n_) for n_ in batch.schema.names if n_ != "_code"})
                table = pa.table(cols)
                writer = writer or pq.ParquetWriter(target, table.schema)
                writer.write_table(table)
                n += len(codes)
            writer.close()
        self.tmp.unlink(missing_ok=True)
        return n

    def close(self) -> None:
        self._flush()
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def abort(self) -> None:
        self.buffer = []
        with contextlib.suppress(OSError):
            self.close()
        self.tmp.unlink(missing_ok=True)


class PredictionWriter:
    """Appends per-image predictions (CSV) and embeddings (parquet) batch by batch, closes
    each well once all its images were written, and keeps the profiles of ``profiled`` wells."""

    def __init__(self, out: AnyPath, store: Store, classes: list[str], top_k: int, dim: int,
                 profiled: np.ndarray | None = None):  # fmt: skip
        self.out, self.classes, self.top_k = out, classes, min(top_k, len(classes))
        self.store = store
        self.meta = store.metadata_rows()  # every column, a row group at a time
        self.names = np.asarray(classes, dtype=object)
        self.codes = well_codes(store.metadata)
        n_wells = int(self.codes.max()) + 1 if len(self.codes) else 0
        self.sums = WellSums(np.bincount(self.codes, minlength=n_wells), [len(classes), dim])
        self.profiled = profiled if profiled is not None else np.zeros(n_wells, bool)
        self.profiles: WellSums | None = None
        self.closed: list[tuple[np.ndarray, ...]] = []  # profiled wells' (code, n, emb, feat)
        self.constants = _Constants(self.meta.names, n_wells)
        self.first = np.full(n_wells, -1, np.int64)  # a store row of each well
        self.seen = np.zeros(len(self.codes), dtype=bool)
        self.csv: pacsv.CSVWriter | None = None
        self.parquet: pq.ParquetWriter | None = None
        self.dim = dim
        self.buffer: list[pa.Table] = []
        # Streamed under temporary names and renamed at the end: a predictions.csv that exists
        # is a complete one. Outputs for a bucket stream to local files, put there at the end.
        names = (PREDICTIONS_CSV, EMBEDDINGS_PARQUET, f"{WELLS_PARQUET}.part")
        self.local: Path | None = None  # the local folder of a bucket's outputs (removed at end)
        if isinstance(out, URLPath):
            self.local = Path(tempfile.mkdtemp(prefix="cellmorph-predict-"))
            self.tmp = {n: self.local / n for n in names}
        else:
            self.tmp = {n: atomic.temp_path(out / n) for n in names}
        self.wells = _WellTable(self.tmp.pop(names[2]), classes, dim)

    def write(self, rows: np.ndarray, probs: np.ndarray, emb: np.ndarray, feats: np.ndarray) -> int:
        keep = ~self.seen[rows]  # an eval loader may pad its last batch by repeating rows
        rows, probs, emb, feats = rows[keep], probs[keep], emb[keep], feats[keep]
        self.seen[rows] = True
        if len(rows) == 0:
            return 0
        order = np.argsort(rows, kind="stable")  # metadata is read in store order
        rows, probs, emb, feats = rows[order], probs[order], emb[order], feats[order]
        base = self.meta.take(rows)
        codes = self.codes[rows]
        self.constants.add(codes, base)
        self.first[codes] = np.where(self.first[codes] < 0, rows, self.first[codes])
        base = base.add_column(0, STORE_ROW, pa.array(rows, type=pa.int64()))
        self._write_images(base, probs, emb)
        self._add_wells(codes, probs, emb, feats)
        return len(rows)

    def _write_images(self, base: pa.Table, probs: np.ndarray, emb: np.ndarray) -> None:
        order = np.argsort(-probs, axis=1, kind="stable")[:, : self.top_k]
        top_probs = np.take_along_axis(probs, order, axis=1)
        pred_cols, pred_names = list(base.columns), list(base.column_names)
        for j in range(self.top_k):
            pred_cols += [pa.array(self.names[order[:, j]], pa.string()), pa.array(top_probs[:, j])]
            pred_names += [f"top{j + 1}_class", f"top{j + 1}_prob"]
        preds = pa.Table.from_arrays(pred_cols, names=pred_names)
        emb_cols = list(base.columns) + [pa.array(emb[:, i]) for i in range(self.dim)]
        embs = pa.Table.from_arrays(emb_cols, names=base.column_names + embedding_columns(self.dim))
        if self.csv is None:
            self.csv = pacsv.CSVWriter(str(self.tmp[PREDICTIONS_CSV]), preds.schema)
            self.parquet = pq.ParquetWriter(str(self.tmp[EMBEDDINGS_PARQUET]), embs.schema)
        self.csv.write_table(preds)
        self.buffer.append(embs)  # one row group per OUTPUT_ROWS images, not per batch
        if sum(t.num_rows for t in self.buffer) >= OUTPUT_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self.buffer:
            self.parquet.write_table(pa.concat_tables(self.buffer))
            self.buffer = []

    def _add_wells(self, codes: np.ndarray, probs: np.ndarray, emb: np.ndarray,
                   feats: np.ndarray) -> None:  # fmt: skip
        closed = self.sums.add(codes, probs, emb)
        if closed is not None:
            self.wells.add(*closed)
        keep = self.profiled[codes]
        if not keep.any():
            return
        if self.profiles is None:  # the statistics' width is known with the first batch
            self.profiles = WellSums(self.sums.expected, [emb.shape[1], feats.shape[1]])
        closed = self.profiles.add(codes[keep], emb[keep], feats[keep])
        if closed is not None:
            self.closed.append(closed)

    def close(self) -> int:
        """Finish the files and move them into place; returns the number of wells."""
        self._close_writers()
        order = np.argsort(self.first)
        order = order[self.first[order] >= 0]  # the wells seen, by their first row
        # The well table's metadata: the constant columns, read for one row of each well.
        constants = self.store.metadata_rows(self.constants.names).take(self.first[order])
        position = np.zeros(len(self.first), np.int64)
        position[order] = np.arange(len(order))
        n = self.wells.finish(self.out / WELLS_PARQUET, constants, position)
        for name, tmp in self.tmp.items():
            if tmp.exists() and isinstance(self.out, URLPath):
                remote.write(str(self.out / name), tmp)
                tmp.unlink()
            elif tmp.exists():
                os.replace(tmp, self.out / name)
        self._remove_local()
        return n

    def well_profiles(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The profiled wells: (a store row of each, mean embeddings, mean input statistics),
        in store order."""
        if not self.closed:
            return np.zeros(0, np.int64), np.zeros((0, self.dim)), np.zeros((0, 0))
        codes, _counts, emb, feats = (np.concatenate(c) for c in zip(*self.closed))
        order = np.argsort(self.first[codes])
        return self.first[codes][order], emb[order], feats[order]

    def abort(self) -> None:
        """Remove the partial files (after an error, maybe a full disk: nothing more is written)."""
        self.buffer = []
        with contextlib.suppress(OSError):
            self._close_writers()
        self.wells.abort()
        for tmp in self.tmp.values():
            tmp.unlink(missing_ok=True)
        self._remove_local()

    def _remove_local(self) -> None:
        if self.local is not None:
            shutil.rmtree(self.local, ignore_errors=True)

    def _close_writers(self) -> None:
        if self.csv is not None:
            self._flush()
            self.csv.close()
            self.parquet.close()
            self.csv = self.parquet = None
        self.wells.close()


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


def predict(
    checkpoint: str | Path,
    store_path: str | Path,
    out: str | Path,
    *,
    device: str = "auto",
    top_k: int | None = None,
    loader_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``predictions.csv``, ``embeddings.parquet`` and ``wells.parquet`` for every image
    of a store (labels are not needed); returns a small summary."""
    if top_k is not None and top_k < 1:
        raise CellmorphError(f"--top-k {top_k}: give at least 1 class per image")
    ckpt = read_checkpoint(checkpoint)
    label_column = ckpt.state.get("label_column")
    store = open_store(store_path, columns=[label_column] if label_column else [])
    check_channels(ckpt.channels, store)
    _check_out_outside(out, store)
    dev = resolve_device(device)
    cfg = _loader_cfg(ckpt, loader_overrides or {})
    model = model_from_checkpoint(ckpt).to(dev)
    n = len(store)
    # Labels are unknown here; the loader wants an array, the model never sees it.
    loader = build_loader(
        store, np.arange(n), np.zeros(n, np.int64), cfg, train=False, device=dev,
        norm=inference_norm(ckpt, store, cfg),
    )  # fmt: skip
    out_dir = _output_dir(out)
    k = top_k or ckpt.config.eval.top_k
    profiled = _profiled_wells(store, label_column, ckpt.config.seed)
    writer = PredictionWriter(out_dir, store, ckpt.classes, k, model.embed_dim, profiled)
    try:
        written = _stream(model, loader, dev, writer, n)
        wells = writer.close()
    except OSError as e:  # a full disk seen by pyarrow names no file: name the output folder
        writer.abort()
        if e.errno is not None and e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), str(out_dir)) from e
        raise
    except BaseException:
        writer.abort()
        raise
    if profiled is None:
        profiling = {"skipped": f"the store has no label column {label_column!r} naming treatments"}
    else:
        rows, emb, feats = writer.well_profiles()
        profiling = profile_wells(store, rows, emb, feats, label_column, ckpt.config.seed,
                                  of=len(profiled))  # fmt: skip
    atomic.write_text(out_dir / PROFILING_JSON, json.dumps(profiling, indent=2))
    return {"images": written, "wells": wells, "classes": len(ckpt.classes),
            "out": str(out_dir), "profiling": profiling}  # fmt: skip


def _profiled_wells(store: Store, label_column: str | None, seed: int) -> np.ndarray | None:
    """Bool per well code: the wells whose profiles phenotypic activity scores (all, or a
    stratified sample); None when the store names no treatments."""
    if not label_column or label_column not in store.metadata.columns:
        return None
    codes, first = np.unique(well_codes(store.metadata), return_index=True)
    treatment, negcon = treatments(store, first, label_column)
    mask = np.zeros(len(codes), bool)
    mask[codes[sample_wells(treatment, negcon, seed)]] = True
    return mask


def treatments(store: Store, rows: np.ndarray, label_column: str) -> tuple[np.ndarray, ...]:
    """The treatment (label value) and negative-control flag of the wells of ``rows``, one
    image each."""
    md = store.metadata.iloc[rows]
    treatment = md[label_column].astype(str).to_numpy()
    return treatment, negcon_mask(md, store.attrs.get("negcon", ""), treatment)


def profile_wells(store: Store, rows: np.ndarray, emb: np.ndarray, feats: np.ndarray,
                  label_column: str, seed: int, counts: np.ndarray | None = None,
                  of: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Phenotypic activity of well profiles (``rows``: one image of each well; ``emb`` and
    ``feats``: the wells' mean embeddings and input statistics); ``of``: wells sampled from."""
    treatment, negcon = treatments(store, rows, label_column)
    table = pd.DataFrame({"well": well_ids(store.metadata.iloc[rows]), "treatment": treatment,
                          NEGCON_FLAG: negcon,
                          "images": counts if counts is not None else np.ones(len(rows), int)})  # fmt: skip
    out = activity_report(table, {"embeddings": emb, "intensity_baseline": feats}, seed)
    if of is not None and len(table) < of:
        out["sampled"] = f"{len(table)} of {of} wells: {PROFILE_SAMPLE}"
    return out


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
    for name in (PREDICTIONS_CSV, EMBEDDINGS_PARQUET, WELLS_PARQUET):
        if (p / name).exists() and not (p / name).is_file():
            raise CellmorphError(f"--out {p}: {name} there is not a file; move it away")
    return p


def _stream(model: nn.Module, loader: Any, dev: torch.device, writer: PredictionWriter,
            n: int) -> int:  # fmt: skip
    written = 0
    with tqdm(total=n, unit="img", desc="predict", disable=None) as bar:
        for rows, probs, emb, feats in iter_infer(model, loader, dev):
            written += writer.write(rows, probs, emb, feats)
            bar.update(len(rows))
    if written != n:
        raise CellmorphError(f"predicted {written} of {n} images (the loader skipped rows)")
    return written
