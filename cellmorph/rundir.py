"""The run directory: the only module that knows its layout (as ``store.py`` knows the store's).

::

    runs/<name>/
      config.yaml              the resolved config
      classes.json             label encoding (class id -> name)
      data_summary.json        store + index summary (folds, counts, warnings)
      metrics.jsonl            one line per finished epoch, exactly once across restarts
      metrics.json             the result: the chosen epoch (best on validation) scored on the test
                               fold (the headline), with its validation scores beside
      val_predictions.parquet  per validation image, by the chosen model (store row, metadata,
                               labels, probs), written at the end of the run
      val_embeddings.npy       its embeddings, same row order
      test_predictions.parquet, test_embeddings.npy   the same for the test fold
      .<fold>_outputs/         each rank's part of a fold's outputs while they are merged
      events.jsonl             start / resume events (with the worker processes)
      tracking.json            the MLflow run this run logs to (tracking.mlflow_uri)
      progress.json            the current epoch's step, for the launcher's progress bar
      checkpoints/             last.pt, best.pt, best-epochNNN.pt
      logs/                    rank 0's log, Ray's driver log
      audit.json, report.html, figures/
      ray/                     Ray Train's own run state

Rank 0 writes; every write is atomic (:mod:`cellmorph.atomic`). Readers (report, predict,
audit, sweep, demo) go through the same class, so a renamed file changes in one place.

The folder is a local path or an object-store URL (``run_root: s3://bucket/runs``): paths are
``pathlib.Path`` or :class:`cellmorph.remote.URLPath`, which answer the same calls.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from cellmorph import atomic, remote
from cellmorph.errors import CellmorphError
from cellmorph.remote import AnyPath, URLPath, as_path
from cellmorph.store.layout import STORE_ROW

if TYPE_CHECKING:
    from cellmorph.store.read import MetadataRows

# Rows per row group of the per-image outputs (what a writer or reader holds at a time).


# Rows per row group of the per-image outputs (what a writer or reader holds at a time).
OUTPUT_ROWS = 8_192

CHECKPOINTS = "checkpoints"


FOLD_NAMES = {"val": "validation", "test": "test"}


@dataclass(frozen=True)
class RunDir:
    """Paths and reads/writes of one run directory (a local folder or an object-store URL)."""

    path: AnyPath

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", as_path(self.path))

    @property
    def remote(self) -> bool:
        """True when the run lives in an object store (no local temporary files, no links)."""
        return isinstance(self.path, URLPath)

    # ------------------------------------------------------------------------------ layout
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config(self) -> AnyPath:
        return self.path / "config.yaml"

    @property
    def classes(self) -> AnyPath:
        return self.path / "classes.json"

    @property
    def data_summary(self) -> AnyPath:
        return self.path / "data_summary.json"

    @property
    def metrics_log(self) -> AnyPath:
        return self.path / "metrics.jsonl"

    @property
    def result(self) -> AnyPath:
        return self.path / "metrics.json"

    def predictions(self, fold: str = "val") -> AnyPath:
        return self.path / f"{fold}_predictions.parquet"

    def embeddings(self, fold: str = "val") -> AnyPath:
        return self.path / f"{fold}_embeddings.npy"

    def output_part(self, fold: str, rank: int) -> AnyPath:
        """One rank's per-image outputs of a fold, before :meth:`write_outputs` merges them."""
        return self.path / f".{fold}_outputs" / f"rank{rank:05d}.parquet"

    @property
    def events(self) -> AnyPath:
        return self.path / "events.jsonl"

    @property
    def progress(self) -> AnyPath:
        return self.path / "progress.json"

    @property
    def checkpoints(self) -> AnyPath:
        return self.path / CHECKPOINTS

    @property
    def last_checkpoint(self) -> AnyPath:
        return self.checkpoints / "last.pt"

    @property
    def best_checkpoint(self) -> AnyPath:
        return self.checkpoints / "best.pt"

    def epoch_checkpoint(self, epoch: int) -> AnyPath:
        return self.checkpoints / f"best-epoch{epoch:03d}.pt"

    @property
    def logs(self) -> AnyPath:
        return self.path / "logs"

    @property
    def audit(self) -> AnyPath:
        return self.path / "audit.json"

    @property
    def report(self) -> AnyPath:
        return self.path / "report.html"

    @property
    def figures(self) -> AnyPath:
        return self.path / "figures"

    @property
    def ray_storage(self) -> AnyPath:
        """Ray Train's ``storage_path`` for this run."""
        return self.path / "ray"

    @property
    def tracking(self) -> AnyPath:
        """The run's MLflow run (``tracking.mlflow_uri``): resumes log to the same one."""
        return self.path / "tracking.json"

    @property
    def placement_group(self) -> AnyPath:
        """The Train worker group's placement group id (a Tune sweep releases it)."""
        return self.path / ".ray_placement_group"

    # ----------------------------------------------------------------------------- writes
    def create(self, config: dict[str, Any], classes: list[str], label_column: str,
               summary: dict[str, Any]) -> None:  # fmt: skip
        """Write the run's description (rank 0, after every check that could refuse the run)."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        atomic.write_text(self.config, yaml.safe_dump(config, sort_keys=False))
        save_label_encoding(LabelEncoding(label_column, list(classes)), self.classes)
        atomic.write_text(self.data_summary, json.dumps(summary, indent=2, default=str))

    def begin(self, first_epoch: int, workers: list[dict[str, Any]]) -> None:
        """Start (or resume at ``first_epoch``): keep one metrics line per earlier epoch, drop
        temporary files a killed writer left, and record the event with the worker processes."""
        self._trim_metrics(first_epoch)
        for folder in (self.path, self.checkpoints):
            if folder.is_dir():
                atomic.remove_stale_temps(folder)
        self.progress.unlink(missing_ok=True)
        event = "resume" if first_epoch > 0 else "start"
        self.log_event(event, epoch=first_epoch, workers=workers)

    def _trim_metrics(self, before_epoch: int) -> None:
        """Keep the latest line of each epoch < ``before_epoch``: a rerun epoch logs once."""
        latest = {
            int(r.get("epoch", -1)): r for r in self.history() if r.get("epoch", -1) < before_epoch
        }
        if self.metrics_log.is_file() or latest:
            text = "".join(json.dumps(latest[e]) + "\n" for e in sorted(latest))
            atomic.write_text(self.metrics_log, text)

    def log_epoch(self, record: dict[str, Any]) -> None:
        """Append one epoch's line to ``metrics.jsonl``."""
        with self.metrics_log.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def log_event(self, event: str, **fields: Any) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with self.events.open("a") as f:
            f.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")

    def write_progress(self, progress: dict[str, Any]) -> None:
        atomic.write_text(self.progress, json.dumps(progress))

    def write_selection(self, epoch: int, metrics: dict[str, Any]) -> None:
        """The best epoch so far: ``metrics.json`` with its validation scores."""
        atomic.write_text(self.result, json.dumps(
            {"fold": "validation", "epoch": epoch, **metrics, "validation": metrics}, indent=2
        ))  # fmt: skip

    def write_final(self, epoch: int | None, scores: dict[str, dict[str, Any]],
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
        """``metrics.json`` for the chosen epoch: the test fold's scores as the headline (the
        validation fold's when there is no test fold), both folds side by side, and ``extra``."""
        fold = "test" if scores.get("test") else "val"
        result = {"fold": FOLD_NAMES[fold], "epoch": epoch, **scores[fold],
                  "validation": scores.get("val"), "test": scores.get("test"), **(extra or {})}  # fmt: skip
        atomic.write_text(self.result, json.dumps(result, indent=2))
        return result

    def part_writer(self, fold: str, rank: int) -> OutputPart:
        """This rank's streaming writer of its images' outputs on ``fold``."""
        return OutputPart(self.output_part(fold, rank))

    def write_outputs(self, fold: str, ranks: int, classes: list[str],
                      metadata: MetadataRows) -> int:  # fmt: skip
        """Merge the ``ranks`` parts of ``fold`` (rank order is fold order) into
        ``<fold>_predictions.parquet`` (store row, metadata, true/predicted label,
        probabilities) and ``<fold>_embeddings.npy`` (same row order), a row group at a time;
        returns the number of images."""
        parts = [self.output_part(fold, r) for r in range(ranks)]
        missing = [str(p) for p in parts if not p.is_file()]
        if missing:
            raise CellmorphError(f"{fold} outputs: rank part(s) {', '.join(missing)} missing")
        with contextlib.ExitStack() as stack:  # an object store's parts: local copies
            local = [stack.enter_context(remote.local_copy(p)) for p in parts]
            n = self._merge_parts(fold, local, classes, metadata)
        if self.remote:
            remote.delete_tree(str(parts[0].parent))
        else:
            shutil.rmtree(parts[0].parent, ignore_errors=True)
        return n

    def _merge_parts(self, fold: str, parts: list[Path], classes: list[str],
                     metadata: MetadataRows) -> int:  # fmt: skip
        # pre_buffer=False: by default pyarrow reads a whole file ahead of the batches asked for
        files = [pq.ParquetFile(p, pre_buffer=False) for p in parts]
        n = sum(f.metadata.num_rows for f in files)
        dim = next((f.schema_arrow.field("embedding").type.list_size for f in files
                    if f.metadata.num_rows), 0)  # fmt: skip
        with atomic.atomic_path(self.predictions(fold)) as preds, \
                atomic.atomic_path(self.embeddings(fold)) as embs, open(embs, "wb") as emb_file:  # fmt: skip
            header = {"descr": "<f4", "fortran_order": False, "shape": (n, dim)}
            np.lib.format.write_array_header_1_0(emb_file, header)
            writer = None
            for f in files:
                for batch in f.iter_batches(batch_size=OUTPUT_ROWS):
                    table, emb = _prediction_table(batch, classes, metadata)
                    emb_file.write(np.ascontiguousarray(emb, "<f4"))
                    writer = writer or pq.ParquetWriter(preds, table.schema)
                    writer.write_table(table)
                    del table, emb, batch
                    pa.default_memory_pool().release_unused()  # a row group at a time, really
            if writer is None:  # an empty fold: a file with the columns, no rows
                writer = pq.ParquetWriter(
                    preds, _prediction_table(None, classes, metadata)[0].schema
                )
            writer.close()
        return n

    def write_tracking(self, info: dict[str, Any]) -> None:
        atomic.write_text(self.tracking, json.dumps(info, indent=2))

    def write_audit(self, audit: dict[str, Any]) -> None:
        atomic.write_text(self.audit, json.dumps(audit, indent=2))

    # ------------------------------------------------------------------------------ reads
    def require(self) -> RunDir:
        """This run, or a CellmorphError when the folder is not a cellmorph run."""
        if not self.path.is_dir():
            raise CellmorphError(f"run directory not found: {self.path}")
        if not self.config.is_file():
            raise CellmorphError(f"{self.config} is missing (is this a cellmorph run directory?)")
        return self

    def read_config(self) -> dict[str, Any]:
        try:
            return yaml.safe_load(self.config.read_text()) or {}
        except yaml.YAMLError as e:
            raise CellmorphError(f"{self.config}: not valid YAML ({e})") from None

    def read_json(self, path: AnyPath, required: bool = True) -> Any:
        if not path.is_file():
            if required:
                raise CellmorphError(f"{path} is missing (is this a finished cellmorph run?)")
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CellmorphError(f"{path}: not valid JSON ({e})") from None

    def read_classes(self) -> LabelEncoding:
        return load_label_encoding(self.classes)

    def read_result(self) -> dict[str, Any]:
        return self.read_json(self.result)

    def history(self) -> list[dict[str, Any]]:
        """Every line of ``metrics.jsonl`` (empty when there is none yet)."""
        return self._jsonl(self.metrics_log)

    def read_events(self) -> list[dict[str, Any]]:
        return self._jsonl(self.events)

    def read_progress(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.progress.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _jsonl(self, path: AnyPath) -> list[dict[str, Any]]:
        if not path.is_file():
            return []
        text = path.read_text()
        lines = text.splitlines()
        if lines and not text.endswith("\n"):
            lines = lines[:-1]  # torn by a full disk or a kill mid-append: never finished
        try:
            return [json.loads(ln) for ln in lines if ln.strip()]
        except json.JSONDecodeError as e:
            raise CellmorphError(f"{path}: a line is not valid JSON ({e})") from None

    def read_predictions(self, fold: str = "val",
                         columns: list[str] | None = None) -> pd.DataFrame | None:  # fmt: skip
        """``<fold>_predictions.parquet``, or None when it was not written."""
        p = self.predictions(fold)
        if not p.is_file():
            return None
        return pd.read_parquet(_readable(p), columns=columns)

    def read_embeddings(self, fold: str = "val") -> np.ndarray | None:
        """``<fold>_embeddings.npy``, or None when it was not written; a local file is
        memory-mapped (a reader of a sample of rows never holds the whole array)."""
        p = self.embeddings(fold)
        if not p.is_file():
            return None
        return np.load(p, mmap_mode="r") if isinstance(p, Path) else np.load(_readable(p))

    def eval_checkpoint(self) -> AnyPath:
        """The checkpoint that evaluation and prediction use: best, else last."""
        for p in (self.best_checkpoint, self.last_checkpoint):
            if p.is_file():
                return p
        raise CellmorphError(f"{self.checkpoints}: neither best.pt nor last.pt exists")


def run_dir(run_root: str | AnyPath, name: str) -> RunDir:
    return RunDir(as_path(run_root) / name)


def _readable(path: AnyPath) -> Any:
    """What pandas and numpy read: the local path, or the object's bytes in memory."""
    return io.BytesIO(path.read_bytes()) if isinstance(path, URLPath) else path


def save_npy(path: AnyPath, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # np.save(path) would append ".npy" to the temporary name
            np.save(f, array)

    atomic.write_with(path, write)


class LabelEncoding(NamedTuple):
    """Class id -> name for one label column (``classes.json``)."""

    label_column: str
    classes: list[str]


def save_label_encoding(encoding: LabelEncoding, path: str | AnyPath) -> AnyPath:
    payload = {"label_column": encoding.label_column, "classes": list(encoding.classes)}
    return atomic.write_text(path, json.dumps(payload, indent=1))


def load_label_encoding(path: str | AnyPath) -> LabelEncoding:
    """Read ``classes.json``; a missing file or key is a CellmorphError naming it."""
    p = as_path(path)
    if not p.is_file():
        raise CellmorphError(f"{p}: label encoding not found")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CellmorphError(f"{p}: not valid JSON ({e})") from None
    for key in ("label_column", "classes"):
        if not isinstance(raw, dict) or key not in raw:
            raise CellmorphError(f"{p}: missing key {key!r}")
    classes = [str(c) for c in raw["classes"]]
    if len(set(classes)) != len(classes):
        raise CellmorphError(f"{p}: 'classes' has duplicate names")
    return LabelEncoding(str(raw["label_column"]), classes)


class OutputPart:
    """One rank's per-image outputs of one fold (store row, label, probabilities, embedding),
    streamed to parquet in row groups of :data:`OUTPUT_ROWS`; whole or absent (temporary name,
    renamed by :meth:`close`)."""

    def __init__(self, path: AnyPath):
        self.path = path
        if isinstance(path, URLPath):  # written locally, put whole by close()
            self.tmp = Path(tempfile.mkdtemp(prefix="cellmorph-part-")) / path.name
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = atomic.temp_path(path)
        self.writer: pq.ParquetWriter | None = None
        self.buffer: list[tuple[np.ndarray, ...]] = []
        self.buffered = 0

    def write(self, rows: np.ndarray, labels: np.ndarray, probs: np.ndarray,
              emb: np.ndarray) -> None:  # fmt: skip
        self.buffer.append((rows, labels, probs, emb))
        self.buffered += len(rows)
        if self.buffered >= OUTPUT_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self.buffer:
            return
        rows, labels, probs, emb = (np.concatenate(c) for c in zip(*self.buffer))
        self.buffer, self.buffered = [], 0
        table = pa.table({
            STORE_ROW: pa.array(rows, pa.int64()), "label": pa.array(labels, pa.int64()),
            "probs": _fixed_lists(probs), "embedding": _fixed_lists(emb),
        })  # fmt: skip
        self.writer = self.writer or pq.ParquetWriter(self.tmp, table.schema)
        self.writer.write_table(table)
        del table
        pa.default_memory_pool().release_unused()  # else the pool keeps every buffer's pages

    def close(self) -> None:
        """Finish the part (an empty one when this rank had no images)."""
        self._flush()
        if self.writer is None:
            empty = np.zeros((0, 0), np.float32)
            self.write(np.zeros(0, np.int64), np.zeros(0, np.int64), empty, empty)
            self._flush()
        self.writer.close()
        if isinstance(self.path, URLPath):
            remote.write(self.path.url, self.tmp)
            shutil.rmtree(self.tmp.parent, ignore_errors=True)
        else:
            os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.tmp.unlink(missing_ok=True)
        if isinstance(self.path, URLPath):
            shutil.rmtree(self.tmp.parent, ignore_errors=True)


def _fixed_lists(values: np.ndarray) -> pa.FixedSizeListArray:
    values = np.ascontiguousarray(values, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), values.shape[1])


def _matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-size-list column as an (N, width) float32 array."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = arr.type.list_size
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)


def _prediction_table(batch: pa.RecordBatch | None, classes: list[str],
                      metadata: MetadataRows) -> tuple[pa.Table, np.ndarray]:  # fmt: skip
    """One row group of ``<fold>_predictions.parquet`` from a part's batch, and its embeddings."""
    if batch is None:
        rows, labels = np.zeros(0, np.int64), np.zeros(0, np.int64)
        probs, emb = np.zeros((0, len(classes)), np.float32), np.zeros((0, 0), np.float32)
    else:
        rows = batch.column(STORE_ROW).to_numpy()
        labels = batch.column("label").to_numpy()
        probs, emb = _matrix(batch.column("probs")), _matrix(batch.column("embedding"))
    pred = probs.argmax(axis=1) if len(probs) else labels
    names = np.asarray(classes, dtype=object)
    base = metadata.take(rows)
    columns = {STORE_ROW: pa.array(rows, pa.int64()),
               **{n: base.column(n) for n in base.column_names},
               "label": pa.array(labels, pa.int64()), "label_name": pa.array(names[labels], pa.string()),
               "pred": pa.array(pred, pa.int64()), "pred_name": pa.array(names[pred], pa.string()),
               **{f"prob:{c}": pa.array(probs[:, i]) for i, c in enumerate(classes)}}  # fmt: skip
    return pa.table(columns), emb
