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

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from cellmorph.config import ConvertConfig
from cellmorph.errors import CellmorphError
from cellmorph.store.layout import PLATE, SITE, WELL
from conversion.platemaps import annotate
from conversion.sitechecks import (
    _check_duplicates,
    _check_keys,
    _check_labels,
    _check_shared_files,
)
from conversion.tables import (
    KEYS,
    Inputs,
    compact_text,
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
