"""Honest splits over store rows: wells with their majority label, the grouped, plate and image
splits, the test fold, and row-id oversampling (with the study's oversample-then-split)."""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from cellmorph.config import DataConfig
from cellmorph.labels import IndexBuildError
from cellmorph.store.layout import PLATE, WELL, well_codes_from

_OVERSAMPLE_BLOCK = 16


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
