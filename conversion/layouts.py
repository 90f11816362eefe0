"""Input layouts: turn a LoadData CSV, or a folder of TIFFs plus a metadata CSV, into sites.

Both layouts produce the same :class:`Inputs`: one row per site with ``Metadata_Plate``,
``Metadata_Well``, ``Metadata_Site``, the metadata/label columns, one ``source_<Ch>`` column per
requested channel (in the requested order) and an internal ``_sources`` column of
``(path, channel index)`` pairs. Structural problems (a missing column, an unknown channel, an
empty input) raise :class:`CellmorphError`; per-site problems (no label, duplicates, unmatched
files) become quarantine rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cellmorph.config import ConvertConfig
from cellmorph.errors import CellmorphError

KEYS = ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]
SOURCES = "_sources"
TIFF_SUFFIXES = {".tif", ".tiff"}


@dataclass
class Inputs:
    """Sites that passed the table checks, and the quarantine rows of those that did not."""

    sites: pd.DataFrame
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    description: dict[str, Any] = field(default_factory=dict)


def read_csv(path: str | Path, what: str) -> pd.DataFrame:
    """Read a CSV or stop with a message naming it; plate and well are always strings."""
    p = Path(path)
    if not p.is_file():
        raise CellmorphError(f"{what} not found: {p}")
    try:
        df = pd.read_csv(p, dtype={"Metadata_Plate": str, "Metadata_Well": str})
    except pd.errors.EmptyDataError:
        raise CellmorphError(f"{what} {p} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise CellmorphError(f"{what} {p} is not a readable CSV ({e})") from None
    df.columns = [str(c).strip() for c in df.columns]
    return df


def require_columns(df: pd.DataFrame, columns: list[str], where: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise CellmorphError(f"{where} lacks required column(s): {', '.join(missing)}")


def quarantine_row(row: pd.Series, reason: str) -> dict[str, Any]:
    sources = row.get(SOURCES) or []
    return {
        "source": ";".join(dict.fromkeys(p for p, _ in sources)),
        "plate": row.get("Metadata_Plate"),
        "well": row.get("Metadata_Well"),
        "site": row.get("Metadata_Site"),
        "reason": reason,
    }


def _rewrite(path: str, replacements: list[str]) -> str:
    for item in replacements:
        old, sep, new = item.partition("=")
        if not sep:
            raise CellmorphError(f"path_replace entry {item!r} is not of the form OLD=NEW")
        if path.startswith(old):
            return new + path[len(old) :]
    return path


def _loaddata_sources(df: pd.DataFrame, cfg: ConvertConfig, base: Path) -> pd.Series:
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

    def site_sources(row: pd.Series) -> list[tuple[str, int]]:
        out = []
        for ch in cfg.channels:
            folder = _rewrite(str(row[f"PathName_Orig{ch}"]), cfg.path_replace)
            p = Path(folder) / str(row[f"FileName_Orig{ch}"])
            out.append((str(p if p.is_absolute() else (base / p)), -1))
        return out

    return df.apply(site_sources, axis=1)


def _join(df: pd.DataFrame, cfg: ConvertConfig) -> tuple[pd.DataFrame, pd.Series]:
    """Left-join the metadata table on ``join_on``; returns the table and an ambiguity mask.

    Keys that occur more than once in the metadata table cannot give one label: those sites are
    quarantined rather than guessed. For other shared columns the metadata table wins.
    """
    if not cfg.join_on:
        raise CellmorphError("convert.join is set but convert.join_on names no key columns")
    meta = read_csv(cfg.join, "metadata table")
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
    flag = merged[cfg.join_on].merge(ambiguous_keys.assign(_amb=True), how="left", on=cfg.join_on)
    return merged, flag["_amb"].fillna(False).astype(bool).to_numpy()


def load_loaddata(cfg: ConvertConfig) -> Inputs:
    """The CellProfiler LoadData layout: one row per site, one file per channel."""
    path = Path(cfg.load_data or "")
    df = read_csv(path, "LoadData CSV")
    require_columns(df, KEYS, f"LoadData CSV {path}")
    df[SOURCES] = _loaddata_sources(df, cfg, path.parent) if len(df) else []
    ambiguous = None
    if cfg.join:
        df, ambiguous = _join(df, cfg)
    df = df.drop(columns=[c for c in df.columns if c.startswith(("FileName_", "PathName_"))])
    inputs = Inputs(
        df, description={"layout": "loaddata", "load_data": str(path), "join": cfg.join}
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


def load_folder(cfg: ConvertConfig) -> Inputs:
    """The original study's layout: one multi-channel TIFF per site plus a metadata CSV."""
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
    df = read_csv(cfg.metadata, "metadata CSV")
    require_columns(
        df, [cfg.id_column, "Metadata_Plate", "Metadata_Well"], f"metadata CSV {cfg.metadata}"
    )
    files, quarantine = _files_by_id(folder, pattern)
    ids = df[cfg.id_column].astype(str).str.lower()
    dup_ids = ids.duplicated(keep=False)
    path_of = ids.map(files)
    inputs = Inputs(
        df, quarantine, {"layout": "folder", "images": str(folder), "metadata": cfg.metadata}
    )
    positions = [file_channels.index(c) for c in cfg.channels]
    df[SOURCES] = [[(str(p), i) for i in positions] if isinstance(p, Path) else [] for p in path_of]
    if "Metadata_Site" not in df.columns:
        # Sites numbered within each well in identifier order, so reruns number them the same.
        df["Metadata_Site"] = (
            df.assign(_id=ids).groupby(KEYS[:2])["_id"].rank(method="first").astype(int)
        )
    bad = dup_ids | path_of.isna()
    for i in df.index[bad]:
        reason = "several metadata rows share this id" if dup_ids[i] else "no file for this id"
        inputs.quarantine.append(
            quarantine_row(df.loc[i], f"{cfg.id_column}={df.at[i, cfg.id_column]}: {reason}")
        )
    matched = set(ids[~bad])
    for ident, f in files.items():
        if ident not in matched and ident not in set(ids[dup_ids]):
            inputs.quarantine.append(
                {"source": str(f), "reason": f"no metadata row for id {ident!r}"}
            )
    inputs.sites = df.loc[~bad].reset_index(drop=True)
    return inputs


def load_inputs(cfg: ConvertConfig) -> Inputs:
    """Read either layout, then apply the checks both share (labels, duplicates, emptiness)."""
    if bool(cfg.load_data) == bool(cfg.images):
        raise CellmorphError(
            "give exactly one input: --load-data CSV, or --images DIR with --metadata"
        )
    inputs = load_loaddata(cfg) if cfg.load_data else load_folder(cfg)
    if len(inputs.sites) == 0 and not inputs.quarantine:
        raise CellmorphError("empty input: no sites found")
    _check_labels(inputs, cfg)
    _check_duplicates(inputs)
    for i, ch in enumerate(cfg.channels):
        inputs.sites[f"source_{ch}"] = [s[i][0] for s in inputs.sites[SOURCES]]
    inputs.description["channels"] = list(cfg.channels)
    return inputs


def _check_labels(inputs: Inputs, cfg: ConvertConfig) -> None:
    sites, col = inputs.sites, cfg.label_column
    if cfg.allow_unlabeled:
        return
    if col not in sites.columns:
        raise CellmorphError(
            f"label column {col} not found in the metadata (set convert.label_column, "
            "or --allow-unlabeled to convert images for prediction)"
        )
    missing = sites[col].isna() | (sites[col].astype(str).str.strip() == "")
    for _, row in sites.loc[missing].iterrows():
        inputs.quarantine.append(quarantine_row(row, f"no label in column {col}"))
    inputs.sites = sites.loc[~missing].reset_index(drop=True)


def _check_duplicates(inputs: Inputs) -> None:
    """Every copy of a duplicated (plate, well, site) is quarantined: none can be trusted."""
    sites = inputs.sites
    sites["Metadata_Plate"] = sites["Metadata_Plate"].astype(str)
    sites["Metadata_Well"] = sites["Metadata_Well"].astype(str)
    try:
        sites["Metadata_Site"] = sites["Metadata_Site"].astype("int64")
    except (ValueError, TypeError):
        sites["Metadata_Site"] = sites["Metadata_Site"].astype(str)
    dup = sites.duplicated(KEYS, keep=False)
    for _, row in sites.loc[dup].iterrows():
        inputs.quarantine.append(quarantine_row(row, "duplicate (plate, well, site)"))
    inputs.sites = sites.loc[~dup].reset_index(drop=True)
