"""The checks both input layouts share: site keys, labels (case merging, control characters),
duplicate sites, and files named by two channels or two sites; failures become quarantine rows."""

from __future__ import annotations

import itertools
import os
import re
import sys

import numpy as np
import pandas as pd

from cellmorph.config import ConvertConfig
from cellmorph.errors import CellmorphError
from cellmorph.store.layout import SITE
from conversion.tables import DIR, FILE, KEYS, Inputs, drop_rows

_WHOLE = re.compile(r"\d+(\.0*)?")


def _key_problems(plate: pd.Series, well: pd.Series, site: pd.Series) -> pd.Series:
    """Per row, what is wrong with its keys ("" when nothing), vectorized: millions of rows."""
    whole = site.str.fullmatch(_WHOLE.pattern).fillna(False).to_numpy(dtype=bool)
    reasons = np.select(
        [(plate == "").to_numpy(), (well == "").to_numpy(), (site == "").to_numpy(), ~whole],
        ["empty Metadata_Plate", "empty Metadata_Well", "empty Metadata_Site", "site"],
        "",
    ).astype(object)
    for i in np.flatnonzero(reasons == "site"):  # the value in the message: a few rows
        reasons[i] = f"Metadata_Site {site.iloc[i]!r} is not a whole number"
    return pd.Series(reasons, index=plate.index, dtype=object)


def _check_keys(inputs: Inputs) -> None:
    """Plate and well are non-empty text; the site is a whole number (``2`` or ``2.0``)."""
    sites = inputs.sites
    for col in KEYS:
        sites[col] = sites[col].astype(str).str.strip() if len(sites) else sites[col].astype(str)
    reasons = _key_problems(*(sites[c] for c in KEYS))
    drop_rows(inputs, reasons != "", reasons)
    site = inputs.sites[SITE]
    inputs.sites[SITE] = site.str.partition(".")[0].astype("int64") if len(site) else site


def _check_labels(inputs: Inputs, cfg: ConvertConfig) -> None:
    """Labels are trimmed text; any text (``NA``, ``None``, ``#N/A``) is a label. Quarantined:
    an empty label (unless ``allow_unlabeled``) and one holding a control character (a NUL, a
    line break inside a quoted cell: damage, not a class). Spellings that differ only by case
    are merged into the most frequent one, with a warning (one class, not three)."""
    sites, col = inputs.sites, cfg.label_column
    if len(sites) == 0:  # nothing left to label: the stop names why
        return
    if col not in sites.columns:
        if cfg.allow_unlabeled:
            return
        raise CellmorphError(
            f"label column {col} not found in the metadata (set convert.label_column, "
            "or --allow-unlabeled to convert images for prediction)"
        )
    # Per distinct label, not per row: millions of sites share a few thousand labels.
    codes, uniques = pd.factorize(sites[col])
    values = np.array([str(u).strip() for u in uniques], dtype=object)
    control = np.array([bool(_CONTROL.search(v)) for v in values] + [False])
    blank = np.array([v == "" for v in values] + [True])  # the last one: NaN (code -1)
    counts = np.bincount(codes[codes >= 0], minlength=len(values))
    spelled, merges = merge_case(values, counts, skip=control[:-1] | blank[:-1])
    blank &= not cfg.allow_unlabeled  # stores for prediction keep their unlabeled sites
    cats, inverse = np.unique(spelled.astype(str), return_inverse=True)
    new = pd.Categorical.from_codes(np.where(codes >= 0, inverse[codes], -1), cats)
    sites[col] = new if isinstance(sites[col].dtype, pd.CategoricalDtype) else new.astype(object)
    if merges:
        inputs.description["label_case_merged"] = merges
        print(f"warning: labels of {col} that differ only by case were merged into the most "
              f"frequent spelling (sites): {'; '.join(merges)}", file=sys.stderr)  # fmt: skip
    reasons = np.full(len(sites), "", dtype=object)
    reasons[blank[codes]] = f"no label in column {col}"
    for i in np.flatnonzero(control[codes]):  # a few rows: their value in the message
        reasons[i] = f"label {values[codes[i]]!r} in column {col} holds a control character"
    bad = pd.Series(reasons != "", index=sites.index)
    drop_rows(inputs, bad, pd.Series(reasons, index=sites.index))


# C0 and C1 control characters; surrounding whitespace (tabs, line breaks) is trimmed first.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def merge_case(
    values: np.ndarray, counts: np.ndarray, skip: np.ndarray
) -> tuple[np.ndarray, list[str]]:
    """Per distinct label, its spelling once labels that differ only by case are one: the most
    frequent spelling (ties: the first in sorted order). Also one line per merge, with counts."""
    groups: dict[str, list[int]] = {}
    for i, v in enumerate(values):
        if not skip[i]:
            groups.setdefault(str(v).casefold(), []).append(i)
    out, lines = values.copy(), []
    for members in groups.values():
        spellings: dict[str, int] = {}  # trimmed values may coincide ("DMSO" and "DMSO ")
        for i in members:
            spellings[values[i]] = spellings.get(values[i], 0) + int(counts[i])
        if len(spellings) < 2:
            continue
        keep = min(spellings, key=lambda v: (-spellings[v], v))
        out[members] = keep
        others = ", ".join(f"{v!r} ({n})" for v, n in sorted(spellings.items()) if v != keep)
        lines.append(f"{others} -> {keep!r} ({spellings[keep]})")
    return out, lines


def _check_duplicates(inputs: Inputs) -> None:
    """Every copy of a duplicated (plate, well, site) is quarantined: none can be trusted."""
    dup = inputs.sites.duplicated(KEYS, keep=False)
    drop_rows(inputs, dup, pd.Series("duplicate (plate, well, site)", index=inputs.sites.index))


def _check_shared_files(inputs: Inputs, channels: list[str], per_channel: bool) -> None:
    """Quarantine a site whose file is named by two of its channels (``per_channel``: one
    channel's image would be stored as another's), and every site whose file another site also
    names (exact copies under two keys: they would sit on both sides of a split). Paths are
    compared after resolving ``.`` and ``..``; copies under other names are left to the index's
    content check."""
    sites = inputs.sites
    if len(sites) == 0:
        return
    keys = _file_keys(sites, channels)
    reasons = np.full(len(sites), "", dtype=object)
    for i, j in itertools.combinations(range(len(channels)) if per_channel else (), 2):
        for r in np.flatnonzero((keys[:, i] == keys[:, j]) & (keys[:, i] >= 0)):
            files = _site_files(sites, channels, r)
            if files[i] == files[j] and _a_file(files[i]):  # the hashes agree: the paths?
                reasons[r] = reasons[r] or (
                    f"one file for two channels: {channels[i]} and {channels[j]} are both "
                    f"{files[i]}"
                )
    keys.sort(axis=1)  # in place (N x C int64); a file named twice by one site counts once
    keys[:, 1:][keys[:, 1:] == keys[:, :-1]] = -1
    flat = np.sort(keys, axis=None)
    twice = np.unique(flat[1:][(flat[1:] == flat[:-1]) & (flat[1:] >= 0)])
    del flat
    candidates = np.flatnonzero(np.isin(keys, twice).any(axis=1))
    users: dict[str, list[int]] = {}  # path -> the sites naming it (the few candidates)
    for r in candidates:
        for path in set(_site_files(sites, channels, int(r))) - {""}:
            users.setdefault(path, []).append(int(r))
    for path, named_by in users.items():
        for r in named_by if len(named_by) > 1 and _a_file(path) else []:
            other = next(o for o in named_by if o != r)
            key = "/".join(str(sites[c].iloc[other]) for c in KEYS)
            reasons[r] = reasons[r] or f"same file as site {key}: {path}"
    bad = pd.Series(reasons != "", index=sites.index)
    drop_rows(inputs, bad, pd.Series(reasons, index=sites.index))


def _file_keys(sites: pd.DataFrame, channels: list[str]) -> np.ndarray:
    """(sites, channels) int64: a 63-bit hash of each file's path, folders with ``.`` and
    ``..`` resolved; -1 where a site names no file. Hashes, not paths (millions of sites): the
    sites they flag are confirmed on their paths."""
    folders = [sites[DIR + ch].astype("category") for ch in channels]
    norm = {
        str(d): os.path.normpath(str(d)) if d else "" for f in folders for d in f.cat.categories
    }
    folder_id = {d: i for i, d in enumerate(sorted(set(norm.values())))}
    keys = np.empty((len(sites), len(channels)), dtype=np.int64)
    for c, folder in enumerate(folders):
        ids = np.array([folder_id[norm[str(d)]] for d in folder.cat.categories] + [0], np.uint64)
        names = sites[FILE + channels[c]].fillna("").astype("str")
        h = pd.util.hash_pandas_object(names, index=False).to_numpy(np.uint64)
        h = h ^ (ids[folder.cat.codes.to_numpy()] + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        keys[:, c] = np.where((names == "").to_numpy(), -1, (h >> np.uint64(1)).astype(np.int64))
    return keys


def _a_file(path: str) -> bool:
    """Not an empty name, nor a folder (an empty FileName cell names its folder): the probe
    says what is wrong with those ("is not a regular file")."""
    return bool(path) and not os.path.isdir(path)


def _site_files(sites: pd.DataFrame, channels: list[str], row: int) -> list[str]:
    """One site's files, ``.`` and ``..`` resolved, in channel order ("" for no file name)."""
    names = [sites[FILE + ch].iloc[row] for ch in channels]
    names = [n if isinstance(n, str) else "" for n in names]  # a missing cell: no file
    return [
        os.path.normpath(str(sites[DIR + ch].iloc[row]) + str(name)) if name else ""
        for ch, name in zip(channels, names)
    ]
