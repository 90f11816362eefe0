"""Loaders: the store read path, augmentation, and the torch and DALI batch loaders.

``build_loader`` (:mod:`cellmorph.loaders.build`) is the entry point used by training and
prediction; both loaders yield ``(x float32 NCHW on device, y int64 on device, store rows int64
on the CPU)``. Names load on first use, so the writer side can import
:mod:`cellmorph.loaders.stats` without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Loader", "Normalization", "ShardReader", "build_loader"]
_HOME = {
    "Loader": "build",
    "build_loader": "build",
    "Normalization": "normalize",
    "ShardReader": "reader",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
