"""The store: the contract between conversion (writer) and training (reader).

=============  ===============================================================================
``layout``     names and schema every side agrees on (no zarr, no pyarrow)
``files``      where the bytes live: a local folder or an object-store prefix, one handle
``write``      the writer side: create, write shards, bind metadata and attrs (conversion)
``read``       the reader side: open one generation, check it, hand out views
``shared``     the node-shared metadata cache (private to the user, checksummed)
``verify``     ``cellmorph inspect [--verify]``
=============  ===============================================================================

Library code imports the submodule it needs, so a module that only needs a column name does not
load zarr or pyarrow, and the writer and reader sides never import each other. For notebooks,
tests and benchmarks this package also answers every public name of its submodules
(``from cellmorph.store import open_store``), loading the submodule on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_SUBMODULES = ("layout", "files", "write", "read", "shared", "verify")
# Statistics maths lives with normalization, which reads it.
_ELSEWHERE = {
    name: "cellmorph.loaders.stats"
    for name in ("channel_stats", "group_key", "sums_by_group", "plate_stats_from_sums",
                 "pooled_stats", "store_stats", "MOMENTS", "GROUP_SEP")
}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _ELSEWHERE:
        return getattr(importlib.import_module(_ELSEWHERE[name]), name)
    for sub in _SUBMODULES:
        module = importlib.import_module(f"{__name__}.{sub}")
        if name in vars(module) and not name.startswith("_"):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
