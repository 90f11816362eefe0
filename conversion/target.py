"""The output folder of a conversion: what ``--out`` holds, whether a convert may write there,
and that no input lies inside it."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import zarr

from cellmorph.config import ConvertConfig
from cellmorph.errors import CellmorphError
from cellmorph.store import files as sfiles
from cellmorph.store import layout as slayout
from conversion import ownership
from conversion.manifest import Manifest
from conversion.tables import DIR


def out_kind(out: str) -> str:
    """What ``--out`` holds: absent, empty, store (a finished cellmorph store), started (a
    conversion that has not finished, or a store of another format), file, or other."""
    kind = sfiles.path_kind(out)
    if kind != "folder":
        return kind
    names = sfiles.folder_names(out)
    if not names - {slayout.QUARANTINE}:  # empty, or what a stop with no valid sites left
        return "empty"
    try:
        attrs = dict(
            zarr.open_group(store=sfiles.zarr_store(out, True), mode="r", zarr_format=3).attrs
        )
    except slayout.ZARR_ERRORS:  # anything unreadable as a zarr group is not ours to delete
        attrs = {}
    if "cellmorph_format" not in attrs:
        return "started" if Manifest(out).header() is not None else "other"
    done = attrs.get("complete") is True and attrs["cellmorph_format"] == slayout.FORMAT_VERSION
    return "store" if done else "started"


def older_format(out: str | Path) -> bool:
    """True when ``out`` holds a store of an earlier cellmorph format (readers refuse it)."""
    out = str(out).removeprefix("file://")
    try:
        attrs = dict(
            zarr.open_group(store=sfiles.zarr_store(out, True), mode="r", zarr_format=3).attrs
        )
    except slayout.ZARR_ERRORS:  # absent or unreadable: nothing of ours to upgrade
        return False
    version = attrs.get("cellmorph_format")
    return isinstance(version, int) and version < slayout.FORMAT_VERSION


def local_out(out: str) -> str:
    """``--out`` as the path to write. A link is followed (swap the folder, never the link),
    and so are ``.`` and ``..`` (``s.zarr/images/..`` is ``s.zarr``: its writer's folder and
    the swap must be beside the store, not inside it); a loop of links stops with one line."""
    if not ownership.is_local(out):
        return out
    try:
        real = os.path.realpath(out, strict=True)
    except FileNotFoundError:  # not there yet (or a link to a store still to be written)
        real = os.path.realpath(out)
    except OSError as e:  # ELOOP, ENOTDIR: no folder can ever be written there
        raise CellmorphError(f"--out {out}: cannot be a store path ({e.strerror})") from None
    dots = any(part in (".", "..") for part in Path(out).parts) or out.rstrip("/").endswith("/.")
    return real if os.path.islink(out) or dots else out


def check_out(out: str, kind: str) -> None:
    """``--out`` must be absent, empty or a cellmorph store: cellmorph deletes nothing else."""
    if kind == "file":
        raise CellmorphError(f"--out {out} is a file; give the path of a store folder")
    if kind == "other":
        ownership.refuse_if_busy(out)  # another convert may be creating it right now
        raise CellmorphError(
            f"--out {out} exists and is not a cellmorph store; cellmorph never deletes it "
            "(--overwrite replaces only stores): choose another --out"
        )


def check_inputs_outside(out: str, paths: Iterable[str]) -> None:
    """No input may live inside ``--out``: replacing the store would delete it."""
    if not ownership.is_local(out) or not os.path.exists(out):
        return  # nothing can be inside a folder that does not exist
    root = os.path.realpath(out)
    for p in dict.fromkeys(str(p) for p in paths if p):
        real = os.path.realpath(p)
        if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
            raise CellmorphError(
                f"--out {out} holds the input {p}; the store must be written elsewhere"
            )


def input_paths(cfg: ConvertConfig, sites: pd.DataFrame | None = None) -> list[str]:
    """The inputs named by the settings, and the folders of every TIFF."""
    named = [cfg.load_data, cfg.images, cfg.metadata, cfg.join, cfg.illum_dir, cfg.locations,
             cfg.barcode_platemap, cfg.platemap_dir, *(cfg.external_metadata or [])]  # fmt: skip
    folders: list[str] = []
    if sites is not None and len(sites):
        dirs = {d for c in sites.columns if c.startswith(DIR)
                for d in sites[c].astype("category").cat.categories}  # fmt: skip
        folders = sorted({os.path.dirname(d + "x") or "." for d in dirs})
    return [str(p) for p in named if p] + folders
