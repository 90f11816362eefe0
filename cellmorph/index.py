"""The index: labels, class selection, honest splits and balancing, over row numbers only.

Everything here works on arrays of store rows (never images), so a 3,000,000-row metadata
table is indexed in seconds.

- Labels come from a configurable column. Classes are sorted by name (class id = position), so
  the encoding does not depend on row order; ``classes.json`` stores it with every run.
- ``split=grouped`` (default) splits *wells* (or plates), stratified by class, so no well has
  images on both sides: sites of one well are near-duplicates. Wells are collapsed to one unit
  each (with their majority label) before scikit-learn sees them, which is what makes it fast.
- ``split=plate`` holds out whole plates; ``split=image`` is the original study's image-level
  split, kept for comparison and flagged ``leaky``.
- Oversampling (imbalanced-learn ``RandomOverSampler`` over row ids) touches the training fold
  only, unless ``oversample_before_split`` asks for the study's flawed protocol on purpose.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.utils.class_weight import compute_class_weight

from cellmorph.config import DEFAULT_LABEL_COLUMN, DataConfig
from cellmorph.content_ids import content_ids
from cellmorph.errors import CellmorphError
from cellmorph.sampling import contiguous_runs, epoch_indices, epoch_permutation
from cellmorph.store.layout import PLATE, WELL, well_codes_from

__all__ = [
    "Index",
    "build_index",
    "check_batch_size",
    "contiguous_runs",
    "count_val_copies_in_train",
    "encode_labels",
    "epoch_indices",
    "epoch_permutation",
    "shared_wells",
]

log = logging.getLogger(__name__)

_OVERSAMPLE_BLOCK = 16
_ROW_BLOCK = 1 << 20  # rows gathered at a time where a whole fold's copy is not needed
IMAGE_SPLIT_WARNING = (
    "split=image: sites of one well are near-duplicates and land on both sides, so validation "
    "accuracy is inflated; use it only to compare with the original study"
)
STUDY_WARNING = (
    "oversample_before_split: rows were oversampled before the split, so copies of the same "
    "image sit in training and validation (the original study's flaw); for the leakage audit only"
)


class IndexBuildError(CellmorphError):
    """Metadata or data settings that cannot produce an index; the message names the key."""


@dataclass(frozen=True, eq=False)
class Index:
    """Row-level labels and folds for one run.

    ``train``/``val``/``test`` are sorted store rows, unique except under
    ``oversample_before_split`` (the study protocol), where train and val are the two halves of
    an oversampled list and repeat. ``val`` picks epochs and sweep trials; ``test`` is scored
    once, at the end, by the chosen model.
    """

    classes: list[str]  # class id -> name, sorted by name
    labels: np.ndarray  # int64 per store row; -1 = not used (no label or dropped class)
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    train_order: np.ndarray  # training rows after balancing; what each epoch permutes
    class_weights: np.ndarray | None
    summary: dict[str, Any]
    well_ids: np.ndarray | None = None  # int64 per store row: one id per (plate, well)
    content_ids: np.ndarray | None = None  # int64 per store row: equal ids = identical checksum


class _Rows(NamedTuple):
    """Row-level arrays the splitters share."""

    labels: np.ndarray
    well_ids: np.ndarray
    plate_codes: np.ndarray
    plate_names: list[str]
    well_codes: np.ndarray
    n_classes: int


# ---------------------------------------------------------------------------------- labels


def _encode_raw(metadata: pd.DataFrame, column: str) -> tuple[np.ndarray, np.ndarray]:
    """Codes (-1 = missing, blank, or holding a control character) and sorted unique names of a
    label column. Labels are trimmed, and spellings that differ only by case are one class (the
    most frequent spelling, ties by name), the rule conversion applies: a store converted
    before that rule still cannot split "DMSO" and "dmso" into two classes."""
    if column not in metadata.columns:
        cols = [c for c in metadata.columns if str(c).startswith("Metadata_")]
        raise IndexBuildError(
            f"data.label_column: column {column!r} not in the metadata "
            f"(Metadata_ columns: {', '.join(map(str, cols)) or 'none'})"
        )
    codes, uniques = pd.factorize(metadata[column], sort=False)
    names = np.asarray([str(u).strip() for u in uniques], dtype=object)
    counts = np.bincount(codes[codes >= 0], minlength=len(names))
    damaged = np.array([bool(_CONTROL.search(n)) for n in names], dtype=bool)
    if damaged.any():  # a NUL or a line break inside a label: damage, not a class
        log.warning(
            "%d row(s) of column %r have a label holding a control character (%s); they count "
            "as unlabeled", counts[damaged].sum(), column, ", ".join(map(repr, names[damaged][:3])),
        )  # fmt: skip
        names[damaged] = ""
    names = _merge_case(names, counts, column)
    # Merge values that print alike (1 and "1", "a " and "a") and sort by name in one step.
    sorted_names, remap = np.unique(names, return_inverse=True)
    # code -1 (missing) maps to -1; int32 codes: they only index the names (4 bytes a row less)
    remap = np.append(remap, -1).astype(np.int32 if len(names) < 2**31 else np.int64)
    codes = remap[codes]
    if len(sorted_names) and sorted_names[0] == "":
        codes = np.where(codes <= 0, -1, codes - 1)  # blank (0) and missing (-1)
        sorted_names = sorted_names[1:]
    return codes, sorted_names


# C0 and C1 control characters (surrounding whitespace is trimmed first).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _merge_case(names: np.ndarray, counts: np.ndarray, column: str) -> np.ndarray:
    """Per distinct label, its spelling once spellings that differ only by case are merged
    (the most frequent, ties by name: conversion's ``merge_case``); each merge is logged."""
    groups: dict[str, dict[str, int]] = {}
    for name, n in zip(names, counts):
        if name:
            spellings = groups.setdefault(name.casefold(), {})
            spellings[name] = spellings.get(name, 0) + int(n)
    keep = {}
    for spellings in groups.values():
        if len(spellings) > 1:
            chosen = min(spellings, key=lambda v: (-spellings[v], v))
            keep.update(dict.fromkeys(spellings, chosen))
            others = ", ".join(f"{v!r} ({n})" for v, n in sorted(spellings.items()) if v != chosen)
            log.warning(
                "column %r: labels that differ only by case are one class: %s -> %r (%d)",
                column, others, chosen, spellings[chosen],
            )  # fmt: skip
    return np.asarray([keep.get(n, n) for n in names], dtype=object)


def _select_classes(
    codes: np.ndarray, names: np.ndarray, cfg: DataConfig
) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """Keep classes with >= min_count images, then the top_k most frequent (ties by name)."""
    column = cfg.label_column
    counts = np.bincount(codes[codes >= 0], minlength=len(names))
    if counts.sum() == 0:
        raise IndexBuildError(f"data.label_column: no rows have a label in column {column!r}")
    by_freq = np.lexsort((np.arange(len(names)), -counts))  # names are sorted: ties by name
    keep = by_freq[counts[by_freq] >= max(cfg.min_count, 1)]
    if cfg.top_k:
        keep = keep[: cfg.top_k]
    keep = np.sort(keep)
    if len(keep) < 2:
        raise IndexBuildError(
            f"data.label_column: {len(keep)} class(es) of column {column!r} left after "
            f"top_k={cfg.top_k}, min_count={cfg.min_count} (of {int((counts > 0).sum())}); "
            "a classifier needs at least 2"
        )
    mapping = np.full(len(names) + 1, -1, dtype=np.int64)  # last slot catches code -1
    mapping[keep] = np.arange(len(keep))
    info = {
        "counts_before_topk": {str(names[i]): int(counts[i]) for i in by_freq if counts[i]},
        "counts_after_topk": {str(names[i]): int(counts[i]) for i in by_freq if mapping[i] >= 0},
    }
    return mapping[codes], [str(n) for n in names[keep]], info


# ----------------------------------------------------------------------------------- wells


def _factorize_required(metadata: pd.DataFrame, column: str) -> tuple[np.ndarray, list[str]]:
    if column not in metadata.columns:
        raise IndexBuildError(f"metadata: required column {column!r} is missing")
    codes, uniques = pd.factorize(metadata[column], sort=True)
    missing = int((codes < 0).sum())
    if missing:
        raise IndexBuildError(f"metadata: {missing} row(s) have no value in column {column!r}")
    # int32: these codes only index plates and well positions (int64 would be 8 bytes a row).
    return codes.astype(np.int32 if len(uniques) < 2**31 else np.int64), [str(u) for u in uniques]


def _rows(metadata: pd.DataFrame, labels: np.ndarray, n_classes: int) -> _Rows:
    plate_codes, plate_names = _factorize_required(metadata, PLATE)
    positions, well_names = _factorize_required(metadata, WELL)
    # The one well id evaluation and outputs use too (layout.well_codes), from these codes.
    ids = well_codes_from(plate_codes, np.asarray(plate_names, object),
                   positions, np.asarray(well_names, object))[0]  # fmt: skip
    return _Rows(labels, ids, plate_codes, plate_names, positions, n_classes)


def _pairs(a: np.ndarray, n_b: int, b: np.ndarray, used: np.ndarray) -> np.ndarray:
    """``a * n_b + b`` over the used rows (int64), in place: one temporary, not three."""
    key = a[used].astype(np.int64, copy=False)
    key *= n_b
    key += b[used]
    return key


def _counts(key: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(key, return_counts=True)`` for keys in ``[0, size)``: counted, not sorted,
    when ``size`` is at most the keys (sorting 75 M keys takes two more copies of them)."""
    if size > len(key):
        return np.unique(key, return_counts=True)
    counts = np.bincount(key, minlength=size)
    pairs = np.flatnonzero(counts)
    return pairs, counts[pairs]


def _wells_with_majority_label(rows: _Rows) -> tuple[np.ndarray, np.ndarray, int]:
    """One unit per well that has used rows: (well id, majority label, wells with >1 label)."""
    used = rows.labels >= 0
    k = rows.n_classes
    n_wells = int(rows.well_ids.max()) + 1 if len(rows.well_ids) else 0
    pairs, counts = _counts(_pairs(rows.well_ids, k, rows.labels, used), n_wells * k)
    wells, labels = pairs // k, pairs % k
    order = np.lexsort((-counts, wells))  # stable: count ties go to the smaller class id
    wells, labels = wells[order], labels[order]
    first = np.r_[True, wells[1:] != wells[:-1]]
    return wells[first], labels[first], int(len(wells) - first.sum())


# ---------------------------------------------------------------------------------- splits


def _n_splits(val_fraction: float) -> int:
    return max(2, round(1.0 / val_fraction))


def _fold0(splitter: Any, y: np.ndarray, groups: np.ndarray | None, what: str) -> np.ndarray:
    """Test positions of the first fold; sklearn's refusals become CellmorphErrors."""
    with warnings.catch_warnings():
        # Small classes are handled by the caller (train-only or an error), not by a warning.
        warnings.filterwarnings("ignore", message="The least populated class")
        try:
            _, test = next(iter(splitter.split(np.zeros(len(y)), y, groups)))
        except ValueError as e:
            raise IndexBuildError(
                f"data.val_fraction: cannot split {what}: {e} (too few {what} per class for this "
                "fraction: lower it, or hold out whole plates)"
            ) from None
    return test


def _stratified_val(y: np.ndarray, n_classes: int, cfg: DataConfig, what: str) -> np.ndarray:
    """Boolean val mask over units; classes with a single unit stay in training."""
    per_class = np.bincount(y, minlength=n_classes)
    splittable = np.flatnonzero(per_class[y] >= 2)
    val = np.zeros(len(y), dtype=bool)
    if len(splittable):
        skf = StratifiedKFold(_n_splits(cfg.val_fraction), shuffle=True, random_state=cfg.seed)
        val[splittable[_fold0(skf, y[splittable], None, what)]] = True
    return val


def _split_grouped(rows: _Rows, cfg: DataConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """Val mask over rows: whole wells (or plates) go to one side, stratified by class."""
    wells, well_label, mixed = _wells_with_majority_label(rows)
    if cfg.group_by == "well":
        # One unit per well: grouping is already done, so stratified k-fold over wells is the
        # grouped split (StratifiedGroupKFold loops in Python per group: too slow for 300k).
        val_unit = _stratified_val(well_label, rows.n_classes, cfg, "wells")
    else:
        plate_of_well = np.zeros(rows.well_ids.max() + 1, dtype=np.int64)
        plate_of_well[rows.well_ids] = rows.plate_codes
        sgkf = StratifiedGroupKFold(
            _n_splits(cfg.val_fraction), shuffle=True, random_state=cfg.seed
        )
        test = _fold0(sgkf, well_label, plate_of_well[wells], "plates (data.group_by=plate)")
        val_unit = np.zeros(len(wells), dtype=bool)
        val_unit[test] = True
    val_well = np.zeros(rows.well_ids.max() + 1, dtype=bool)
    val_well[wells[val_unit]] = True
    return val_well[rows.well_ids], {"mixed_label_wells": mixed}


def _split_plate(rows: _Rows, cfg: DataConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """Val mask over rows: named plates, or a seeded fraction of the plates with used rows."""
    names = np.asarray(rows.plate_names, dtype=object)
    if cfg.val_plates:
        unknown = sorted(set(cfg.val_plates) - set(rows.plate_names))
        if unknown:
            raise IndexBuildError(
                f"data.val_plates: unknown plate(s) {', '.join(unknown)} "
                f"(column {PLATE!r} has {', '.join(rows.plate_names[:20])}"
                f"{' ...' if len(names) > 20 else ''})"
            )
        chosen = np.flatnonzero(np.isin(names, cfg.val_plates))
    else:
        candidates = np.unique(rows.plate_codes[rows.labels >= 0])
        if len(candidates) < 2:
            raise IndexBuildError(f"data.split=plate needs at least 2 plates in column {PLATE!r}")
        n_val = min(len(candidates) - 1, max(1, round(cfg.val_fraction * len(candidates))))
        rng = np.random.default_rng(cfg.seed)
        chosen = np.sort(rng.choice(candidates, size=n_val, replace=False))
    return np.isin(rows.plate_codes, chosen), {"val_plates": [str(p) for p in names[chosen]]}


def _split_image(rows: _Rows, cfg: DataConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """Val mask over rows: the study's image-level stratified split (leaky by design)."""
    used = np.flatnonzero(rows.labels >= 0)
    val = np.zeros(len(rows.labels), dtype=bool)
    val[used[_stratified_val(rows.labels[used], rows.n_classes, cfg, "images")]] = True
    return val, {}


_SPLITTERS = {"grouped": _split_grouped, "plate": _split_plate, "image": _split_image}


def _named_plates(rows: _Rows, plates: list[str], key: str) -> np.ndarray:
    unknown = sorted(set(plates) - set(rows.plate_names))
    if unknown:
        raise IndexBuildError(
            f"{key}: unknown plate(s) {', '.join(unknown)} (column {PLATE!r} has "
            f"{', '.join(rows.plate_names[:20])}{' ...' if len(rows.plate_names) > 20 else ''})"
        )
    return np.isin(np.asarray(rows.plate_names, dtype=object)[rows.plate_codes], plates)


def _unlabel(rows: _Rows, mask: np.ndarray) -> _Rows:
    return rows._replace(labels=np.where(mask, -1, rows.labels))


def _test_mask(rows: _Rows, cfg: DataConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """Rows of the test fold: named plates, or ``test_fraction`` of the units the split uses
    (wells, plates or images; never a named validation plate), drawn with its own seed."""
    if cfg.test_plates:
        return _named_plates(rows, cfg.test_plates, "data.test_plates"), {}
    if not cfg.test_fraction:
        return np.zeros(len(rows.labels), bool), {}
    if cfg.val_plates:
        rows = _unlabel(rows, _named_plates(rows, cfg.val_plates, "data.val_plates"))
    sub = cfg.model_copy(
        update={"val_fraction": cfg.test_fraction, "val_plates": [], "seed": cfg.seed + 7919}
    )
    try:
        mask, extra = _SPLITTERS[cfg.split](rows, sub)
    except IndexBuildError as e:  # the splitter speaks of validation; this is the test fold
        raise IndexBuildError(str(e).replace("data.val_fraction", "data.test_fraction")) from None
    return mask, {"test_plates": extra["val_plates"]} if "val_plates" in extra else {}


def _folds(rows: _Rows, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Train, validation and test rows: the test fold first, then validation from the rest."""
    test_mask, extra = _test_mask(rows, cfg)
    rest = _unlabel(rows, test_mask)
    share = 1.0 - (cfg.test_fraction if not cfg.test_plates else 0.0)
    sub = cfg.model_copy(update={"val_fraction": min(cfg.val_fraction / share, 0.9)})
    val_mask, val_extra = _SPLITTERS[cfg.split](rest, sub)
    used = rows.labels >= 0
    train = np.flatnonzero(used & ~val_mask & ~test_mask)
    val = np.flatnonzero(used & val_mask & ~test_mask)
    return train, val, np.flatnonzero(used & test_mask), {**val_extra, **extra}


def _oversample(rows: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
    """RandomOverSampler over row ids (a (n, 1) array), never over images.

    Every class is drawn up to the size of the largest. imbalanced-learn grows its bookkeeping
    array once per class (quadratic in the number of classes), so classes are resampled in
    blocks of ``_OVERSAMPLE_BLOCK`` against the global target; one RandomState threads through
    the blocks, so the result is fixed by ``seed``.
    """
    # Imported here: imbalanced-learn costs ~3 s to import, paid by every CLI start otherwise.
    from imblearn.over_sampling import RandomOverSampler

    y = labels[rows]
    counts = np.bincount(y)
    present = np.flatnonzero(counts)
    target = int(counts.max())
    state = np.random.RandomState(seed)
    # imbalanced-learn copies X and y a few times over; int32 halves that (the draws depend
    # only on the class sizes, so the order is the same). Back to int64 at the end.
    if len(labels) <= np.iinfo(np.int32).max:
        rows, y = rows.astype(np.int32), y.astype(np.int32)
    blocks = [present[i : i + _OVERSAMPLE_BLOCK] for i in range(0, len(present), _OVERSAMPLE_BLOCK)]
    if len(blocks) > 1 and len(blocks[-1]) < 2:  # imbalanced-learn needs 2 classes per call
        blocks[-2:] = [np.concatenate(blocks[-2:])]
    out = []
    for block in blocks:
        sel = np.isin(y, block)
        ros = RandomOverSampler(
            sampling_strategy={int(c): target for c in block}, random_state=state
        )
        resampled, _ = ros.fit_resample(rows[sel].reshape(-1, 1), y[sel])
        out.append(resampled[:, 0])
        del resampled
    order = np.empty(sum(map(len, out)), dtype=np.int64)
    return np.concatenate(out, out=order, casting="safe")


def _study_split(rows: _Rows, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """The original protocol: oversample every used row, then split the oversampled list."""
    resampled = _oversample(np.flatnonzero(rows.labels >= 0), rows.labels, cfg.seed)
    val_pos = _stratified_val(rows.labels[resampled], rows.n_classes, cfg, "images")
    return np.sort(resampled[~val_pos]), np.sort(resampled[val_pos])


# ------------------------------------------------------------------------------ build_index


def _check_folds(train: np.ndarray, val: np.ndarray, rows: _Rows, classes: list[str]) -> None:
    if len(train) == 0:
        raise IndexBuildError(f"data.split: the training fold is empty ({len(val)} rows in val)")
    if len(val) == 0:
        raise IndexBuildError(
            f"data.split: the validation fold is empty ({len(train)} in training)"
        )
    in_train = np.bincount(rows.labels[train], minlength=rows.n_classes)
    missing = [classes[i] for i in np.flatnonzero(in_train == 0)]
    if missing:
        raise IndexBuildError(
            f"data.split: {len(missing)} class(es) have no training images "
            f"({', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}); raise "
            "data.min_count, lower data.top_k, or choose other data.val_plates"
        )


def _layout_confound(rows: _Rows) -> tuple[int, str | None]:
    """Classes that occupy one well position on every plate (position == perturbation)."""
    used = rows.labels >= 0
    n_pos = int(rows.well_codes.max()) + 1
    pairs = _counts(_pairs(rows.labels, n_pos, rows.well_codes, used), rows.n_classes * n_pos)[0]
    positions = np.bincount(pairs // n_pos, minlength=rows.n_classes)
    fixed = int((positions == 1).sum())
    plates = len(np.unique(rows.plate_codes[used]))
    if plates < 2 or fixed < 0.5 * rows.n_classes:
        return fixed, None
    return fixed, (
        f"{fixed} of {rows.n_classes} classes sit in a single well position on all {plates} "
        "plates: position and perturbation are confounded, so no well or plate split can "
        "separate position effects (edge effects, plate-map artefacts) from the drug"
    )


def _balance(
    train: np.ndarray, labels: np.ndarray, n_classes: int, cfg: DataConfig
) -> tuple[np.ndarray, np.ndarray | None]:
    """Training order (oversampled or not) and class weights for the loss.

    Weights are computed on the training fold before oversampling; with ``both`` this
    corrects the imbalance twice, as the original study did.
    """
    if cfg.balance in ("oversample", "both") and not cfg.oversample_before_split:
        order = _oversample(train, labels, cfg.seed)
    else:
        order = train
    weights = None
    if cfg.balance in ("class_weight", "both"):
        weights = compute_class_weight(
            "balanced", classes=np.arange(n_classes), y=labels[train]
        ).astype(np.float32)
    return order, weights


def _per_class(rows_: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, int]:
    # A block at a time: the oversampled order is ~3 rows a cell (labels[order]: 1.6 GB at 75 M).
    counts = np.zeros(len(classes), dtype=np.int64)
    for block in _blocks(rows_, labels):
        counts += np.bincount(block, minlength=len(classes))
    return {c: int(n) for c, n in zip(classes, counts)}


def build_index(metadata: pd.DataFrame, cfg: DataConfig, *, warn: bool = True) -> Index:
    """Labels, folds, training order and class weights for ``metadata`` (row i == store row i).

    Warnings (a leaky split, classes without validation images...) are logged unless ``warn``
    is false, and kept in ``summary["warnings"]`` either way.
    """
    if cfg.label_column is None:
        # Metadata without a store (tests, benchmarks): every caller holding a store has set
        # the store's recorded column already (config.resolve_from_store).
        cfg = cfg.model_copy(update={"label_column": DEFAULT_LABEL_COLUMN})
    codes, names = _encode_raw(metadata, cfg.label_column)
    labels, classes, counts = _select_classes(codes, names, cfg)
    del codes  # a row's label is in ``labels`` now; not kept beside it
    rows = _rows(metadata, labels, len(classes))
    warns: list[str] = []
    if cfg.oversample_before_split:
        train, val = _study_split(rows, cfg)
        test, extra = np.zeros(0, np.int64), {}
        warns.append(STUDY_WARNING)
    else:
        train, val, test, extra = _folds(rows, cfg)
    if cfg.split == "image":
        warns.append(IMAGE_SPLIT_WARNING)
    _check_folds(train, val, rows, classes)
    train_order, weights = _balance(train, labels, len(classes), cfg)

    index = Index(
        classes=classes,
        labels=labels,
        train=train,
        val=val,
        test=test,
        train_order=train_order,
        class_weights=weights,
        summary={},
        well_ids=rows.well_ids,
        content_ids=content_ids(metadata),
    )
    fixed, confound = _layout_confound(rows)
    if confound:
        warns.append(confound)
    summary = _summary(index, rows, cfg, counts | extra | {"fixed_position_classes": fixed})
    summary["warnings"] = warns + summary["warnings"]
    for w in summary["warnings"] if warn else []:
        log.warning(w)
    return replace(index, summary=summary)


def _fold_warnings(index: Index, cfg: DataConfig, unvalidated: dict[str, list[str]]) -> list[str]:
    """What the folds cannot show: classes trained on only, a fraction far from the one asked."""
    unit = "wells" if cfg.split == "grouped" and cfg.group_by == "well" else "units"
    warns = []
    for fold, missing in unvalidated.items():
        if missing:
            warns.append(
                f"{len(missing)} class(es) have too few {unit} to appear in {fold} and are not "
                f"scored there: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}"
            )
    used = len(index.train) + len(index.val) + len(index.test)
    actual = len(index.val) / max(1, used)
    if not cfg.val_plates and abs(actual - cfg.val_fraction) > 0.1:
        warns.append(
            f"data.val_fraction={cfg.val_fraction} gave {actual:.2f} of the images in validation "
            f"(stratified folds of {unit}, or whole plates)"
        )
    growth = len(index.train_order) / max(1, len(index.train))
    if growth > 10:
        warns.append(
            f"oversampling makes each epoch {growth:.0f}x the training fold "
            f"({len(index.train_order)} images); consider data.balance=class_weight or data.top_k"
        )
    return warns


def _spread(rows: _Rows, classes: list[str]) -> dict[str, list[str]]:
    """Classes in a single well, or on a single plate, of the whole data: a grouped split can
    never validate them on a new well (or a plate hold-out on a new plate)."""
    used = rows.labels >= 0
    out = {}
    for name, unit in (
        ("classes_single_well", rows.well_ids),
        ("classes_single_plate", rows.plate_codes),
    ):
        size = int(unit.max()) + 1
        pairs = _counts(_pairs(rows.labels, size, unit, used), len(classes) * size)[0]
        n = np.bincount(pairs // size, minlength=len(classes))
        out[name] = [classes[i] for i in np.flatnonzero(n == 1)]
    return out


def _summary(index: Index, rows: _Rows, cfg: DataConfig, extra: dict[str, Any]) -> dict[str, Any]:
    """The JSON-able description written to ``data_summary.json`` and shown in the report."""
    labels, classes = index.labels, index.classes
    counts = {f: _per_class(getattr(index, f), labels, classes) for f in ("train", "val", "test")}
    missing = {f: [c for c in classes if counts[f][c] == 0] for f in ("val", "test")}
    if not len(index.test):
        missing.pop("test")
    used = max(1, len(index.train) + len(index.val) + len(index.test))
    return {
        "label_column": cfg.label_column,
        "images": len(labels),
        "images_used": int((labels >= 0).sum()),
        "plates": len(rows.plate_names),
        "wells": int(rows.well_ids.max()) + 1 if len(rows.well_ids) else 0,
        "classes": len(classes),
        "split": cfg.split,
        "group_by": {"grouped": cfg.group_by, "plate": "plate"}.get(cfg.split),
        "balance": cfg.balance,
        "oversample_before_split": cfg.oversample_before_split,
        "val_fraction": cfg.val_fraction,
        "val_fraction_actual": round(len(index.val) / used, 4),
        "test_fraction": cfg.test_fraction,
        "test_fraction_actual": round(len(index.test) / used, 4),
        "seed": cfg.seed,
        "top_k": cfg.top_k,
        "min_count": cfg.min_count,
        "train_images": len(index.train),
        "val_images": len(index.val),
        "test_images": len(index.test),
        "train_order_images": len(index.train_order),
        **extra,
        **{f"{f}_counts": counts[f] for f in ("train", "val", "test")},
        "train_counts_balanced": _per_class(index.train_order, labels, classes),
        "classes_without_val": missing["val"],
        "classes_without_test": missing.get("test", []),
        **_spread(rows, classes),
        "class_weights": None if index.class_weights is None else index.class_weights.tolist(),
        "val_wells_in_train": shared_wells(index),
        "test_wells_in_train_or_val": shared_wells(index, "test"),
        "val_copies_in_train": count_val_copies_in_train(index),
        "leaky": cfg.split == "image" or cfg.oversample_before_split,
        "warnings": _fold_warnings(index, cfg, missing),
    }


# ---------------------------------------------------------------------------- leakage audit


def _blocks(rows: np.ndarray, ids: np.ndarray | None) -> Iterator[np.ndarray]:
    """``ids[rows]`` (or ``rows``) a block at a time: never a gathered copy of a whole fold."""
    for b in range(0, len(rows), _ROW_BLOCK):
        yield rows[b : b + _ROW_BLOCK] if ids is None else ids[rows[b : b + _ROW_BLOCK]]


def _flags(ids: np.ndarray | None, folds: Sequence[np.ndarray], size: int) -> np.ndarray:
    """A flag per id in ``[0, size)``: held by a row of ``folds``."""
    flags = np.zeros(size, dtype=bool)
    for fold in folds:
        for block in _blocks(fold, ids):
            flags[block] = True
    return flags


def count_val_copies_in_train(index: Index) -> int:
    """Validation entries whose store row, or identical image checksum, is also in training."""
    ids = index.content_ids
    size = len(index.labels) if ids is None else int(ids.max(initial=-1)) + 1
    in_train = _flags(ids, [index.train], size)
    return sum(int(np.count_nonzero(in_train[block])) for block in _blocks(index.val, ids))


def shared_wells(index: Index, fold: str = "val") -> int:
    """Wells (plate + well) with images in ``fold`` and in the folds before it (train; train
    and val for the test fold): near-duplicate sites across the split."""
    if index.well_ids is None:
        raise CellmorphError("shared_wells: this index carries no well ids")
    before = [index.train] if fold == "val" else [index.train, index.val]
    rows = index.val if fold == "val" else index.test
    size = int(index.well_ids.max(initial=-1)) + 1
    both = _flags(index.well_ids, before, size) & _flags(index.well_ids, [rows], size)
    return int(np.count_nonzero(both))


# --------------------------------------------------------------------------- label encoding


def encode_labels(metadata: pd.DataFrame, label_column: str, classes: Sequence[str]) -> np.ndarray:
    """Class ids of ``metadata`` rows under a saved encoding; -1 for unknown or missing labels."""
    codes, names = _encode_raw(metadata, label_column)
    lookup = {c: i for i, c in enumerate(classes)}
    mapping = np.array([lookup.get(str(n), -1) for n in names] + [-1], dtype=np.int64)
    return mapping[codes]


def check_batch_size(batch_size: int, index: Index) -> None:
    """A batch larger than the training fold would make every epoch mostly padding."""
    if batch_size > len(index.train_order):
        raise CellmorphError(
            f"loader.batch_size={batch_size} is larger than the training fold "
            f"({len(index.train_order)} images)"
        )
