"""Well profiles as the field builds them (pycytominer), and their phenotypic activity.

``profiles.parquet`` (a run: the held-out wells, validation + test; ``predict``: every well)
is built with pycytominer, the field's library, from the per-cell (per-image, for a field
store) embeddings the outputs hold (:mod:`cellmorph.outputs`)::

    pycytominer.aggregate       median of each well's rows (wells are contiguous in store
                                order: a block of whole wells at a time, read from the
                                memory-mapped embeddings.npy, never the whole matrix)
    pycytominer.normalize       per plate, standardized against the plate's negative-control
                                wells (the store's ``negcon`` spec); a plate with fewer than two
                                of them against all its wells (named in the summary)
    pycytominer.feature_select  variance_threshold, correlation_threshold, drop_na_columns
                                (correlation_threshold's choice vectorized: see
                                :func:`correlation_threshold`)

Columns follow pycytominer's conventions: the well's ``Metadata_`` columns (its first row's,
``Metadata_Site`` left out), ``Metadata_Object_Count`` (rows aggregated), then the selected
features ``emb_NNNN`` (float32). Field and cell stores take the same path.

Phenotypic activity (copairs mAP, :mod:`cellmorph.profiling`) is computed on these profiles for
a seeded sample of the wells (:func:`cellmorph.sampling.sample_wells`); the intensity baseline
beside it reads the mean input statistics of the same wells from the wells tables.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cellmorph import atomic
from cellmorph.errors import CellmorphError
from cellmorph.outputs import OUTPUT_ROWS, OutputSet, embedding_columns
from cellmorph.profiling import NEGCON_FLAG, activity_report, negcon_mask
from cellmorph.sampling import PROFILE_SAMPLE, sample_wells
from cellmorph.store.layout import PLATE, SITE, WELL
from cellmorph.urlpath import AnyPath, local_copy

BLOCK_ROWS = 16_384  # rows aggregated at a time (pycytominer holds them as float64)
SELECT = ["variance_threshold", "correlation_threshold", "drop_na_columns"]
METHOD = "standardize"
OBJECT_COUNT = "Metadata_Object_Count"  # pycytominer's name for the rows aggregated
KEYS = [PLATE, WELL]


# --------------------------------------------------------------------------- building


def _blocks(out: OutputSet, block_rows: int) -> Iterator[pd.DataFrame]:
    """The fold's rows, whole wells at a time (at least ``block_rows`` rows unless the file
    ends): their ``Metadata_`` columns and embeddings."""
    with local_copy(out.predictions) as preds, local_copy(out.embeddings) as embs:
        emb = np.load(embs, mmap_mode="r")
        f = pq.ParquetFile(preds, pre_buffer=False)
        meta = [c for c in f.schema_arrow.names if c.startswith("Metadata_")]
        names = embedding_columns(emb.shape[1])
        pending, start = None, 0  # start: the file row of pending's first row
        for batch in f.iter_batches(batch_size=OUTPUT_ROWS, columns=meta):
            frame = batch.to_pandas()
            if pending is not None:
                frame = pd.concat([pending, frame], ignore_index=True)
            new = np.flatnonzero((frame[KEYS] != frame[KEYS].shift()).any(axis=1).to_numpy())
            cut = int(new[-1])  # where the last well, perhaps unfinished, starts
            if len(frame) < block_rows or cut == 0:
                pending = frame
                continue
            yield _with_embeddings(frame.iloc[:cut], emb[start : start + cut], names)
            start, pending = start + cut, frame.iloc[cut:].reset_index(drop=True)
        if pending is not None and len(pending):
            yield _with_embeddings(pending, emb[start : start + len(pending)], names)


def _with_embeddings(meta: pd.DataFrame, emb: np.ndarray, names: list[str]) -> pd.DataFrame:
    features = pd.DataFrame(np.asarray(emb, np.float32), columns=names)
    return pd.concat([meta.reset_index(drop=True), features], axis=1)


def _aggregate(block: pd.DataFrame, features: list[str]) -> pd.DataFrame:
    """pycytominer's median per well, after the well's own ``Metadata_`` columns."""
    import pycytominer

    agg = pycytominer.aggregate(block, strata=KEYS, features=features, operation="median",
                                compute_object_count=True, object_feature=SITE)  # fmt: skip
    meta = [c for c in block.columns if c.startswith("Metadata_") and c != SITE]
    first = block.drop_duplicates(KEYS)[meta]
    return first.merge(agg, on=KEYS, how="right")


def _normalize(wells: pd.DataFrame, features: list[str], negcon: str) -> tuple[pd.DataFrame, list[str]]:  # fmt: skip
    """pycytominer's normalize, plate by plate, against the plate's negative-control wells;
    returns the table and the plates that had fewer than two (normalized to all wells)."""
    import pycytominer

    meta = [c for c in wells.columns if c.startswith("Metadata_")]
    parts, to_all = [], []
    for plate, frame in wells.groupby(PLATE, sort=True):
        frame = frame.reset_index(drop=True)
        neg = np.flatnonzero(negcon_mask(frame, negcon))
        samples = f"index in {neg.tolist()}" if len(neg) >= 2 else "all"
        if samples == "all":
            to_all.append(str(plate))
        parts.append(pycytominer.normalize(frame, features=features, meta_features=meta,
                                           samples=samples, method=METHOD))  # fmt: skip
    return pd.concat(parts, ignore_index=True), to_all


def correlation_threshold(profiles: pd.DataFrame, features: list[str],
                          threshold: float = 0.9) -> list[str]:  # fmt: skip
    """pycytominer's ``correlation_threshold``: the features it excludes, chosen as it does.

    For every pair of features correlated above ``threshold`` (pycytominer's pairs and
    correlations), the one of higher total absolute correlation goes. pycytominer picks it with
    a pandas ``apply`` over the pairs, ~0.5 ms a pair: the embeddings of a few wells have most
    of their 1,280 features correlated (800,000 pairs, minutes at the end of every run). The
    same rule on arrays takes milliseconds.
    """
    from pycytominer.cyto_utils.util import get_pairwise_correlation

    cor, pairs = get_pairwise_correlation(profiles.loc[:, features], method="pearson")
    ranked = cor.abs().sum().sort_values().index  # pycytominer's order: the last goes first
    pairs = pairs[pairs["correlation"] > threshold]
    rank = pd.Series(np.arange(len(ranked)), index=ranked)
    a, b = pairs["pair_a"].to_numpy(), pairs["pair_b"].to_numpy()
    higher = rank.reindex(a).to_numpy() > rank.reindex(b).to_numpy()
    return list(set(np.where(higher, a, b).tolist()))


def feature_select(profiles: pd.DataFrame, features: list[str]) -> pd.DataFrame:
    """``pycytominer.feature_select(profiles, features, operation=SELECT)``, each operation on
    the features the previous ones kept, as pycytominer runs them; correlation_threshold's
    choice is :func:`correlation_threshold`'s."""
    import pycytominer

    kept = list(features)
    for op in SELECT:
        if not kept:
            break
        if op == "correlation_threshold":
            drop = set(correlation_threshold(profiles, kept))
        else:
            left = pycytominer.feature_select(profiles, features=kept, operation=op).columns
            drop = set(kept) - set(left)
        kept = [f for f in kept if f not in drop]
    return profiles.drop(columns=[f for f in features if f not in kept])


def build_profiles(sets: list[OutputSet], negcon: str, target: AnyPath,
                   block_rows: int = BLOCK_ROWS) -> dict[str, Any]:  # fmt: skip
    """Write ``target`` (profiles.parquet) from the outputs ``sets``; returns what was done."""
    parts, features = [], None
    for s in sets:
        for block in _blocks(s, block_rows):
            features = features or [c for c in block.columns if c.startswith("emb_")]
            parts.append(_aggregate(block, features))
    if not parts:
        return {"skipped": "no wells to profile"}
    wells = pd.concat(parts, ignore_index=True).sort_values(KEYS, kind="stable")
    normalized, to_all = _normalize(wells.reset_index(drop=True), features, negcon)
    selected = feature_select(normalized, features)
    kept = [c for c in features if c in selected.columns]
    note = {}
    if not kept:  # too few wells for the selection's statistics: keep every feature
        selected, kept = normalized, features
        note = {"feature_select": "dropped every feature; all kept"}
    meta = [c for c in normalized.columns if c.startswith("Metadata_")]
    # One float32 block: astype with a dict converts column by column (0.43 s vs 0.2 s for 48
    # wells x 1,280 features; the table is the same, schema and metadata included).
    features32 = pd.DataFrame(selected[kept].to_numpy(np.float32), columns=kept)
    table = pa.Table.from_pandas(pd.concat([selected[meta].reset_index(drop=True), features32],
                                           axis=1), preserve_index=False)  # fmt: skip
    with atomic.atomic_path(target) as tmp:
        pq.write_table(table, tmp)
    return {"file": Path(str(target)).name, "wells": table.num_rows, "features": len(features),
            "features_selected": len(kept), "aggregate": "median per well",
            "normalize": f"{METHOD}, per plate, against its negative-control wells",
            "plates_normalized_to_all_wells": to_all, "feature_select": SELECT, **note}  # fmt: skip


# --------------------------------------------------------------------------- phenotypic activity


def _parquet(path: AnyPath) -> pq.ParquetFile:
    """A wells or profiles file, local or in an object store (read whole: a few MB)."""
    if isinstance(path, Path):
        return pq.ParquetFile(path, pre_buffer=False)
    return pq.ParquetFile(pa.BufferReader(path.read_bytes()))


def _take(f: pq.ParquetFile, rows: np.ndarray, columns: list[str]) -> np.ndarray:
    """``columns`` of ``rows`` (ascending) as a float matrix, a row group at a time."""
    out, start = [], 0
    for g in range(f.metadata.num_row_groups):
        n = f.metadata.row_group(g).num_rows
        sel = rows[(rows >= start) & (rows < start + n)] - start
        if len(sel):
            t = f.read_row_group(g, columns).take(pa.array(sel))
            out.append(np.column_stack([t.column(c).to_numpy() for c in columns]))
        start += n
    return np.concatenate(out) if out else np.zeros((0, len(columns)))


def _sampled_wells(files: list[pq.ParquetFile], label_column: str, negcon: str,
                   seed: int) -> pd.DataFrame:  # fmt: skip
    """The wells to profile (a seeded sample), with their file and row in it."""
    tables = []
    for i, f in enumerate(files):
        cols = [c for c in f.schema_arrow.names if c.startswith("Metadata_") or c == "n_images"]
        t = f.read(columns=cols).to_pandas()
        tables.append(t.assign(_file=i, _row=np.arange(len(t))))
    wells = pd.concat(tables, ignore_index=True)
    if label_column not in wells.columns:
        raise CellmorphError(f"profiling: the wells have no column {label_column!r}")
    treatment = wells[label_column].astype(str).to_numpy()
    flag = negcon_mask(wells, negcon)
    keep = sample_wells(treatment, flag, seed)
    chosen = wells.iloc[keep].assign(treatment=treatment[keep], **{NEGCON_FLAG: flag[keep]})
    return chosen.reset_index(drop=True)


def _baseline(files: list[pq.ParquetFile], chosen: pd.DataFrame) -> np.ndarray:
    """The chosen wells' mean input statistics (``int_`` columns of the wells tables)."""
    parts = np.zeros((len(chosen), 0))
    for i, f in enumerate(files):
        cols = [c for c in f.schema_arrow.names if c.startswith("int_")]
        mine = np.flatnonzero(chosen["_file"].to_numpy() == i)
        order = np.argsort(chosen["_row"].to_numpy()[mine], kind="stable")
        feats = _take(f, chosen["_row"].to_numpy()[mine][order], cols)
        if parts.shape[1] == 0:
            parts = np.zeros((len(chosen), len(cols)))
        parts[mine[order]] = feats
    return parts


def _embedding_profiles(path: AnyPath, chosen: pd.DataFrame) -> np.ndarray:
    """The chosen wells' rows of profiles.parquet (its features, in ``chosen``'s order)."""
    f = _parquet(path)
    keys = f.read(columns=KEYS).to_pandas().astype(str)
    where = pd.Series(np.arange(len(keys)), index=pd.MultiIndex.from_frame(keys))
    wanted = pd.MultiIndex.from_frame(chosen[KEYS].astype(str))
    rows = where.reindex(wanted).to_numpy()
    if np.isnan(rows.astype(float)).any():
        raise CellmorphError(f"profiling: {path} lacks wells the wells tables hold")
    rows = rows.astype(np.int64)
    features = [c for c in f.schema_arrow.names if not c.startswith("Metadata_")]
    order = np.argsort(rows, kind="stable")
    out = np.zeros((len(rows), len(features)))
    out[order] = _take(f, rows[order], features)
    return out


def profile(sets: list[OutputSet], label_column: str, negcon: str, seed: int, fold_name: str,
            target: AnyPath) -> dict[str, Any]:  # fmt: skip
    """Build ``target`` (profiles.parquet) from the outputs ``sets`` (e.g. the validation and
    test folds), then score phenotypic activity (copairs mAP against the negative-control
    wells) on those profiles, and on the intensity baseline.

    Says which wells were profiled (``fold``) and how many treatments have the two or more
    wells a score needs (``treatments_scorable`` of ``treatments_total``)."""
    built = build_profiles(sets, negcon, target)
    files = [_parquet(s.wells) for s in sets]
    chosen = _sampled_wells(files, label_column, negcon, seed)
    emb = _embedding_profiles(target, chosen) if "skipped" not in built else np.zeros((0, 0))
    table = pd.DataFrame({
        "well": chosen[PLATE].astype(str) + "/" + chosen[WELL].astype(str),
        "treatment": chosen["treatment"], NEGCON_FLAG: chosen[NEGCON_FLAG],
        "images": chosen["n_images"],
    })  # fmt: skip
    out = activity_report(table, {"embeddings": emb, "intensity_baseline": _baseline(files, chosen)}, seed)  # fmt: skip
    treated = table.loc[~table[NEGCON_FLAG], "treatment"].value_counts()
    enough_controls = int(table[NEGCON_FLAG].sum()) >= 2
    out.update({"fold": fold_name, "treatments_total": int(treated.size), "profiles": built,
                "treatments_scorable": int((treated >= 2).sum()) if enough_controls else 0})  # fmt: skip
    n_all = sum(f.metadata.num_rows for f in files)
    if len(table) < n_all:
        out["sampled"] = f"{len(table)} of {n_all} wells: {PROFILE_SAMPLE}"
    return out
