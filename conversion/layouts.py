"""Input layouts: turn a LoadData CSV, or a folder of TIFFs plus a metadata CSV, into sites.

Both layouts produce the same :class:`Inputs`: one row per site with ``Metadata_Plate``,
``Metadata_Well``, ``Metadata_Site``, the metadata/label columns, and each requested channel's
file as internal folder and name columns (:func:`conversion.tables.set_sources`), with the page
of the file that holds each channel in ``Inputs.pages``. Labels may then be joined from JUMP
plate maps (:mod:`conversion.platemaps`). Structural problems (a missing column, an unknown channel, an
empty input, impossible settings) raise :class:`CellmorphError`; per-site problems (bad keys, no
label, duplicates, unmatched files) become quarantine rows.
"""

from __future__ import annotations

import itertools
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cellmorph.config import ConvertConfig
from cellmorph.errors import CellmorphError
from cellmorph.store.layout import PLATE, SITE, WELL
from conversion.platemaps import annotate
from conversion.tables import (
    DIR,
    FILE,
    KEYS,
    Inputs,
    compact_text,
    drop_rows,
    quarantine_row,
    read_csv,
    require_columns,
    set_sources,
    split_paths,
)

TIFF_SUFFIXES = {".tif", ".tiff"}


# Quarantine reasons grouped for summaries: (pattern, what went wrong, the option that fixes it).
# Reasons name files and values; the kind drops them so 359 sites with one mistake count as one.
_KINDS: list[tuple[str, str, str]] = [
    (r"has (\d+) channel\(s\), \S+ is channel", "file holds {0} channel(s), fewer than the names given",
     "--channels (or --file-channels, in file order) must name only the channels each file holds"),
    (r"expected one channel for \S+, found (\d+)", "file holds {0} channels where one was expected", ""),
    (r"no file for this id", "metadata row without an image file",
     "--id-pattern/--id-column must find the same id in file names and in the id column"),
    (r"no metadata row for id", "image file without a metadata row",
     "--id-pattern/--id-column must find the same id in file names and in the id column"),
    (r"does not match id_pattern", "file name without an id", "--id-pattern"),
    (r"several files share the id", "several files share one id", "--id-pattern (capture the whole site id)"),
    (r"several metadata rows share this id", "several metadata rows share one id", "--id-column"),
    (r"^missing file", "missing TIFF", "--path-replace OLD=NEW if the CSV holds another machine's paths"),
    (r"^truncated TIFF", "truncated TIFF", ""),
    (r"^unreadable TIFF", "unreadable TIFF", ""),
    (r"^cannot decode", "pixels fail to decode", ""),
    (r"^unsupported dtype (\S+)", "unsupported pixel type {0}", ""),
    (r"unsupported image shape", "unsupported image shape", ""),
    (r"^channels differ in shape or dtype", "channels of a site differ in shape or pixel type", ""),
    (r"smaller than --size (\d+)", "image smaller than --size {0}", "a smaller --size"),
    (r"^image too large: .* above the limit --max-pixels ([\d,]+)",
     "image larger than --max-pixels {0}", "--max-pixels, if the machine has the memory"),
    (r"^(\w+) TIFFs among (\w+) sites", "{0} TIFFs among {1} sites", ""),
    (r"illumination function", "image shape differs from its illumination function", "--illum-dir"),
    (r"^no label in column (\S+)", "no label in column {0}", "--label-column, or --allow-unlabeled"),
    (r"^duplicate \(plate, well, site\)", "duplicate (plate, well, site)", ""),
    (r"^empty (Metadata_\w+)", "empty {0}", ""),
    (r"^Metadata_Site .* is not a whole number", "Metadata_Site is not a whole number", ""),
    (r"^several rows in .* for keys", "several rows in the --join table for one key", "--join-on"),
    (r"is not in barcode_platemap", "plate not in the barcode plate map", "--barcode-platemap"),
    (r"is not in plate map", "well not in its plate map", ""),
    (r"in none of the external metadata tables", "broad_sample in no external metadata table",
     "--external-metadata (repeat it: compound, CRISPR and ORF tables)"),
    (r"empty broad_sample and no solvent", "plate-map well without broad_sample or solvent", ""),
    (r"has several different rows", "broad_sample with several different metadata rows", ""),
    (r"^one file for two channels", "one file named by two channels of a site",
     "each channel's FileName_Orig<Ch>/PathName_Orig<Ch> must name its own file"),
    (r"^same file as site", "a file named by two sites (copies under two keys)", ""),
    (r"holds a control character", "label with a control character", ""),
]  # fmt: skip
_KIND_PATTERNS = [(re.compile(p), kind, fix) for p, kind, fix in _KINDS]


def reason_kind(reason: str) -> tuple[str, str]:
    """(what went wrong, the option that fixes it or "") for one quarantine reason."""
    for pattern, kind, fix in _KIND_PATTERNS:
        m = pattern.search(reason)
        if m:
            return kind.format(*m.groups()), fix
    return re.sub(r"\S*/\S*", "<file>", reason), ""


def summarize_reasons(reasons: Iterable[str], top: int = 5) -> list[dict[str, Any]]:
    """The ``top`` most frequent kinds of quarantine reason: reason, count, fix."""
    counts: dict[tuple[str, str], int] = {}
    for r in reasons:
        k = reason_kind(str(r))
        counts[k] = counts.get(k, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0][0]))[:top]
    return [{"reason": k, "count": n, "fix": fix} for (k, fix), n in ranked]


def no_valid_sites(quarantine: list[dict[str, Any]], where: str | None) -> CellmorphError:
    """The one-line stop when every input was quarantined: the reasons, counts and fixes."""
    kinds = summarize_reasons(q["reason"] for q in quarantine)
    n = len(quarantine)
    if len(kinds) == 1:
        head = f"all {n} inputs were quarantined for the same reason: {kinds[0]['reason']}"
    else:
        parts = "; ".join(f"{k['reason']} ({k['count']})" for k in kinds[:3])
        head = f"all {n} inputs were quarantined: {parts}"
    fixes = "; ".join(dict.fromkeys(k["fix"] for k in kinds[:3] if k["fix"]))
    detail = f" (reasons per input in {where})" if where else ""
    return CellmorphError(f"no valid sites: {head}" + (f"; fix: {fixes}" if fixes else "") + detail)


def _rewrite(path: str, replacements: list[str]) -> str:
    for item in replacements:
        old, sep, new = item.partition("=")
        if not sep:
            raise CellmorphError(f"path_replace entry {item!r} is not of the form OLD=NEW")
        if path.startswith(old):
            return new + path[len(old) :]
    return path


def _loaddata_paths(df: pd.DataFrame, cfg: ConvertConfig, base: Path) -> dict[str, tuple]:
    """Each channel's file per row, as ``PathName_Orig<Ch>/FileName_Orig<Ch>`` (relative to the
    CSV's folder, after ``path_replace``)."""
    available = sorted(
        c[len("FileName_Orig") :] for c in df.columns if c.startswith("FileName_Orig")
    )
    for ch in cfg.channels:
        if f"FileName_Orig{ch}" not in df.columns:
            raise CellmorphError(
                f"unknown channel {ch!r}: LoadData CSV has no column FileName_Orig{ch} "
                f"(channels present: {', '.join(available) or 'none'})"
            )
        require_columns(df, [f"PathName_Orig{ch}"], "LoadData CSV")

    paths = {}
    for ch in cfg.channels:
        folders = df[f"PathName_Orig{ch}"]
        names = df[f"FileName_Orig{ch}"].astype("str")
        # A few folders per plate: resolve each once; a plain file name then only follows it.
        prefix = {f: _folder_prefix(str(f), cfg, base) for f in folders.unique()}
        dirs = folders.astype(object).map(prefix).to_numpy(dtype=object)
        files = names.to_numpy(dtype=object)
        odd = (names.str.contains("/", regex=False) | names.isin(["", ".", ".."])).to_numpy()
        if odd.any():  # Path semantics for names that hold folders (or none)
            full = [_site_path(str(f), n, cfg, base) for f, n in zip(folders[odd], names[odd])]
            dirs[odd], files[odd] = split_paths(pd.Series(full, dtype="str"))
        paths[ch] = (dirs, files)
    return paths


def _site_path(folder: str, name: str, cfg: ConvertConfig, base: Path) -> str:
    p = Path(_rewrite(folder, cfg.path_replace)) / name
    return str(p if p.is_absolute() else (base / p))


def _folder_prefix(folder: str, cfg: ConvertConfig, base: Path) -> str:
    """What :func:`_site_path` puts before a plain file name: the resolved folder and "/"."""
    p = Path(_rewrite(folder, cfg.path_replace))
    resolved = str(p if p.is_absolute() else (base / p))
    return "" if resolved == "." else resolved.rstrip("/") + "/"


def _join(df: pd.DataFrame, cfg: ConvertConfig) -> tuple[pd.DataFrame, pd.Series]:
    """Left-join the metadata table on ``join_on``; returns the table and an ambiguity mask.

    Keys that occur more than once in the metadata table cannot give one label: those sites are
    quarantined rather than guessed. For other shared columns the metadata table wins.
    """
    if not cfg.join_on:
        raise CellmorphError("convert.join is set but convert.join_on names no key columns")
    meta = read_csv(cfg.join, "metadata table", strings=[cfg.label_column, *cfg.join_on])
    require_columns(df, cfg.join_on, "LoadData CSV")
    require_columns(meta, cfg.join_on, f"metadata table {cfg.join}")
    for frame in (df, meta):
        for key in cfg.join_on:
            frame[key] = frame[key].astype(str)
    dup = meta.duplicated(cfg.join_on, keep=False)
    ambiguous_keys = meta.loc[dup, cfg.join_on].drop_duplicates()
    meta = meta.loc[~dup]
    shared = [c for c in meta.columns if c in df.columns and c not in cfg.join_on]
    merged = df.drop(columns=shared).merge(meta, on=cfg.join_on, how="left")
    # A site without a row in the table gets empty text, not NaN ("an empty cell is empty").
    for col in meta.columns:
        if pd.api.types.is_string_dtype(meta[col]) or pd.api.types.is_object_dtype(meta[col]):
            merged[col] = merged[col].fillna("")
    flag = merged[cfg.join_on].merge(ambiguous_keys.assign(_amb=True), how="left", on=cfg.join_on)
    return merged, flag["_amb"].fillna(False).astype(bool).to_numpy()


def load_loaddata(cfg: ConvertConfig) -> Inputs:
    """The CellProfiler LoadData layout: one row per site, one file per channel."""
    path = Path(cfg.load_data or "")

    def compact(block: pd.DataFrame) -> pd.DataFrame:  # a block of rows: paths become columns
        require_columns(block, KEYS, f"LoadData CSV {path}")
        set_sources(block, cfg.channels, _loaddata_paths(block, cfg, path.parent))
        compact_text(block, [c for c in block.columns if c.startswith("Metadata_")])
        return block.drop(
            columns=[c for c in block.columns if c.startswith(("FileName_", "PathName_"))]
        )

    # PathName_* as categories: a few folders shared by millions of rows.
    df = read_csv(path, "LoadData CSV", strings=[cfg.label_column, *cfg.join_on],
                  categories=lambda c: c.startswith("PathName_"), block=compact)  # fmt: skip
    ambiguous = None
    if cfg.join:
        df, ambiguous = _join(df, cfg)
    inputs = Inputs(
        df,
        description={"layout": "loaddata", "load_data": str(path), "join": cfg.join},
        pages=[-1] * len(cfg.channels),
    )
    if ambiguous is not None and ambiguous.any():
        for _, row in df.loc[ambiguous].iterrows():
            inputs.quarantine.append(
                quarantine_row(row, f"several rows in {cfg.join} for keys {cfg.join_on}")
            )
        inputs.sites = df.loc[~ambiguous].reset_index(drop=True)
    return inputs


def _extract_id(name: str, pattern: re.Pattern[str]) -> str | None:
    m = pattern.search(name)
    if m is None:
        return None
    if "id" in pattern.groupindex:
        return m.group("id")
    return m.group(1) if pattern.groups else m.group(0)


def _files_by_id(folder: Path, pattern: re.Pattern[str]) -> tuple[dict[str, Path], list[dict]]:
    found: dict[str, list[Path]] = {}
    quarantine = []
    for f in sorted(folder.rglob("*")):
        if f.suffix.lower() not in TIFF_SUFFIXES or not f.is_file():
            continue
        ident = _extract_id(f.name, pattern)
        if ident is None:
            quarantine.append({"source": str(f), "reason": "file name does not match id_pattern"})
            continue
        found.setdefault(ident.lower(), []).append(f)
    unique = {k: v[0] for k, v in found.items() if len(v) == 1}
    for k, files in found.items():
        for f in files if len(files) > 1 else []:
            quarantine.append({"source": str(f), "reason": f"several files share the id {k!r}"})
    return unique, quarantine


def column_ids(values: pd.Series, pattern: re.Pattern[str]) -> pd.Series:
    """The id of each metadata row: the pattern's id where it matches the trimmed cell (a file
    name such as `` R08C20F01P01-CH3SK1FK1FL1.TIFF ``), else the trimmed cell (a bare id);
    lower-cased, as file ids are."""
    cells = values.astype(str).str.strip()
    return cells.map(lambda v: (_extract_id(v, pattern) or v).lower())


def _folder_settings(cfg: ConvertConfig) -> tuple[Path, re.Pattern[str], list[str]]:
    folder = Path(cfg.images or "")
    if not folder.is_dir():
        raise CellmorphError(f"image folder not found: {folder}")
    if not cfg.metadata or not cfg.id_pattern or not cfg.id_column:
        raise CellmorphError("the folder layout needs --metadata, --id-pattern and --id-column")
    try:
        pattern = re.compile(cfg.id_pattern, re.IGNORECASE)
    except re.error as e:
        raise CellmorphError(f"id_pattern {cfg.id_pattern!r} is not a valid regex ({e})") from None
    file_channels = cfg.file_channels or cfg.channels
    unknown = [c for c in cfg.channels if c not in file_channels]
    if unknown:
        raise CellmorphError(
            f"unknown channel(s) {', '.join(unknown)}: the files hold {', '.join(file_channels)} "
            "(set convert.file_channels to the order of channels inside each file)"
        )
    return folder, pattern, list(file_channels)


def load_folder(cfg: ConvertConfig) -> Inputs:
    """The original study's layout: one TIFF per site (all channels) plus a metadata CSV."""
    folder, pattern, file_channels = _folder_settings(cfg)
    df = read_csv(cfg.metadata, "metadata CSV", strings=[cfg.id_column, cfg.label_column])
    require_columns(df, [cfg.id_column, PLATE, WELL], f"metadata CSV {cfg.metadata}")
    files, quarantine = _files_by_id(folder, pattern)
    ids = column_ids(df[cfg.id_column], pattern)
    dup_ids = ids.duplicated(keep=False)
    path_of = ids.map(files)
    positions = [file_channels.index(c) for c in cfg.channels]
    inputs = Inputs(
        df,
        quarantine,
        {"layout": "folder", "images": str(folder), "metadata": cfg.metadata},
        pages=positions,
    )
    # One file holds every channel of a site; a row without a file has no path ("").
    site_files = path_of.map(lambda p: str(p) if isinstance(p, Path) else "")
    set_sources(df, cfg.channels, dict.fromkeys(cfg.channels, site_files))
    if SITE not in df.columns:
        # Sites numbered within each well in identifier order, so reruns number them the same.
        df[SITE] = df.assign(_id=ids).groupby(KEYS[:2])["_id"].rank(method="first").astype(int)
    bad = dup_ids | path_of.isna()
    for i in df.index[bad]:
        reason = "several metadata rows share this id" if dup_ids[i] else "no file for this id"
        cell = str(df.at[i, cfg.id_column])
        shown = cell if cell.strip().lower() == ids[i] else f"{cell.strip()} (id {ids[i]!r})"
        inputs.quarantine.append(quarantine_row(df.loc[i], f"{cfg.id_column}={shown}: {reason}"))
    listed = set(ids)
    for ident, f in files.items():
        if ident not in listed:
            inputs.quarantine.append(
                {"source": str(f), "reason": f"no metadata row for id {ident!r}"}
            )
    inputs.sites = df.loc[~bad].reset_index(drop=True)
    return inputs


# Largest stored image side: the biggest Cell Painting fields are ~2160 px (unbinned sCMOS), so a
# larger --size only upsamples; and one 5 x 2048^2 uint16 image is already 40 MB (a default shard
# of 1024 images is 40 GB in memory while it is written).
MAX_SIZE = 2048


def check_settings(cfg: ConvertConfig) -> None:
    """Settings that cannot work stop here, before any file is read."""
    for key, option, names in (
        ("channels", "--channels", cfg.channels),
        ("file_channels", "--file-channels", cfg.file_channels),
    ):
        if key == "channels" and not names:
            raise CellmorphError(f"convert.channels ({option}): no channel names given")
        if any(not n.strip() for n in names):
            raise CellmorphError(
                f"convert.{key} ({option}): empty channel name in {','.join(names)!r}"
            )
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise CellmorphError(
                f"convert.{key} ({option}): {', '.join(twice)} named more than once in "
                f"{','.join(names)!r}: every channel needs its own name"
            )
    if cfg.size > MAX_SIZE:
        raise CellmorphError(
            f"convert.size (--size) {cfg.size} is larger than {MAX_SIZE}: Cell Painting fields "
            f"are at most ~2160 px, so it would only upsample, and one image would take "
            f"{len(cfg.channels) * cfg.size**2 * 2 / 1e9:.1f} GB"
        )


def load_inputs(cfg: ConvertConfig) -> Inputs:
    """Read either layout, then apply the checks both share (keys, labels, duplicates)."""
    check_settings(cfg)
    if bool(cfg.load_data) == bool(cfg.images):
        raise CellmorphError(
            "give exactly one input: --load-data CSV, or --images DIR with --metadata"
        )
    inputs = load_loaddata(cfg) if cfg.load_data else load_folder(cfg)
    if len(inputs.sites) == 0 and not inputs.quarantine:
        raise CellmorphError("empty input: no sites found")
    _check_keys(inputs)
    if cfg.barcode_platemap:
        annotate(inputs, cfg)
    _check_labels(inputs, cfg)
    _check_duplicates(inputs)
    # LoadData: one file per channel; the folder layout's channels are pages of one file.
    _check_shared_files(inputs, list(cfg.channels), per_channel=bool(cfg.load_data))
    inputs.description["channels"] = list(cfg.channels)
    return inputs


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
