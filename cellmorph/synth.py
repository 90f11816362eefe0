"""Synthetic Cell Painting plates laid out like the JUMP pilot (CPJUMP1): the demo's dataset.

What is written into ``SynthConfig.out``::

    <out>/load_data.csv                      CellProfiler LoadData CSV, one row per site
    <out>/synth.json                         generator version + settings (regeneration key)
    <out>/<plate>/Images/r01c01f01p01-ch1sk1fk1fl1.tiff   one uint16 TIFF per channel per site

File names follow the Phenix/Harmony export (row, column, field = site, plane; ch1=Mito,
ch2=AGP, ch3=RNA, ch4=ER, ch5=DNA). As in the pilot, only the LoadData columns
``FileName_Orig<Ch>`` / ``PathName_Orig<Ch>`` say which file is which channel.

``PathName_Orig<Ch>`` is **relative to the CSV's folder** (``<plate>/Images``), unlike the
pilot's absolute paths: the folder can be moved or copied and two runs with the same seed give
byte-identical outputs wherever they are written. Readers resolve it as
``csv.parent / PathName / FileName`` (an absolute PathName is left as is by that join).

The biology: cells are soft blobs (nucleus in DNA; ER, RNA and AGP in the cytoplasm with
nucleoli in RNA, a cortical ring and Golgi in AGP; mitochondria as puncta in Mito). Each
treatment in :data:`TREATMENTS` changes a few morphology parameters by its own amount, some
barely. Nuisance per plate (channel gains) and per well (channel gains, cell size, density)
makes sites of one well look alike, so a split that puts one well on both sides leaks.
Pixels are photon counts with shot noise (Gaussian approximation of Poisson), read noise
and a camera offset.

Two scales: by default the cells are thumbnails that grow with ``size``
(:mod:`cellmorph.synth_thumb`, the demo's plates, frozen byte for byte); with
``synth.nucleus_diameter`` the physical scale of the pilot is kept at any size, with colonies,
the pilot's intensities and per-treatment 1-4 px textures (:mod:`cellmorph.synth_real`), and
the nucleus centres are written to ``<out>/locations/<plate>/<well>-<site>-Nuclei.csv``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import tifffile
from tqdm import tqdm

from cellmorph import atomic
from cellmorph.config import SynthConfig
from cellmorph.errors import CellmorphError
from cellmorph.synth_real import CHANNELS, Texture, draw_field
from cellmorph.synth_thumb import CAMERA_OFFSET as CAMERA_OFFSET  # tests measure above it
from cellmorph.synth_thumb import camera, draw_site, vignette

# Bump when the pixels or the CSV change, so a cached plate is regenerated.
GENERATOR_VERSION = 1
CSV_NAME = "load_data.csv"
SETTINGS_NAME = "synth.json"
Replace = Literal["same", "synth", "all"]  # what an output folder may hold (_check_out)
LOCATIONS = "locations"  # real scale: <out>/locations/<plate>/<well>-<site>-Nuclei.csv
PHENIX_CHANNEL = {"Mito": 1, "AGP": 2, "RNA": 3, "ER": 4, "DNA": 5}  # CPJUMP1 ch numbers
ROW_LETTERS = "ABCDEFGHIJKLMNOP"


@dataclass(frozen=True)
class Treatment:
    """One perturbation and how it changes the cells (1.0 / 0.0 = no change).

    ``weight`` is the relative number of wells it gets on a plate; ``responders`` is the
    fraction of cells that show the effect (the rest look like DMSO).
    """

    name: str
    broad_sample: str
    control_type: str
    weight: int
    nucleus_scale: float = 1.0
    nucleus_elongation: float = 0.0
    cell_scale: float = 1.0
    density: float = 1.0
    mito_puncta: float = 1.0
    mito_intensity: float = 1.0
    actin_ring: float = 1.0
    actin_texture: float = 0.0
    er_intensity: float = 1.0
    er_texture: float = 0.0
    responders: float = 1.0
    texture: Texture = Texture()  # real scale only (synth.nucleus_diameter): 1-4 px patterns


# The JUMP-CP compound positive controls plus DMSO. Effects follow the mechanism loosely
# (Aurora kinase inhibition -> polyploid giant nuclei; NAMPT inhibition -> mitochondria;
# PAK1 -> actin; cathepsin inhibition -> ER/lysosome texture; DYRK1A -> nuclear shape);
# the last three are deliberately weak. broad_sample IDs are synthetic, not Broad IDs.
TREATMENTS: tuple[Treatment, ...] = (
    Treatment("DMSO", "DMSO", "negcon", weight=8),
    Treatment(
        "AMG900", "SYN-0001", "poscon", weight=3,
        nucleus_scale=1.55, cell_scale=1.3, density=0.65, responders=0.85,
        texture=Texture(chromatin=0.55, nucleoli=0.5),
    ),
    Treatment(
        "FK-866", "SYN-0002", "poscon", weight=3,
        mito_puncta=0.45, mito_intensity=0.6, responders=0.8,
        texture=Texture(mito_fragmentation=0.95),
    ),
    Treatment(
        "NVS-PAK1-1", "SYN-0003", "poscon", weight=2,
        actin_ring=1.8, actin_texture=0.5, cell_scale=0.92, responders=0.75,
        texture=Texture(actin_fibres=0.8),
    ),
    Treatment(
        "aloxistatin", "SYN-0004", "poscon", weight=2,
        er_texture=0.6, er_intensity=1.35, responders=0.75,
        texture=Texture(er_grain=0.8),
    ),
    Treatment(
        "TC-S-7004", "SYN-0005", "poscon", weight=1,
        nucleus_elongation=0.6, nucleus_scale=1.1, responders=0.7,
        texture=Texture(nucleoli=1.0, chromatin=0.3),
    ),
    Treatment(
        "LY2109761", "SYN-0006", "poscon", weight=2,
        cell_scale=1.08, er_intensity=1.1, actin_ring=1.15, responders=0.6,
        texture=Texture(actin_fibres=0.35, er_grain=0.4),
    ),
    Treatment(
        "dexamethasone", "SYN-0007", "poscon", weight=2,
        cell_scale=1.06, nucleus_scale=1.04, responders=0.6,
        texture=Texture(chromatin=0.3),
    ),
    Treatment(
        "quinidine", "SYN-0008", "poscon", weight=1, mito_intensity=1.08, responders=0.5,
        texture=Texture(mito_fragmentation=0.45),
    ),
)  # fmt: skip


@dataclass(frozen=True)
class Nuisance:
    """Technical variation shared by every site of a plate or of a well."""

    gain: np.ndarray  # per channel, multiplies the signal
    size: float = 1.0
    density: float = 1.0


# ---------------------------------------------------------------------------------------------
# Plate layout


def well_name(row: int, col: int) -> str:
    """``A01`` style name of a 0-based (row, col)."""
    return f"{ROW_LETTERS[row]}{col + 1:02d}"


def plate_name(index: int) -> str:
    """Barcode-like plate names (the pilot's are ``BR00116991``...); ``SYNP`` marks synthetic."""
    return f"SYNP{index + 1:02d}"


def _well_counts(n_wells: int) -> list[tuple[Treatment, int]]:
    """How many wells each treatment gets: one each, the rest in proportion to ``weight - 1``.

    With fewer wells than treatments the first treatments in the table are kept (DMSO first).
    """
    if n_wells < len(TREATMENTS):
        return [(t, 1) for t in TREATMENTS[:n_wells]]
    extra = n_wells - len(TREATMENTS)
    w = np.array([t.weight - 1 for t in TREATMENTS], dtype=float)
    share = extra * w / w.sum()
    counts = np.floor(share).astype(int)
    # Largest remainder; ties go to the earlier (more frequent) treatment.
    order = np.argsort(-(share - counts), kind="stable")
    counts[order[: extra - counts.sum()]] += 1
    return [(t, 1 + int(c)) for t, c in zip(TREATMENTS, counts)]


def plate_layout(rows: int, cols: int, seed: int) -> dict[tuple[int, int], Treatment]:
    """Treatment of every (row, col); identical on every plate of a run, as in the pilot."""
    labels = [t for t, n in _well_counts(rows * cols) for _ in range(n)]
    positions = [(r, c) for r in range(rows) for c in range(cols)]
    perm = np.random.default_rng([seed, 1]).permutation(len(positions))
    return {positions[i]: t for i, t in zip(perm, labels)}


def _plate_nuisance(seed: int, plate: int) -> Nuisance:
    rng = np.random.default_rng([seed, 2, plate])
    return Nuisance(gain=rng.lognormal(0.0, 0.10, len(CHANNELS)).astype(np.float32))


def _well_nuisance(seed: int, plate: int, row: int, col: int) -> Nuisance:
    rng = np.random.default_rng([seed, 3, plate, row, col])
    return Nuisance(
        gain=rng.lognormal(0.0, 0.12, len(CHANNELS)).astype(np.float32),
        size=float(rng.lognormal(0.0, 0.07)),
        density=float(rng.lognormal(0.0, 0.20)),
    )


# ---------------------------------------------------------------------------------------------
# Files


def phenix_name(row: int, col: int, site: int, channel: str) -> str:
    """Phenix/Harmony export name, e.g. ``r01c01f01p01-ch5sk1fk1fl1.tiff`` (0-based row/col)."""
    ch = PHENIX_CHANNEL[channel]
    return f"r{row + 1:02d}c{col + 1:02d}f{site:02d}p01-ch{ch}sk1fk1fl1.tiff"


REAL_SCALE_FIELDS = {"nucleus_diameter", "cells_per_field", "texture_only"}


def _settings(cfg: SynthConfig) -> dict:
    # ``out`` is left out: the same settings written elsewhere give the same files. So are the
    # real-scale fields at thumbnail scale: they change nothing there, and a plate written
    # before they existed stays current.
    exclude = {"out"} | (REAL_SCALE_FIELDS if cfg.nucleus_diameter is None else set())
    return {"generator_version": GENERATOR_VERSION, **cfg.model_dump(mode="json", exclude=exclude)}


def _read_settings(out: Path) -> dict | None:
    try:
        return json.loads((out / SETTINGS_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_settings(out: Path, cfg: SynthConfig, complete: bool) -> None:
    text = json.dumps({**_settings(cfg), "complete": complete}, indent=2, sort_keys=True)
    atomic.write_text(out / SETTINGS_NAME, text + "\n")


def _is_current(out: Path, cfg: SynthConfig) -> bool:
    return (out / CSV_NAME).is_file() and _read_settings(out) == {
        **_settings(cfg),
        "complete": True,
    }


def _site_rows(cfg: SynthConfig) -> list[dict]:
    """One record per site (plate, well, site, treatment), in the order they are written."""
    layout = plate_layout(cfg.rows, cfg.cols, cfg.seed)
    rows = []
    for p in range(cfg.plates):
        for (r, c), t in sorted(layout.items()):
            for s in range(1, cfg.sites + 1):
                rows.append({"plate": p, "row": r, "col": c, "site": s, "treatment": t})
    return rows


def _csv_record(plate: str, row: int, col: int, site: int, t: Treatment) -> dict:
    rec: dict = {
        "Metadata_Plate": plate,
        "Metadata_Well": well_name(row, col),
        "Metadata_Site": site,
        "Metadata_pert_iname": t.name,
        "Metadata_broad_sample": t.broad_sample,
        "Metadata_control_type": t.control_type,
    }
    for ch in CHANNELS:
        rec[f"FileName_Orig{ch}"] = phenix_name(row, col, site, ch)
    for ch in CHANNELS:
        rec[f"PathName_Orig{ch}"] = f"{plate}/Images"
    return rec


def _check_out(out: Path, cfg: SynthConfig, replace: Replace) -> None:
    """Refuse a folder whose files this run would overwrite, unless ``replace`` allows it.

    ``"same"``: only an empty folder or one holding this very plate (same settings: rewritten
    byte for byte); ``"synth"``: also a plate synth wrote with other settings (the demo's own
    folder); ``"all"``: anything (``--overwrite``).
    """
    if out.exists() and not out.is_dir():
        raise CellmorphError(f"synth.out {out} exists and is not a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    settings = _read_settings(out) if entries else None
    if not entries or replace == "all":
        return
    if settings is None:
        what = f"a {CSV_NAME}" if CSV_NAME in entries else ", ".join(entries[:3])
        raise CellmorphError(
            f"synth.out {out} holds {what}{' ...' if len(entries) > 3 else ''} that synth did "
            f"not write (no {SETTINGS_NAME}); its files could be overwritten: choose an empty "
            "folder, or --overwrite"
        )
    mine = _settings(cfg)
    changed = sorted(k for k in mine.keys() | settings.keys() - {"complete"}
                     if mine.get(k) != settings.get(k))  # fmt: skip
    if changed and replace == "same":
        raise CellmorphError(
            f"synth.out {out} holds a plate generated with other settings "
            f"({', '.join(f'{k}={settings.get(k)}' for k in changed)}); its TIFFs would be "
            "overwritten: choose another folder, or --overwrite"
        )


def _prepare_out(out: Path, cfg: SynthConfig, replace: Replace) -> None:
    """Create ``out`` and mark it as being (re)generated; refuse to overwrite foreign data."""
    _check_out(out, cfg, replace)
    try:
        out.mkdir(parents=True, exist_ok=True)
        # Until the new CSV is written, a rerun must regenerate (an interrupted run included).
        _write_settings(out, cfg, complete=False)
    except OSError as e:
        raise CellmorphError(f"synth.out {out}: cannot write ({e.strerror})") from None


def _write_site(folder: Path, rec: dict, img: np.ndarray) -> None:
    """One uncompressed TIFF per channel, named as the record's FileName columns say."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, ch in enumerate(CHANNELS):
        # metadata=None: no tifffile JSON description, a plain TIFF like the pilot's.
        path = folder / rec[f"FileName_Orig{ch}"]
        tifffile.imwrite(path, img[i], photometric="minisblack", metadata=None)


def draw_real_site(
    rng: np.random.Generator, cfg: SynthConfig, t: Treatment, plate: Nuisance, well: Nuisance
) -> tuple[np.ndarray, np.ndarray]:
    """One field at the pilot's physical scale (``cfg.nucleus_diameter`` set): a (5, size, size)
    uint16 array in :data:`CHANNELS` order and the nucleus centres, (n, 2) as (x, y) px."""
    signal, centres = draw_field(rng, cfg.size, float(cfg.nucleus_diameter or 0.0),
                                 cfg.cells_per_field, t, well, cfg.texture_only)  # fmt: skip
    signal *= vignette(cfg.size)[None]
    signal *= (plate.gain * well.gain)[:, None, None]
    return camera(rng, signal), centres


def _write_locations(out: Path, rec: dict, centres: np.ndarray) -> None:
    """The nucleus centres in DeepProfiler's layout: locations/<plate>/<well>-<site>-Nuclei.csv."""
    name = f"{rec['Metadata_Well']}-{rec['Metadata_Site']}-Nuclei.csv"
    frame = pd.DataFrame(np.round(centres, 2),
                         columns=["Nuclei_Location_Center_X", "Nuclei_Location_Center_Y"])  # fmt: skip
    atomic.write_with(out / LOCATIONS / rec["Metadata_Plate"] / name,
                      lambda p: frame.to_csv(p, index=False))  # fmt: skip


def generate_plate(cfg: SynthConfig, *, progress: bool = True, replace: Replace = "synth") -> Path:
    """Write the synthetic plates and their LoadData CSV into ``cfg.out``; return the CSV path.

    Deterministic for the settings (byte-identical files); returns at once when ``cfg.out``
    already holds a complete plate generated with the same settings. ``replace`` says what
    else ``cfg.out`` may hold (:func:`_check_out`). Regenerating over an earlier, larger plate
    leaves its extra TIFFs in place; the new CSV does not list them. At real scale
    (``cfg.nucleus_diameter``) the nucleus centres are written under ``locations/``.
    """
    out = Path(cfg.out)
    csv_path = out / CSV_NAME
    if _is_current(out, cfg):
        return csv_path
    _prepare_out(out, cfg, replace)
    sites = _site_rows(cfg)
    plates = [_plate_nuisance(cfg.seed, p) for p in range(cfg.plates)]
    records = []
    bar = tqdm(total=len(sites) * len(CHANNELS), unit="img", desc="synth", disable=not progress)
    with bar:
        for s in sites:
            p, r, c, site, t = s["plate"], s["row"], s["col"], s["site"], s["treatment"]
            # One generator per site, keyed by its position: any site can be redrawn alone.
            rng = np.random.default_rng([cfg.seed, 4, p, r, c, site])
            well = _well_nuisance(cfg.seed, p, r, c)
            rec = _csv_record(plate_name(p), r, c, site, t)
            if cfg.nucleus_diameter is None:
                img = draw_site(rng, cfg.size, cfg.cells_per_site, t, plates[p], well)
            else:
                img, centres = draw_real_site(rng, cfg, t, plates[p], well)
                _write_locations(out, rec, centres)
            _write_site(out / rec["PathName_OrigDNA"], rec, img)
            records.append(rec)
            bar.update(len(CHANNELS))
    frame = pd.DataFrame.from_records(records)
    atomic.write_with(csv_path, lambda p: frame.to_csv(p, index=False))
    _write_settings(out, cfg, complete=True)
    return csv_path
