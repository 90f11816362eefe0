"""Honest splits over store rows: wells with their majority label, the grouped, plate and image
splits, the test fold, and row-id oversampling (with the study's oversample-then-split)."""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from cellmorph.codes import factorize, where
from cellmorph.config import DataConfig
from cellmorph.labels import IndexBuildError
from cellmorph.store.layout import PLATE, WELL, well_codes_from

_ROW_BLOCK = 1 << 20  # rows at a time where a whole column's temporary is not needed
_DRAW_BLOCK = 1 << 21  # oversampling draws counted at a time (16 MB of int64)


class _Rows(NamedTuple):
    """Row-level arrays the splitters share."""

    labels: np.ndarray
    well_ids: np.ndarray
    plate_codes: np.ndarray
    plate_names: list[str]
    well_codes: np.ndarray
    n_classes: int


# ----------------------------------------------------------------------------------- wells


def _factorize_required(metadata: pd.DataFrame, column: str) -> tuple[np.ndarray, list[str]]:
    if column not in metadata.columns:
        raise IndexBuildError(f"metadata: required column {column!r} is missing")
    # The narrowest codes (int16 for plates and well positions): they only index the names.
    codes, uniques = factorize(metadata[column], sort=True)
    missing = int(np.count_nonzero(codes < 0))
    if missing:
        raise IndexBuildError(f"metadata: {missing} row(s) have no value in column {column!r}")
    return codes, [str(u) for u in uniques]


def _rows(metadata: pd.DataFrame, labels: np.ndarray, n_classes: int) -> _Rows:
    plate_codes, plate_names = _factorize_required(metadata, PLATE)
    positions, well_names = _factorize_required(metadata, WELL)
    # The one well id evaluation and outputs use too (layout.well_codes), from these codes.
    ids = well_codes_from(plate_codes, np.asarray(plate_names, object),
                   positions, np.asarray(well_names, object))[0]  # fmt: skip
    return _Rows(labels, ids, plate_codes, plate_names, positions, n_classes)


def _pair_counts(
    a: np.ndarray, n_b: int, b: np.ndarray, used: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The pairs ``a * n_b + b`` over the used rows, and their counts
    (``np.unique(..., return_counts=True)``).

    Counted a block of rows at a time when there are at most as many possible pairs as rows
    (a bincount, int32 keys: no temporary a row); otherwise the keys are sorted, all at once.
    """
    size = (int(a.max(initial=0)) + 1) * max(n_b, 1)
    dtype = np.int32 if size <= np.iinfo(np.int32).max else np.int64
    if size > len(a):
        key = a[used].astype(dtype)
        key *= n_b
        key += b[used]
        return np.unique(key, return_counts=True)
    counts = np.zeros(size, dtype=np.int64)
    for s in range(0, len(a), _ROW_BLOCK):
        part = used[s : s + _ROW_BLOCK]
        key = a[s : s + _ROW_BLOCK][part].astype(dtype)
        key *= n_b
        key += b[s : s + _ROW_BLOCK][part]
        counts += np.bincount(key, minlength=size)
    pairs = np.flatnonzero(counts)
    return pairs, counts[pairs]


def _wells_with_majority_label(rows: _Rows) -> tuple[np.ndarray, np.ndarray, int]:
    """One unit per well that has used rows: (well id, majority label, wells with >1 label)."""
    used = rows.labels >= 0
    k = rows.n_classes
    pairs, counts = _pair_counts(rows.well_ids, k, rows.labels, used)
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
    used = where(rows.labels >= 0)
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
    codes = [i for i, name in enumerate(rows.plate_names) if name in set(plates)]
    return np.isin(rows.plate_codes, codes)


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
    used &= ~test_mask
    test = where(rows.labels >= 0, test_mask)
    train, val = where(used, ~val_mask), where(used, val_mask)
    return train, val, test, {**val_extra, **extra}


def _repeats(rows: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
    """How many times each of ``rows`` is in the oversampled order: every class up to the
    largest, as imbalanced-learn's ``RandomOverSampler`` draws it, counted instead of listed.

    The per-class targets are imbalanced-learn's (``check_sampling_strategy``, "not majority");
    the draws are RandomOverSampler's own: one ``RandomState(seed)``, a ``choice`` of each
    class's rows in class order, which is ``randint(0, class size)``, drawn here a block at a
    time (the same stream). RandomOverSampler lists every drawn row as int64 and copies the list
    as it grows (~40 bytes a drawn row; 200 M drawn rows at the pilot's 75 M cells); the counts
    are one byte a training row. tests/test_index.py checks them against RandomOverSampler.
    """
    # Imported here: imbalanced-learn costs ~3 s to import, paid by every CLI start otherwise.
    from imblearn.utils import check_sampling_strategy

    y = labels[rows]
    state = np.random.RandomState(seed)
    counts = np.ones(len(rows), dtype=np.uint32)
    for cls, n_draws in check_sampling_strategy("not majority", y, "over-sampling").items():
        members = where(y == cls)
        for b in range(0, n_draws, _DRAW_BLOCK):
            size = min(_DRAW_BLOCK, n_draws - b)
            drawn = np.bincount(state.randint(0, len(members), size=size), minlength=len(members))
            counts[members] += drawn.astype(np.uint32)
    return counts.astype(np.min_scalar_type(int(counts.max(initial=1))))


def _study_split(rows: _Rows, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """The original protocol: oversample every used row, then split the oversampled list."""
    used = where(rows.labels >= 0)
    resampled = np.repeat(used, _repeats(used, rows.labels, cfg.seed))
    val_pos = _stratified_val(rows.labels[resampled], rows.n_classes, cfg, "images")
    return np.sort(resampled[~val_pos]), np.sort(resampled[val_pos])
