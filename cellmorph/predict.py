"""Inference: validation outputs for a run, and ``cellmorph predict`` on any store.

``predict`` streams: each batch's predictions and embeddings are appended to CSV/parquet as
they come, and the well table is built from running sums per well, so memory does not grow
with the number of images (only the store's metadata table, which the store loads anyway).
"""

from __future__ import annotations

import argparse
import json
import os
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

from cellmorph.checkpoint import load_checkpoint
from cellmorph.config import LoaderConfig, ModelConfig
from cellmorph.errors import CellmorphError
from cellmorph.metrics import WELL_COLUMNS, compute_metrics, well_ids

ROW = "store_row"
PREDICTIONS_CSV = "predictions.csv"
EMBEDDINGS_PARQUET = "embeddings.parquet"
WELLS_PARQUET = "wells.parquet"


def prob_columns(classes: list[str]) -> list[str]:
    return [f"prob:{c}" for c in classes]


def embedding_columns(dim: int) -> list[str]:
    return [f"emb_{i:04d}" for i in range(dim)]


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` picks the first GPU when torch sees one, else the CPU."""
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CellmorphError(f"--device {spec}: torch sees no CUDA GPU on this machine")
    return dev


# --------------------------------------------------------------------------- model


def model_from_checkpoint(ckpt: dict[str, Any]) -> nn.Module:
    """Rebuild the network from the checkpoint's own config (no pretrained file needed)."""
    from cellmorph.model import build_model

    model_cfg = ModelConfig(**{**ckpt["config"]["model"], "pretrained": None})
    model = build_model(model_cfg, len(ckpt["channels"]), len(ckpt["classes"]))
    model.load_state_dict(ckpt["model"])
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
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per batch: store rows, softmax probabilities (float32) and embeddings (float32)."""
    net = getattr(model, "module", model)
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
            )


def infer(
    model: nn.Module, loader: Any, device: torch.device
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All of a loader's outputs: rows, probabilities (N x K) and embeddings (N x D)."""
    parts = list(iter_infer(model, loader, device))
    if not parts:
        net = getattr(model, "module", model)
        k = net.head[-1].out_features
        return (
            np.zeros(0, np.int64),
            np.zeros((0, k), np.float32),
            np.zeros((0, net.embed_dim), np.float32),
        )
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))  # type: ignore[return-value]


def _atomic_parquet(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def write_val_outputs(
    run_dir: Path,
    rows: np.ndarray,
    probs: np.ndarray,
    embeddings: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    metadata: pd.DataFrame,
) -> None:
    """``val_predictions.parquet`` (row, metadata, true/predicted label, probabilities) and
    ``val_embeddings.npy`` (same row order)."""
    run_dir = Path(run_dir)
    rows = np.asarray(rows, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    pred = probs.argmax(axis=1)
    names = np.asarray(classes, dtype=object)
    frame = metadata.iloc[rows].reset_index(drop=True)
    frame.insert(0, ROW, rows)
    frame["label"] = labels
    frame["label_name"] = names[labels]
    frame["pred"] = pred
    frame["pred_name"] = names[pred]
    frame = pd.concat([frame, pd.DataFrame(probs, columns=prob_columns(classes))], axis=1)
    _atomic_parquet(frame, run_dir / "val_predictions.parquet")
    tmp = run_dir / ".val_embeddings.npy.tmp"
    with tmp.open("wb") as f:
        np.save(f, np.asarray(embeddings, dtype=np.float32))
    os.replace(tmp, run_dir / "val_embeddings.npy")


# --------------------------------------------------------------------------- streaming outputs


class _WellSums:
    """Running sums of embeddings and probabilities per well (memory ~ wells, not images)."""

    def __init__(self, metadata: pd.DataFrame, k: int, d: int):
        self.codes, self.keys = pd.factorize(pd.Series(well_ids(metadata)))
        self.emb = np.zeros((len(self.keys), d), np.float64)
        self.prob = np.zeros((len(self.keys), k), np.float64)
        self.count = np.zeros(len(self.keys), np.int64)

    def add(self, rows: np.ndarray, probs: np.ndarray, emb: np.ndarray) -> None:
        codes = self.codes[rows]
        np.add.at(self.emb, codes, emb)
        np.add.at(self.prob, codes, probs)
        np.add.at(self.count, codes, 1)

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
        if c in WELL_COLUMNS or grouped[c].nunique(dropna=False).max() == 1
    ]
    return grouped[constant].first()


class PredictionWriter:
    """Appends per-image predictions (CSV) and embeddings (parquet) batch by batch."""

    def __init__(self, out: Path, metadata: pd.DataFrame, classes: list[str], top_k: int, dim: int):
        self.out, self.classes, self.top_k = out, classes, min(top_k, len(classes))
        self.meta = pa.Table.from_pandas(metadata, preserve_index=False)
        self.names = np.asarray(classes, dtype=object)
        self.wells = _WellSums(metadata, len(classes), dim)
        self.seen = np.zeros(len(metadata), dtype=bool)
        self.csv: pacsv.CSVWriter | None = None
        self.parquet: pq.ParquetWriter | None = None
        self.dim = dim

    def _base(self, rows: np.ndarray) -> pa.Table:
        table = self.meta.take(pa.array(rows))
        return table.add_column(0, ROW, pa.array(rows, type=pa.int64()))

    def write(self, rows: np.ndarray, probs: np.ndarray, emb: np.ndarray) -> int:
        keep = ~self.seen[rows]  # an eval loader may pad its last batch by repeating rows
        rows, probs, emb = rows[keep], probs[keep], emb[keep]
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
            self.csv = pacsv.CSVWriter(str(self.out / PREDICTIONS_CSV), preds.schema)
            self.parquet = pq.ParquetWriter(str(self.out / EMBEDDINGS_PARQUET), embs.schema)
        self.csv.write_table(preds)
        self.parquet.write_table(embs)
        self.wells.add(rows, probs, emb)
        return len(rows)

    def close(self, metadata: pd.DataFrame) -> pd.DataFrame:
        if self.csv is not None:
            self.csv.close()
            self.parquet.close()
        wells = self.wells.table(metadata, self.classes)
        _atomic_parquet(wells, self.out / WELLS_PARQUET)
        return wells


def _norm(ckpt: dict[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """The training normalization saved in the checkpoint (older checkpoints: None)."""
    norm = ckpt.get("norm")
    return (np.asarray(norm["mean"]), np.asarray(norm["std"])) if norm else None


def _loader_cfg(ckpt: dict[str, Any], overrides: dict[str, Any]) -> LoaderConfig:
    base = dict(ckpt["config"].get("loader", {}))
    base.update({k: v for k, v in overrides.items() if v is not None})
    return LoaderConfig(**base)


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
    from cellmorph.loaders import build_loader
    from cellmorph.store import open_store

    ckpt = load_checkpoint(checkpoint)
    store = open_store(store_path)
    check_channels(ckpt["channels"], store)
    dev = resolve_device(device)
    model = model_from_checkpoint(ckpt).to(dev)
    classes = list(ckpt["classes"])
    k = top_k or int(ckpt["config"].get("eval", {}).get("top_k", 5))
    cfg = _loader_cfg(ckpt, loader_overrides or {})
    n = len(store)
    # Labels are unknown here; the loader wants an array, the model never sees it.
    loader = build_loader(
        store, np.arange(n), np.zeros(n, np.int64), cfg, train=False, device=dev, norm=_norm(ckpt)
    )
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = PredictionWriter(out_dir, store.metadata, classes, k, model.embed_dim)
    written = 0
    with tqdm(total=n, unit="img", desc="predict") as bar:
        for rows, probs, emb in iter_infer(model, loader, dev):
            written += writer.write(rows, probs, emb)
            bar.update(len(rows))
    wells = writer.close(store.metadata)
    if written != n:
        raise CellmorphError(
            f"{store.path}: predicted {written} of {n} images (loader skipped rows)"
        )
    return {"images": written, "wells": len(wells), "classes": len(classes), "out": str(out_dir)}


# --------------------------------------------------------------------------- evaluate a run


def best_checkpoint(run_dir: Path) -> Path:
    for name in ("best.pt", "last.pt"):
        p = run_dir / "checkpoints" / name
        if p.is_file():
            return p
    raise CellmorphError(f"{run_dir / 'checkpoints'}: neither best.pt nor last.pt exists")


def _val_rows(run_dir: Path, ckpt: dict[str, Any], store: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validation store rows and a full-length label array (from the run, else the index)."""
    labels = np.zeros(len(store), np.int64)
    pred_path = run_dir / "val_predictions.parquet"
    if pred_path.is_file():
        frame = pd.read_parquet(pred_path, columns=[ROW, "label"])
        rows = frame[ROW].to_numpy(np.int64).copy()  # writable: torch.from_numpy warns otherwise
        labels[rows] = frame["label"].to_numpy(np.int64)
        return rows, labels
    from cellmorph.config import DataConfig
    from cellmorph.index import build_index

    index = build_index(store.metadata, DataConfig(**ckpt["config"]["data"]))
    if list(index.classes) != list(ckpt["classes"]):
        raise CellmorphError(
            f"{run_dir}: the index rebuilt from the checkpoint's config has classes "
            f"{list(index.classes)[:5]}..., the checkpoint {list(ckpt['classes'])[:5]}..."
        )
    return np.asarray(index.val, np.int64), np.asarray(index.labels, np.int64)


def evaluate_run(run_dir: str | Path, device: str = "auto") -> dict[str, Any]:
    """Recompute the validation outputs and ``metrics.json`` from the run's best checkpoint."""
    from cellmorph.loaders import build_loader
    from cellmorph.store import open_store

    run_dir = Path(run_dir)
    ckpt_path = best_checkpoint(run_dir)
    ckpt = load_checkpoint(ckpt_path)
    store = open_store(ckpt["config"]["data"]["store"])
    check_channels(ckpt["channels"], store)
    dev = resolve_device(device)
    model = model_from_checkpoint(ckpt).to(dev)
    rows, labels = _val_rows(run_dir, ckpt, store)
    loader = build_loader(
        store, rows, labels, _loader_cfg(ckpt, {}), train=False, device=dev, norm=_norm(ckpt)
    )
    got_rows, probs, embs = infer(model, loader, dev)
    got_rows, first = np.unique(got_rows, return_index=True)  # drop any padding repeats
    probs, embs = probs[first], embs[first]
    classes = list(ckpt["classes"])
    top_k = int(ckpt["config"].get("eval", {}).get("top_k", 5))
    wells = well_ids(store.metadata.iloc[got_rows])
    metrics = compute_metrics(labels[got_rows], probs, classes, wells=wells, top_k=top_k)
    write_val_outputs(run_dir, got_rows, probs, embs, labels[got_rows], classes, store.metadata)
    record = {"epoch": ckpt.get("epoch"), "checkpoint": ckpt_path.name, **metrics}
    (run_dir / "metrics.json").write_text(json.dumps(record, indent=2))
    return metrics


# --------------------------------------------------------------------------- CLI


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="per-image predictions and embeddings for a store")
    p.add_argument("--checkpoint", required=True, help="a run's checkpoints/best.pt")
    p.add_argument("--store", required=True, help="store.zarr to predict (labels not needed)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--top-k", type=int, default=None, help="classes per image in predictions.csv")
    p.add_argument(
        "--batch-size", type=int, default=None, help="images per batch (default: eval batch size)"
    )
    p.add_argument(
        "--loader", choices=["torch", "dali"], default=None, help="override the loader kind"
    )
    p.add_argument("--num-workers", type=int, default=None)
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args: argparse.Namespace) -> int:
    overrides = {
        "eval_batch_size": args.batch_size,
        "kind": args.loader,
        "num_workers": args.num_workers,
    }
    summary = predict(
        args.checkpoint, args.store, args.out, device=args.device, top_k=args.top_k,
        loader_overrides=overrides,
    )  # fmt: skip
    print(
        f"predicted {summary['images']} images in {summary['wells']} wells -> {summary['out']}/"
        f"{{{PREDICTIONS_CSV},{EMBEDDINGS_PARQUET},{WELLS_PARQUET}}}"
    )
    return 0
