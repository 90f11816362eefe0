"""Checkpoint files: written atomically, read with ``weights_only=True``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from cellmorph.errors import CellmorphError

REQUIRED_KEYS = ("model", "config", "classes", "channels")


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write to a temp file and ``os.replace`` it, so a crash never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A cellmorph checkpoint (tensors and plain Python values only: no pickled code)."""
    p = Path(path)
    if not p.is_file():
        raise CellmorphError(f"checkpoint not found: {p}")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for foreign or corrupt files
        raise CellmorphError(f"{p}: not a readable cellmorph checkpoint ({e})") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CellmorphError(f"{p}: checkpoint lacks key(s) {missing}")
    return ckpt
