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
- Oversampling (imbalanced-learn's ``RandomOverSampler`` draws, counted per row) touches the
  training fold only, unless ``oversample_before_split`` asks for the study's flawed protocol.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
from sklearn.utils.class_weight import compute_class_weight

from cellmorph.codes import bincount, repeat
from cellmorph.config import DEFAULT_LABEL_COLUMN, DataConfig
from cellmorph.content_ids import content_ids
from cellmorph.errors import CellmorphError
from cellmorph.labels import IndexBuildError, _encode_raw, _select_classes
from cellmorph.sampling import contiguous_runs, epoch_indices, epoch_permutation, epoch_size
from cellmorph.splits import _folds, _pair_counts, _repeats, _Rows, _rows, _study_split

__all__ = [
    "Index",
    "build_index",
    "check_batch_size",
    "contiguous_runs",
    "count_val_copies_in_train",
    "epoch_indices",
    "epoch_permutation",
    "shared_wells",
]

log = logging.getLogger(__name__)

_ROW_BLOCK = 1 << 20  # rows gathered at a time where a whole fold's copy is not needed
IMAGE_SPLIT_WARNING = (
    "split=image: sites of one well are near-duplicates and land on both sides, so validation "
    "accuracy is inflated; use it only to compare with the original study"
)
STUDY_WARNING = (
    "oversample_before_split: rows were oversampled before the split, so copies of the same "
    "image sit in training and validation (the original study's flaw); for the leakage audit only"
)


@dataclass(frozen=True, eq=False)
class Index:
    """Row-level labels and folds for one run.

    ``train``/``val``/``test`` are sorted store rows, unique except under
    ``oversample_before_split`` (the study protocol), where train and val are the two halves of
    an oversampled list and repeat. ``val`` picks epochs and sweep trials; ``test`` is scored
    once, at the end, by the chosen model.

    Row arrays are int32 (int64 past 2**31 rows) and labels the narrowest signed integer
    (int8 up to 127 classes): at the pilot's 75 M cells every byte a row is 75 MB per process.
    """

    classes: list[str]  # class id -> name, sorted by name
    labels: np.ndarray  # per store row; -1 = not used (no label or dropped class)
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    # Copies of each ``train`` row in an epoch after balancing (None: once each).
    train_repeats: np.ndarray | None
    class_weights: np.ndarray | None
    summary: dict[str, Any]
    well_ids: np.ndarray | None = None  # per store row: one id per (plate, well)
    content_ids: np.ndarray | None = None  # per store row: equal ids = identical checksum

    @property
    def train_order(self) -> np.ndarray:
        """Training rows after balancing, each ``train_repeats`` times: what each epoch
        permutes. Built on each call (4 bytes an entry); :attr:`epoch_size` is its length."""
        if self.train_repeats is None:
            return self.train
        return repeat(self.train, self.train_repeats)

    @property
    def epoch_size(self) -> int:
        """Entries of :attr:`train_order`, without building it."""
        return epoch_size(self.train, self.train_repeats)


# ------------------------------------------------------------------------------ build_index


def _check_folds(train: np.ndarray, val: np.ndarray, rows: _Rows, classes: list[str]) -> None:
    if len(train) == 0:
        raise IndexBuildError(f"data.split: the training fold is empty ({len(val)} rows in val)")
    if len(val) == 0:
        raise IndexBuildError(
            f"data.split: the validation fold is empty ({len(train)} in training)"
        )
    in_train = bincount(rows.labels[train], minlength=rows.n_classes)
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
    pairs = _pair_counts(rows.labels, n_pos, rows.well_codes, used)[0]
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
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Copies per training row (None: no oversampling) and class weights for the loss.

    Weights are computed on the training fold before oversampling; with ``both`` this
    corrects the imbalance twice, as the original study did.
    """
    repeats = None
    if cfg.balance in ("oversample", "both") and not cfg.oversample_before_split:
        repeats = _repeats(train, labels, cfg.seed)
    weights = None
    if cfg.balance in ("class_weight", "both"):
        weights = compute_class_weight(
            "balanced", classes=np.arange(n_classes), y=labels[train]
        ).astype(np.float32)
    return repeats, weights


def _per_class(
    rows_: np.ndarray, labels: np.ndarray, classes: list[str], repeats: np.ndarray | None = None
) -> dict[str, int]:
    """Rows of ``rows_`` per class (each counted ``repeats`` times), a block at a time."""
    counts = np.zeros(len(classes), dtype=np.int64)
    for b in range(0, len(rows_), _ROW_BLOCK):
        weights = None if repeats is None else repeats[b : b + _ROW_BLOCK]
        block = labels[rows_[b : b + _ROW_BLOCK]]
        counts += np.bincount(block, weights, minlength=len(classes)).astype(np.int64)
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
    # Content ids first: their 8-byte keys are the largest temporary, best made while nothing
    # else is held.
    ids = content_ids(metadata)
    codes, names = _encode_raw(metadata, cfg.label_column)
    labels, classes, counts = _select_classes(codes, names, cfg)
    del codes  # a row's label is in ``labels`` now; not kept beside it
    rows = _rows(metadata, labels, len(classes))
    warns: list[str] = []
    if cfg.oversample_before_split:
        train, val = _study_split(rows, cfg)
        test, extra = train[:0], {}
        warns.append(STUDY_WARNING)
    else:
        train, val, test, extra = _folds(rows, cfg)
    if cfg.split == "image":
        warns.append(IMAGE_SPLIT_WARNING)
    _check_folds(train, val, rows, classes)
    repeats, weights = _balance(train, labels, len(classes), cfg)

    index = Index(
        classes=classes,
        labels=labels,
        train=train,
        val=val,
        test=test,
        train_repeats=repeats,
        class_weights=weights,
        summary={},
        well_ids=rows.well_ids,
        content_ids=ids,
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
    growth = index.epoch_size / max(1, len(index.train))
    if growth > 10:
        warns.append(
            f"oversampling makes each epoch {growth:.0f}x the training fold "
            f"({index.epoch_size} images); consider data.balance=class_weight or data.top_k"
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
        pairs = _pair_counts(rows.labels, size, unit, used)[0]
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
        "train_order_images": index.epoch_size,
        **extra,
        **{f"{f}_counts": counts[f] for f in ("train", "val", "test")},
        "train_counts_balanced": _per_class(index.train, labels, classes, index.train_repeats),
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


def check_batch_size(batch_size: int, index: Index) -> None:
    """A batch larger than the training fold would make every epoch mostly padding."""
    if batch_size > index.epoch_size:
        raise CellmorphError(
            f"loader.batch_size={batch_size} is larger than the training fold "
            f"({index.epoch_size} images)"
        )
