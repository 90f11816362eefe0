"""Labels the JUMP pilot's way: plate barcode -> plate map -> external metadata tables.

The pilot's LoadData CSVs carry no labels. As its profiling recipe (pycytominer) does, a site's
plate finds its plate map in ``barcode_platemap.csv`` (``Assay_Plate_Barcode, Plate_Map_Name``),
the map ``<platemap_dir>/<Plate_Map_Name>.txt`` gives each ``well_position`` a ``broad_sample``
(compound maps also a ``solvent``), and the external metadata tables (compound, CRISPR, ORF) give
each ``broad_sample`` its columns. Joined columns get the ``Metadata_`` prefix
(``Metadata_pert_iname``, ``Metadata_gene``, ``Metadata_Plate_Map_Name``...).

Rules, all explicit:

- Every value is text: ``NA`` is the string NA (DMSO's ``broad_sample`` in the compound table, or
  a compound named NA); a column a table lacks is empty for its rows.
- An empty ``broad_sample`` in a plate map means the well holds only its ``solvent``: the well's
  ``Metadata_broad_sample`` and ``Metadata_pert_iname`` are the solvent's name (``DMSO``) and
  its other columns come from the metadata row whose ``pert_iname`` is the solvent (CPJUMP1's
  DMSO row: ``control_type`` negcon). An empty ``broad_sample`` without a solvent is an empty well.
- Quarantined with the reason: a plate missing from the barcode table, a well missing from its
  map, an empty well, a ``broad_sample`` found in no table or with different rows in two.
- Stopped with a message: a missing plate map file, a barcode given two maps, a table without its
  key columns, a well listed twice in one map.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from cellmorph.config import ConvertConfig
from cellmorph.errors import CellmorphError
from cellmorph.store import layout as slayout
from conversion.tables import Inputs, compact_text, drop_rows, read_csv, require_columns

PREFIX = "Metadata_"
BARCODE, MAP_NAME = "Assay_Plate_Barcode", "Plate_Map_Name"
WELL, SAMPLE, SOLVENT = "well_position", "broad_sample", "solvent"


def prefixed(column: str) -> str:
    """pycytominer's name for a joined column."""
    return column if column.startswith(PREFIX) else PREFIX + column


def _strip(df: pd.DataFrame) -> pd.DataFrame:
    return df.apply(lambda c: c.str.strip()) if len(df) else df


def read_barcodes(path: Path) -> dict[str, str]:
    """Plate barcode -> plate map name; a barcode given two different maps stops."""
    df = _strip(read_csv(path, "barcode plate map", all_strings=True))
    require_columns(df, [BARCODE, MAP_NAME], f"barcode plate map {path}")
    pairs = df[[BARCODE, MAP_NAME]].drop_duplicates()
    twice = pairs.loc[pairs.duplicated(BARCODE), BARCODE]
    if len(twice):
        raise CellmorphError(f"barcode plate map {path}: plate {twice.iloc[0]} has several maps")
    return dict(zip(pairs[BARCODE], pairs[MAP_NAME]))


def read_platemap(path: Path, plate: str, barcodes: Path) -> pd.DataFrame:
    """One plate map (tab- or comma-separated), wells upper-cased; stops naming what is wrong."""
    if not path.is_file():
        raise CellmorphError(
            f"plate map not found: {path} (plate {plate} uses {path.stem!r} in {barcodes}; "
            "set --platemap-dir if the maps are elsewhere)"
        )
    df = _strip(read_csv(path, "plate map", all_strings=True))
    require_columns(df, [WELL, SAMPLE], f"plate map {path}")
    df[WELL] = df[WELL].str.upper()
    twice = df.loc[df.duplicated(WELL), WELL]
    if len(twice):
        raise CellmorphError(f"plate map {path}: well {twice.iloc[0]} is listed more than once")
    return df


@dataclass
class External:
    """The external metadata tables, one row per ``broad_sample`` that has a single row."""

    rows: (
        pd.DataFrame
    )  # indexed by broad_sample; every table's columns ("" where a table lacks one)
    ambiguous: dict[str, str]  # broad_sample -> the tables that give it different rows
    names: str  # the tables' file names, for messages

    def lookup(self, key: str, where: str) -> tuple[dict[str, str], str]:
        """(columns, "") for a known ``broad_sample``, else ({}, the quarantine reason)."""
        if key in self.ambiguous:
            return {}, f"broad_sample {key} has several different rows in {self.ambiguous[key]}"
        if key in self.rows.index:
            return self.rows.loc[key].to_dict(), ""
        return (
            {},
            f"broad_sample {key} ({where}) is in none of the external metadata tables ({self.names})",
        )

    def solvent(self, name: str) -> tuple[dict[str, str], str]:
        """The row whose ``pert_iname`` is the solvent (its broad_sample may be 'NA'), if any."""
        if "pert_iname" not in self.rows.columns:
            return {}, ""
        found = self.rows.loc[self.rows["pert_iname"] == name]
        if len(found) > 1:
            keys = ", ".join(found.index[:3])
            return {}, f"solvent {name} has several different rows (broad_sample {keys})"
        return (found.iloc[0].to_dict(), "") if len(found) else ({}, "")


def read_external(paths: list[str]) -> External:
    """Read every table as text; rows repeated identically collapse, differing ones are ambiguous."""
    frames = []
    for p in paths:
        df = _strip(read_csv(p, "external metadata table", all_strings=True))
        require_columns(df, [SAMPLE], f"external metadata table {p}")
        frames.append(df.assign(_table=Path(p).name))
    table = pd.concat(frames, ignore_index=True).fillna("")
    data = [c for c in table.columns if c != "_table"]
    unique = table.drop_duplicates(data)
    dup = unique.duplicated(SAMPLE, keep=False)
    ambiguous = {
        str(k): ", ".join(sorted(set(g["_table"]))) for k, g in unique.loc[dup].groupby(SAMPLE)
    }
    rows = unique.loc[~dup, data].set_index(SAMPLE, drop=False)
    return External(rows, ambiguous, ", ".join(Path(p).name for p in paths))


def _well_columns(well: pd.Series, name: str, ext: External | None) -> tuple[dict[str, Any], str]:
    """The joined columns of one plate-map well (unprefixed) and its quarantine reason or ""."""
    base = {MAP_NAME: name, **well.drop(WELL).to_dict()}
    key, where = well[SAMPLE], f"plate map {name}, well {well[WELL]}"
    if key:
        extra, reason = ext.lookup(key, where) if ext else ({}, "")
        return {**base, **extra}, reason
    solvent = str(well.get(SOLVENT, ""))
    if not solvent:
        return base, f"well {well[WELL]} of plate map {name}: empty broad_sample and no solvent"
    extra, reason = ext.solvent(solvent) if ext else ({}, "")
    return {**base, **extra, SAMPLE: solvent, "pert_iname": solvent}, reason


def well_table(platemap: pd.DataFrame, name: str, ext: External | None) -> pd.DataFrame:
    """One row per well of a map: ``_map``, ``_well``, ``_reason`` and the prefixed columns."""
    rows = []
    for _, well in platemap.iterrows():
        cols, reason = _well_columns(well, name, ext)
        rows.append({"_map": name, "_well": well[WELL], "_reason": reason, **cols})
    table = pd.DataFrame(rows).fillna("")
    return table.rename(columns={c: prefixed(c) for c in table.columns if not c.startswith("_")})


def annotate(inputs: Inputs, cfg: ConvertConfig) -> None:
    """Join every site's labels through its plate's map; quarantine what cannot be labelled."""
    barcodes_path = Path(cfg.barcode_platemap or "")
    barcodes = read_barcodes(barcodes_path)
    map_dir = Path(cfg.platemap_dir) if cfg.platemap_dir else barcodes_path.parent / "platemap"
    ext = read_external(list(cfg.external_metadata)) if cfg.external_metadata else None
    sites = inputs.sites
    map_of = sites[slayout.PLATE].map(barcodes).fillna("")
    tables = [pd.DataFrame(columns=["_map", "_well", "_reason"])]
    for name, plate in sites.groupby(map_of)[slayout.PLATE].first().items():
        if name:
            pm = read_platemap(map_dir / f"{name}.txt", str(plate), barcodes_path)
            tables.append(well_table(pm, str(name), ext))
    wells = pd.concat(tables, ignore_index=True)
    joined = [c for c in wells.columns if not c.startswith("_")]
    keyed = sites.drop(columns=[c for c in joined if c in sites.columns]).assign(
        _map=map_of.to_numpy(), _well=sites[slayout.WELL].str.upper().to_numpy()
    )
    merged = keyed.merge(wells, on=["_map", "_well"], how="left", validate="many_to_one")
    merged[joined] = merged[joined].fillna("")
    reasons = merged["_reason"].astype(object)
    unmapped_well = reasons.isna()
    reasons[unmapped_well] = [
        f"well {w} is not in plate map {m}"
        for w, m in zip(merged.loc[unmapped_well, slayout.WELL], merged.loc[unmapped_well, "_map"])
    ]
    unmapped_plate = merged["_map"] == ""
    reasons[unmapped_plate] = [
        f"plate {p} is not in barcode_platemap ({barcodes_path})"
        for p in merged.loc[unmapped_plate, slayout.PLATE]
    ]
    inputs.sites = merged.drop(columns=["_map", "_well", "_reason"])
    compact_text(inputs.sites, joined)  # a well's labels repeat in each of its sites
    drop_rows(inputs, reasons != "", reasons)
    inputs.description["labels"] = {
        "barcode_platemap": str(barcodes_path),
        "platemap_dir": str(map_dir),
        "external_metadata": list(cfg.external_metadata),
    }
