"""Label encoding: a label column to class ids sorted by name, and the classes an index keeps;
``encode_labels`` applies a saved encoding to new metadata."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from cellmorph.codes import bincount, factorize, narrowest_signed
from cellmorph.config import DataConfig
from cellmorph.errors import CellmorphError

__all__ = ["IndexBuildError", "encode_labels"]

log = logging.getLogger(__name__)


class IndexBuildError(CellmorphError):
    """Metadata or data settings that cannot produce an index; the message names the key."""


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
    codes, uniques = factorize(metadata[column], sort=False)
    names = np.asarray([str(u).strip() for u in uniques], dtype=object)
    counts = bincount(codes[codes >= 0], minlength=len(names))
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
    blank = len(sorted_names) > 0 and sorted_names[0] == ""
    if blank:  # blank (0) and missing (-1) are both -1; the others move down by one
        remap = np.where(remap == 0, -1, remap - 1)
        sorted_names = sorted_names[1:]
    # code -1 (missing) maps to -1; the narrowest codes: they only index the names
    codes = np.append(remap, -1).astype(narrowest_signed(len(sorted_names)))[codes]
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
    counts = bincount(codes[codes >= 0], minlength=len(names))
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
    # The narrowest labels (int8 up to 127 classes): one per store row, 75 M at the pilot.
    mapping = np.full(len(names) + 1, -1, dtype=narrowest_signed(len(keep)))  # last: code -1
    mapping[keep] = np.arange(len(keep))
    info = {
        "counts_before_topk": {str(names[i]): int(counts[i]) for i in by_freq if counts[i]},
        "counts_after_topk": {str(names[i]): int(counts[i]) for i in by_freq if mapping[i] >= 0},
    }
    return mapping[codes], [str(n) for n in names[keep]], info


def encode_labels(metadata: pd.DataFrame, label_column: str, classes: Sequence[str]) -> np.ndarray:
    """Class ids of ``metadata`` rows under a saved encoding; -1 for unknown or missing labels."""
    codes, names = _encode_raw(metadata, label_column)
    lookup = {c: i for i, c in enumerate(classes)}
    mapping = np.array([lookup.get(str(n), -1) for n in names] + [-1], dtype=np.int64)
    return mapping[codes]
