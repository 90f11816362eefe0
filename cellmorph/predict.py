"""Inference: validation outputs for a run, and ``cellmorph predict`` on any store.

``predict`` streams: each batch's predictions and embeddings are appended to CSV/parquet as
they come, and the well table is built from running sums per well, so memory does not grow
with the number of images (only the store's metadata table, which the store loads anyway).
"""

from __future__ import annotations

import json
import os
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
from cellmorph.config import Config, LoaderConfig, validate
from cellmorph.errors import CellmorphError
from cellmorph.loaders import build_loader
from cellmorph.loaders.normalize import Normalization, for_inference, from_store
from cellmorph.model import CellNet, build_model
from cellmorph.profiling import intensity_features, negcon_mask, profiling_report
from cellmorph.remote import AnyPath, URLPath, as_path
from cellmorph.store import PLATE, STORE_ROW, WELL, Store, open_store, well_ids

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


class _WellSums:
    """Running sums of embeddings, probabilities and intensity statistics per well (memory ~
    wells, not images)."""

    def __init__(self, metadata: pd.DataFrame, k: int, d: int):
        self.codes, self.keys = pd.factorize(pd.Series(well_ids(metadata)))
        self.emb = np.zeros((len(self.keys), d), np.float64)
        self.prob = np.zeros((len(self.keys), k), np.float64)
        self.feat: np.ndarray | None = None
        self.count = np.zeros(len(self.keys), np.int64)
        self.first = np.full(len(self.keys), -1, np.int64)  # a store row of each well

    def add(self, rows: np.ndarray, probs: np.ndarray, emb: np.ndarray, feats: np.ndarray) -> None:
        codes = self.codes[rows]
        if self.feat is None:
            self.feat = np.zeros((len(self.keys), feats.shape[1]), np.float64)
        np.add.at(self.emb, codes, emb)
        np.add.at(self.prob, codes, probs)
        np.add.at(self.feat, codes, feats)
        np.add.at(self.count, codes, 1)
        self.first[codes] = np.where(self.first[codes] < 0, rows, self.first[codes])

    def profiles(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(a store row of each seen well, mean embeddings, mean intensity statistics)."""
        seen = self.count > 0
        n = self.count[seen][:, None]
        feat = self.feat[seen] / n if self.feat is not None else None
        return self.first[seen], self.emb[seen] / n, feat

    def table(self, metadata: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
        seen = self.count > 0
        n = self.count[seen][:, None]
        mean_prob = self.prob[seen] / n
        info = _well_constants(metadata).reindex(np.asarray(self.keys)[seen]).reset_index(drop=True)
        info["n_images"] = self.count[seen]
        info["pred_name"] = np.asarray(classes, dtype=object)[mean_prob.argmax(axis=1)]
        info["pred_prob"] = mean_prob.max(axis=1)
        probs = pd.DataFrame(mean_prob, columns=prob_columns(classes))
        embs = pd.DataFrame(self.emb[seen] / n, columns=embedding_columns(self.emb.shape[1]))
        return pd.concat([info, probs, embs.astype(np.float32)], axis=1)


def _well_constants(metadata: pd.DataFrame) -> pd.DataFrame:
    """Per well: plate, well and every metadata column that has one value in each well."""
    keyed = metadata.assign(_well=well_ids(metadata))
    grouped = keyed.groupby("_well", sort=False)
    constant = [
        c
        for c in metadata.columns
        if c in (PLATE, WELL) or grouped[c].nunique(dropna=False).max() == 1
    ]
    return grouped[constant].first()


class PredictionWriter:
    """Appends per-image predictions (CSV) and embeddings (parquet) batch by batch."""

    def __init__(self, out: AnyPath, metadata: pd.DataFrame, classes: list[str], top_k: int,
                 dim: int):  # fmt: skip
        self.out, self.classes, self.top_k = out, classes, min(top_k, len(classes))
        self.meta = pa.Table.from_pandas(metadata, preserve_index=False)
        self.names = np.asarray(classes, dtype=object)
        self.wells = _WellSums(metadata, len(classes), dim)
        self.seen = np.zeros(len(metadata), dtype=bool)
        self.csv: pacsv.CSVWriter | None = None
        self.parquet: pq.ParquetWriter | None = None
        self.dim = dim
        # Streamed under temporary names and renamed at the end: a predictions.csv that exists
        # is a complete one. Outputs for a bucket stream to local files, put there at the end.
        names = (PREDICTIONS_CSV, EMBEDDINGS_PARQUET)
        if isinstance(out, URLPath):
            local = Path(tempfile.mkdtemp(prefix="cellmorph-predict-"))
            self.tmp = {n: local / n for n in names}
        else:
            self.tmp = {n: atomic.temp_path(out / n) for n in names}

    def _base(self, rows: np.ndarray) -> pa.Table:
        table = self.meta.take(pa.array(rows))
        return table.add_column(0, STORE_ROW, pa.array(rows, type=pa.int64()))

    def write(self, rows: np.ndarray, probs: np.ndarray, emb: np.ndarray, feats: np.ndarray) -> int:
        keep = ~self.seen[rows]  # an eval loader may pad its last batch by repeating rows
        rows, probs, emb, feats = rows[keep], probs[keep], emb[keep], feats[keep]
        self.seen[rows] = True
        if len(rows) == 0:
            return 0
        base = self._base(rows)
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
        self.parquet.write_table(embs)
        self.wells.add(rows, probs, emb, feats)
        return len(rows)

    def close(self, metadata: pd.DataFrame) -> pd.DataFrame:
        """Finish the files and move them into place."""
        self._close_writers()
        wells = self.wells.table(metadata, self.classes)
        atomic.write_with(self.out / WELLS_PARQUET, lambda p: wells.to_parquet(p, index=False))
        for name, tmp in self.tmp.items():
            if tmp.exists() and isinstance(self.out, URLPath):
                remote.write(str(self.out / name), tmp)
                tmp.unlink()
            elif tmp.exists():
                os.replace(tmp, self.out / name)
        return wells

    def abort(self) -> None:
        """Remove the partial files (after an error)."""
        self._close_writers()
        for tmp in self.tmp.values():
            tmp.unlink(missing_ok=True)

    def _close_writers(self) -> None:
        if self.csv is not None:
            self.csv.close()
            self.parquet.close()
            self.csv = self.parquet = None


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
    store = open_store(store_path)
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
    writer = PredictionWriter(out_dir, store.metadata, ckpt.classes, k, model.embed_dim)
    try:
        written = _stream(model, loader, dev, writer, n)
        wells = writer.close(store.metadata)
    except OSError as e:  # a full disk seen by pyarrow names no file: name the output folder
        writer.abort()
        if e.errno is not None and e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), str(out_dir)) from e
        raise
    except BaseException:
        writer.abort()
        raise
    profiling = well_activity(writer.wells, store, ckpt.state.get("label_column"), ckpt.config)
    atomic.write_text(out_dir / PROFILING_JSON, json.dumps(profiling, indent=2))
    return {"images": written, "wells": len(wells), "classes": len(ckpt.classes),
            "out": str(out_dir), "profiling": profiling}  # fmt: skip


def well_activity(sums: _WellSums, store: Store, label_column: str | None,
                  cfg: Config) -> dict[str, Any]:  # fmt: skip
    """Phenotypic activity of the predicted wells, where the store names each well's treatment
    (its label column) and has negative controls; otherwise the reason it was skipped."""
    md = store.metadata
    if not label_column or label_column not in md.columns:
        return {"skipped": f"the store has no label column {label_column!r} naming treatments"}
    rows, emb, feats = sums.profiles()
    treatment = md[label_column].astype(str).to_numpy()
    negcon = negcon_mask(md, store.attrs.get("negcon", ""), treatment)
    return profiling_report(rows, emb, feats, md, treatment, negcon, cfg.seed)


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
