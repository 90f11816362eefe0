"""Per-image and per-well outputs of a model on store rows: one schema for runs and ``predict``.

For a fold of a run (``prefix`` ``val_`` or ``test_`` in ``runs/<name>/``) and for ``cellmorph
predict --out DIR`` (no prefix) the same three files::

    <prefix>predictions.parquet  one row per image, in store order: store_row, the store's
                                 metadata columns, label (-1: not known), label_name, pred,
                                 pred_name, prob:<class> for every class
    <prefix>embeddings.npy       float32 (images, D): the penultimate layer, same row order
    <prefix>wells.parquet        one row per well, in store order: the well's Metadata_ columns
                                 (its first image's; Metadata_Site left out), n_images, pred,
                                 pred_name, prob:<class> (mean over the well's images),
                                 emb_NNNN (mean embedding), int_NNN (mean intensity statistics
                                 of the model's input: the profiling baseline)
    <prefix>sites.parquet        cell stores: one row per site, in store order: its Metadata_
                                 columns, n_cells, pred, pred_name, prob:<class> (mean over its
                                 cells; cellmorph/cells.py)

For a cell store a row of predictions.parquet is one cell (its ObjectNumber and
Location_Center_X/Y come with the store's metadata columns) and ``n_images`` counts cells.

Each rank streams its images and its closed wells to parts (``.<prefix>outputs/``); rank 0 adds
the wells split between ranks and merges everything a row group at a time, so memory never holds
a fold.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cellmorph import atomic, remote
from cellmorph.errors import CellmorphError
from cellmorph.store.layout import SITE, STORE_ROW
from cellmorph.urlpath import AnyPath, URLPath, as_path, local_copy

if TYPE_CHECKING:
    from cellmorph.store.read import MetadataRows

# Rows per row group of the outputs (what a writer or reader holds at a time).
OUTPUT_ROWS = 8_192
PREDICTIONS, EMBEDDINGS, WELLS = "predictions.parquet", "embeddings.npy", "wells.parquet"
SITES, PROFILES = "sites.parquet", "profiles.parquet"


def prob_columns(classes: list[str]) -> list[str]:
    return [f"prob:{c}" for c in classes]


def embedding_columns(dim: int) -> list[str]:
    return [f"emb_{i:04d}" for i in range(dim)]


def feature_columns(n: int) -> list[str]:
    return [f"int_{i:03d}" for i in range(n)]


@dataclass(frozen=True)
class OutputSet:
    """The output files of one fold (or one ``predict``) in a folder (local or a URL)."""

    folder: AnyPath
    prefix: str = ""

    @property
    def predictions(self) -> AnyPath:
        return as_path(self.folder) / f"{self.prefix}{PREDICTIONS}"

    @property
    def embeddings(self) -> AnyPath:
        return as_path(self.folder) / f"{self.prefix}{EMBEDDINGS}"

    @property
    def wells(self) -> AnyPath:
        return as_path(self.folder) / f"{self.prefix}{WELLS}"

    @property
    def sites(self) -> AnyPath:
        """Cell stores: one row per site (:func:`cellmorph.cells.write_sites`)."""
        return as_path(self.folder) / f"{self.prefix}{SITES}"

    @property
    def parts(self) -> AnyPath:
        return as_path(self.folder) / f".{self.prefix}outputs"

    def part(self, rank: int, kind: str) -> AnyPath:
        return self.parts / f"rank{rank:05d}.{kind}.parquet"

    def writers(self, rank: int) -> tuple[PartWriter, PartWriter]:
        """This rank's streaming writers of its images and of its closed wells."""
        return PartWriter(self.part(rank, "images")), PartWriter(self.part(rank, "wells"))

    def remove_stale(self) -> None:
        """Temporary files a killed writer left beside the outputs (a rerun cleans up)."""
        atomic.remove_stale_temps(self.folder)
        if isinstance(self.parts, Path):
            shutil.rmtree(self.parts, ignore_errors=True)


def fixed_lists(values: np.ndarray) -> pa.FixedSizeListArray:
    values = np.ascontiguousarray(values, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), values.shape[1])


def matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-size-list column as an (N, width) float32 array."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = arr.type.list_size
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)


class PartWriter:
    """One rank's part of a fold's outputs: columns streamed to parquet in row groups of
    :data:`OUTPUT_ROWS`; whole or absent (temporary name, renamed by :meth:`close`)."""

    def __init__(self, path: AnyPath):
        self.path = path
        if isinstance(path, URLPath):  # written locally, put whole by close()
            self.tmp = Path(tempfile.mkdtemp(prefix="cellmorph-part-")) / path.name
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = atomic.temp_path(path)
        self.writer: pq.ParquetWriter | None = None
        self.buffer: list[dict[str, np.ndarray]] = []
        self.buffered = 0

    def write(self, **columns: np.ndarray) -> None:
        """Append rows: 1-D columns, or 2-D ones (stored as fixed-size lists)."""
        self.buffer.append(columns)
        self.buffered += len(next(iter(columns.values())))
        if self.buffered >= OUTPUT_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self.buffer:
            return
        names = list(self.buffer[0])
        cols = {n: np.concatenate([b[n] for b in self.buffer]) for n in names}
        self.buffer, self.buffered = [], 0
        table = pa.table({n: fixed_lists(v) if v.ndim == 2 else pa.array(v)
                          for n, v in cols.items()})  # fmt: skip
        self.writer = self.writer or pq.ParquetWriter(self.tmp, table.schema)
        self.writer.write_table(table)
        del table
        pa.default_memory_pool().release_unused()  # else the pool keeps every buffer's pages

    def close(self, empty: dict[str, np.ndarray]) -> None:
        """Finish the part; ``empty`` gives the columns when this rank wrote nothing."""
        self._flush()
        if self.writer is None:
            self.write(**empty)
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


def empty_images(k: int, dim: int) -> dict[str, np.ndarray]:
    return {"row": np.zeros(0, np.int64), "label": np.zeros(0, np.int64),
            "probs": np.zeros((0, k), np.float32), "embedding": np.zeros((0, dim), np.float32)}  # fmt: skip


def empty_wells(k: int, dim: int, f: int) -> dict[str, np.ndarray]:
    return {"well": np.zeros(0, np.int64), "first_row": np.zeros(0, np.int64),
            "n_images": np.zeros(0, np.int64), "probs": np.zeros((0, k), np.float32),
            "embedding": np.zeros((0, dim), np.float32),
            "features": np.zeros((0, f), np.float32)}  # fmt: skip


# --------------------------------------------------------------------------- merging (rank 0)


def merge(out: OutputSet, ranks: int, classes: list[str], metadata: MetadataRows,
          split_wells: dict[str, np.ndarray] | None) -> tuple[int, int]:  # fmt: skip
    """Merge the ranks' parts (rank order is store order) and the wells split between ranks
    into the three files; returns (images, wells)."""
    parts = [(out.part(r, "images"), out.part(r, "wells")) for r in range(ranks)]
    missing = [str(p) for pair in parts for p in pair if not p.is_file()]
    if missing:
        raise CellmorphError(f"outputs: rank part(s) {', '.join(missing)} missing")
    with contextlib.ExitStack() as stack:  # an object store's parts: local copies
        local = [[stack.enter_context(local_copy(p)) for p in pair] for pair in parts]
        n = _merge_images(out, [p[0] for p in local], classes, metadata)
        w = _merge_wells(out, [p[1] for p in local], split_wells, classes, metadata)
    if isinstance(out.parts, URLPath):
        remote.delete_tree(str(out.parts))
    else:
        shutil.rmtree(out.parts, ignore_errors=True)
    return n, w


def _merge_images(out: OutputSet, parts: list[Path], classes: list[str],
                  metadata: MetadataRows) -> int:  # fmt: skip
    files = [pq.ParquetFile(p, pre_buffer=False) for p in parts]  # not whole files ahead
    n = sum(f.metadata.num_rows for f in files)
    dim = files[0].schema_arrow.field("embedding").type.list_size
    with atomic.atomic_path(out.predictions) as preds, atomic.atomic_path(out.embeddings) as embs, \
            open(embs, "wb") as emb_file:  # fmt: skip
        np.lib.format.write_array_header_1_0(
            emb_file, {"descr": "<f4", "fortran_order": False, "shape": (n, dim)}
        )
        writer = None
        for batch in (b for f in files for b in f.iter_batches(batch_size=OUTPUT_ROWS)):
            table = image_table(batch.column("row").to_numpy(), batch.column("label").to_numpy(),
                                matrix(batch.column("probs")), classes, metadata)  # fmt: skip
            emb_file.write(np.ascontiguousarray(matrix(batch.column("embedding")), "<f4"))
            writer = writer or pq.ParquetWriter(preds, table.schema)
            writer.write_table(table)
            pa.default_memory_pool().release_unused()  # a row group at a time, really
        if writer is None:  # an empty fold: a file with the columns, no rows
            empty = empty_images(len(classes), dim)
            table = image_table(empty["row"], empty["label"], empty["probs"], classes, metadata)
            writer = pq.ParquetWriter(preds, table.schema)
        writer.close()
    return n


def class_columns(labels: np.ndarray | None, probs: np.ndarray,
                   classes: list[str]) -> dict[str, pa.Array]:  # fmt: skip
    names = np.asarray([*classes, ""], dtype=object)  # label -1 -> ""
    pred = probs.argmax(axis=1) if len(probs) else np.zeros(0, np.int64)
    cols: dict[str, pa.Array] = {}
    if labels is not None:
        cols["label"] = pa.array(labels, pa.int64())
        cols["label_name"] = pa.array(names[labels], pa.string())
    cols["pred"] = pa.array(pred, pa.int64())
    cols["pred_name"] = pa.array(names[pred], pa.string())
    cols.update({c: pa.array(probs[:, i]) for i, c in enumerate(prob_columns(classes))})
    return cols


def image_table(rows: np.ndarray, labels: np.ndarray, probs: np.ndarray, classes: list[str],
                metadata: MetadataRows) -> pa.Table:  # fmt: skip
    """One row group of ``predictions.parquet``: store rows (ascending) and their scores."""
    base = metadata.take(rows)
    return pa.table({STORE_ROW: pa.array(rows, pa.int64()),
                     **{n: base.column(n) for n in base.column_names},
                     **class_columns(labels, probs, classes)})  # fmt: skip


def _well_batches(parts: list[Path], split: dict[str, np.ndarray] | None) -> Iterator[pa.Table]:
    """Every rank's closed wells (each part in store order, parts in rank order) with the
    wells split between ranks put in their places: all in store order, a row group at a time."""
    files = [pq.ParquetFile(p, pre_buffer=False) for p in parts]
    schema = files[0].schema_arrow
    pending = (
        pa.table({})
        if split is None or not len(split["well"])
        else pa.table(
            {n: fixed_lists(v) if v.ndim == 2 else pa.array(v) for n, v in split.items()}
        ).cast(schema)
    )
    pending = pending.take(pa.array(np.argsort(pending.column("first_row").to_numpy()))) \
        if pending.num_columns else pending  # fmt: skip
    for batch in (b for f in files for b in f.iter_batches(batch_size=OUTPUT_ROWS)):
        table = pa.Table.from_batches([batch])
        if pending.num_columns and pending.num_rows and table.num_rows:
            before = int(np.searchsorted(pending.column("first_row").to_numpy(),
                                         table.column("first_row").to_numpy()[0]))  # fmt: skip
            if before:
                yield pending.slice(0, before)
                pending = pending.slice(before)
        yield table
    if pending.num_columns and pending.num_rows:
        yield pending


def _merge_wells(out: OutputSet, parts: list[Path], split: dict[str, np.ndarray] | None,
                 classes: list[str], metadata: MetadataRows) -> int:  # fmt: skip
    columns = [c for c in metadata.names if c.startswith("Metadata_") and c != SITE]
    wells = 0
    with atomic.atomic_path(out.wells) as target:
        writer = None
        for batch in _well_batches(parts, split):
            t = well_table(batch, classes, metadata, columns)
            writer = writer or pq.ParquetWriter(target, t.schema)
            writer.write_table(t)
            wells += batch.num_rows
        if writer is None:  # no wells: a file with the columns, no rows
            t = well_table(pq.read_table(parts[0]), classes, metadata, columns)
            writer = pq.ParquetWriter(target, t.schema)
        writer.close()
    return wells


def well_table(batch: pa.Table, classes: list[str], metadata: MetadataRows,
               columns: list[str]) -> pa.Table:  # fmt: skip
    """Rows of ``wells.parquet`` from closed wells (ascending first rows)."""
    first = batch.column("first_row").to_numpy()
    base = metadata.take(first).select(columns) if columns else pa.table({})
    emb, feats = matrix(batch.column("embedding")), matrix(batch.column("features"))
    cols = {**{n: base.column(n) for n in base.column_names},
            "n_images": batch.column("n_images"),
            **class_columns(None, matrix(batch.column("probs")), classes),
            **{c: pa.array(emb[:, i]) for i, c in enumerate(embedding_columns(emb.shape[1]))},
            **{c: pa.array(feats[:, i]) for i, c in enumerate(feature_columns(feats.shape[1]))}}  # fmt: skip
    return pa.table(cols)
