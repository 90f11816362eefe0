"""The conversion manifest: what a rerun needs to finish a store and prove it is the same job.

Kept in ``<store>/.convert/`` (zarr ignores it) as small JSON files, each written atomically:

- ``header.json``: the fingerprint of the inputs and settings, the row count, the shard size;
- ``shard-<i>.json``: one per finished shard, written by the shard's writer *after* its data,
  with the hash of the sites it holds and their checksums (so a shifted plan invalidates it);
- ``bad.json``: sites whose pixels failed to decode while packing (they leave the plan).

Paths may be local or an object-store URL (through :mod:`cellmorph.store`'s file helpers).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from cellmorph.store import files as sfiles

DIRNAME = ".convert"


def digest(obj: Any) -> str:
    """A stable hash of a JSON-serializable object."""
    raw = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(raw).hexdigest()


class Manifest:
    """Read/write access to one store's manifest files."""

    def __init__(self, out: str) -> None:
        self.out = str(out)

    def _read(self, name: str) -> Any | None:
        try:
            data = sfiles.read_file(self.out, f"{DIRNAME}/{name}")
            return None if data is None else json.loads(data)
        except (NotADirectoryError, ValueError):  # a damaged record counts as none: redo it
            return None

    def _write(self, name: str, obj: Any) -> None:
        # Atomic: a record that exists is complete, also after SIGKILL.
        sfiles.write_bytes(self.out, f"{DIRNAME}/{name}", json.dumps(obj, sort_keys=True).encode())

    def header(self) -> dict[str, Any] | None:
        return self._read("header.json")

    def write_header(self, header: dict[str, Any]) -> None:
        self._write("header.json", header)

    def bad(self) -> dict[str, str]:
        return dict(self._read("bad.json") or {})

    def write_bad(self, bad: dict[str, str]) -> None:
        self._write("bad.json", bad)

    def shard(self, index: int) -> dict[str, Any] | None:
        return self._read(f"shard-{index:06d}.json")

    def write_shard(self, index: int, record: dict[str, Any]) -> None:
        self._write(f"shard-{index:06d}.json", record)
