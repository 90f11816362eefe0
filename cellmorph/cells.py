"""What changes downstream when a store's rows are single cells (``Store.unit == "cell"``).

A cell store (the contract in docs/architecture.md) is read, split, loaded and trained on as a
field store is; scoring adds the *site* level (each site's mean probability over its cells)
between the cell level (the image-level names: ``accuracy``, ``balanced_accuracy``...) and
the well level, and ``well_balanced_accuracy`` of the test fold is the headline. This module
holds the few pieces only cell stores need: the site id of every row and the site table written
beside a fold's predictions (the headline is put first by :func:`cellmorph.rundir.lead`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cellmorph import atomic
from cellmorph.outputs import OUTPUT_ROWS, OutputSet, class_columns, prob_columns
from cellmorph.store.layout import PLATE, SITE, WELL
from cellmorph.urlpath import local_copy

CELL = "cell"  # Store.unit of a cell store
SITE_KEYS = [PLATE, WELL, SITE]


def site_codes(metadata: pd.DataFrame, wells: np.ndarray) -> np.ndarray:
    """int32 per row: its site (``wells`` from :func:`cellmorph.store.layout.well_codes` and
    ``Metadata_Site``), numbered from 0 in the order the sites first appear. Four bytes per
    cell: at 75 M cells, 300 MB, the one per-row array cell stores add to scoring."""
    site = pd.factorize(metadata[SITE], sort=True)[0].astype(np.int64)
    codes = pd.factorize(wells.astype(np.int64) * (int(site.max()) + 1 if len(site) else 1) + site)[
        0
    ]
    return codes.astype(np.int32)


def write_sites(out: OutputSet, classes: list[str]) -> int:
    """``<prefix>sites.parquet`` from the fold's ``predictions.parquet`` (store order, so a
    site's cells are contiguous): per site its ``Metadata_`` columns (its first cell's),
    ``n_cells``, ``pred``, ``pred_name`` and ``prob:<class>`` (mean over its cells). Read
    a row group at a time; returns the number of sites."""
    probs = prob_columns(classes)
    with local_copy(out.predictions) as path:
        f = pq.ParquetFile(path, pre_buffer=False)
        meta = [c for c in f.schema_arrow.names if c.startswith("Metadata_")]
        sites, pending = 0, None
        with atomic.atomic_path(out.sites) as target:
            writer = None
            for batch in f.iter_batches(batch_size=OUTPUT_ROWS, columns=meta + probs):
                frame = batch.to_pandas()
                frame = frame if pending is None else pd.concat([pending, frame], ignore_index=True)
                new = (frame[SITE_KEYS] != frame[SITE_KEYS].shift()).any(axis=1).to_numpy()
                group = np.cumsum(new) - 1
                last = group == group[-1]  # the last site may go on in the next row group
                pending = frame[last]
                if (~last).any():
                    writer = _write_sites(writer, target, frame[~last], group[~last], meta, classes)
                    sites += int(group[-1])
            if pending is not None and len(pending):
                writer = _write_sites(writer, target, pending, np.zeros(len(pending), np.int64),
                                      meta, classes)  # fmt: skip
                sites += 1
            if writer is None:  # no cells: a file with the columns, no rows
                empty = f.schema_arrow.empty_table().select(meta + probs).to_pandas()
                writer = _write_sites(None, target, empty, np.zeros(0, np.int64), meta, classes)
            writer.close()
    return sites


def _write_sites(writer: pq.ParquetWriter | None, target: Any, frame: pd.DataFrame,
                 group: np.ndarray, meta: list[str], classes: list[str]) -> pq.ParquetWriter:  # fmt: skip
    by = frame.groupby(group, sort=True)
    first = by[meta].first()
    mean = by[prob_columns(classes)].mean().to_numpy(np.float32).reshape(len(first), len(classes))
    cols = {c: pa.array(first[c].to_numpy()) for c in meta}
    cols["n_cells"] = pa.array(by.size().to_numpy(np.int64))
    table = pa.table({**cols, **class_columns(None, mean, classes)})
    writer = writer or pq.ParquetWriter(target, table.schema)
    writer.write_table(table)
    return writer
