"""Tables of sites: reading CSV/TSV files with explicit NA handling, and the rows both input
layouts produce (one site per row, its channel sources in ``_sources``)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cellmorph.errors import CellmorphError
from cellmorph.store import KEYS, PLATE, SITE, WELL

SOURCES = "_sources"
__all__ = ["KEYS", "SOURCES", "Inputs", "drop_rows", "quarantine_row", "read_csv",
           "require_columns", "sniff_separator"]  # fmt: skip

SOURCES = "_sources"


@dataclass
class Inputs:
    """Sites that passed the table checks, and the quarantine rows of those that did not."""

    sites: pd.DataFrame
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    description: dict[str, Any] = field(default_factory=dict)


def sniff_separator(path: Path) -> str:
    """Tab or comma, from the header line's content (the pilot's ``.txt``/``.tsv`` are tabs)."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        header = f.readline()
    return "\t" if header.count("\t") > header.count(",") else ","


def read_csv(
    path: str | Path, what: str, strings: Iterable[str] = (), all_strings: bool = False
) -> pd.DataFrame:
    """Read a CSV or TSV (decided by content) or stop with a message naming it.

    NA handling is explicit: no cell is read as missing (``NA``, ``None``, ``null``, ``#N/A``
    are text; an empty cell is ""). ``Metadata_*`` columns and ``strings`` stay text (plate
    ``0001`` keeps its zeros); other columns keep pandas' type inference (a column of numbers is
    numeric); ``all_strings`` reads every column as text.
    """
    p = Path(path)
    if not p.is_file():
        raise CellmorphError(f"{what} not found: {p}")
    keep = set(strings)
    opts: dict[str, Any] = dict(keep_default_na=False, na_values=[], encoding="utf-8-sig")
    try:
        opts["sep"] = sniff_separator(p)
        header = pd.read_csv(p, nrows=0, **opts).columns
        text = [
            c
            for c in header
            if all_strings or c.strip().startswith("Metadata_") or c.strip() in keep
        ]
        df = pd.read_csv(p, dtype={c: str for c in text}, **opts)
    except pd.errors.EmptyDataError:
        raise CellmorphError(f"{what} {p} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise CellmorphError(f"{what} {p} is not a readable CSV or TSV ({e})") from None
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
        "plate": row.get(PLATE),
        "well": row.get(WELL),
        "site": row.get(SITE),
        "reason": reason,
    }


def drop_rows(inputs: Inputs, bad: pd.Series, reasons: pd.Series) -> None:
    """Move the rows flagged in ``bad`` to quarantine with their reason."""
    sites = inputs.sites
    for i in sites.index[bad.to_numpy()]:
        inputs.quarantine.append(quarantine_row(sites.loc[i], str(reasons[i])))
    inputs.sites = sites.loc[~bad.to_numpy()].reset_index(drop=True)
