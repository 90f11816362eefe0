"""The node-shared metadata cache: projected columns of metadata.parquet, memory-mapped.

N training processes of one user on a node map one Arrow file, so the page cache holds the
columns once. The file is trusted only as far as it is checked:

- its folder, ``$TMPDIR/cellmorph-metadata-<uid>``, is this user's alone: created 0700, and used
  only while it is a real folder owned by this user with no group or other permissions (in a
  world-writable /tmp another user could create it first); otherwise the columns stay in this
  process's memory, with one warning;
- its name is ``<key>.<crc32c>.arrow``: ``key`` names the store's verified ``metadata_digest``
  and the columns, ``crc32c`` is of the file's bytes as written, and every open checks the bytes
  of the mapped file against it (one pass; ~0.07 s for 0.3 GB), so a cache edited alone is
  caught, deleted and rebuilt from the store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import pandas as pd
import pyarrow as pa
import pyarrow.ipc as paipc
import pyarrow.parquet as pq

from cellmorph import atomic
from cellmorph.shardfile import crc32c
from cellmorph.store.layout import CHUNK_CRC, DIGEST, REQUIRED_COLUMNS

# One folder per user: another user's folder of the same name is never used (see above).
SHARED_CACHE = f"cellmorph-metadata-{os.getuid()}"
CACHE_MAX_AGE_S = 7 * 24 * 3600

log = logging.getLogger(__name__)
_warned: set[str] = set()


def shared_columns(file: IO[bytes], attrs: dict[str, Any], columns: Sequence[str]) -> pd.DataFrame:
    """The columns as a DataFrame over a memory-mapped Arrow file: the page cache holds them
    once per node however many processes read them. Without a private temporary folder, an
    in-memory copy. ``file`` is metadata.parquet, already checked against ``attrs``."""
    names = _wanted(file, attrs, columns)
    key = hashlib.blake2b(json.dumps([attrs[DIGEST], names]).encode(), digest_size=12)
    folder = cache_folder()
    table = _mapped(folder, key.hexdigest()) if folder is not None else None
    if table is None:
        file.seek(0)
        table = pq.read_table(file, columns=names)
        if folder is not None:
            try:
                table = _map(_write_cache(folder, key.hexdigest(), table))
            except OSError as e:
                log.warning("metadata stays in this process: cannot write in %s (%s)", folder, e)
    return table.to_pandas(split_blocks=True)  # zero-copy: columns stay in the mapped file


def _wanted(file: IO[bytes], attrs: dict[str, Any], columns: Sequence[str]) -> list[str]:
    """Every reader's columns, then ``columns``, as far as the file has them (file order)."""
    negcon = str(attrs.get("negcon") or "").partition("=")[0]
    wanted = {*REQUIRED_COLUMNS, CHUNK_CRC, negcon, *columns}
    file.seek(0)
    return [c for c in pq.ParquetFile(file).schema_arrow.names if c in wanted]


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def cache_folder() -> Path | None:
    """This user's private cache folder, created if need be; None when it cannot be trusted."""
    path = Path(tempfile.gettempdir()) / SHARED_CACHE
    try:
        path.mkdir(mode=0o700, exist_ok=True)  # the umask can only take permissions away
        st = os.lstat(path)
    except OSError as e:
        _warn_once(f"metadata stays in this process: cannot use {path} ({e.strerror or e})")
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        what = "not a folder" if not stat.S_ISDIR(st.st_mode) else (
            f"owned by uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}")  # fmt: skip
        _warn_once(
            f"metadata stays in this process: {path} is {what}, not private to this user "
            f"(uid {os.getuid()}, mode 700), so its files are not trusted; remove it to share "
            "the metadata between this node's processes again"
        )
        return None
    return path


def _checksum(buf: Any) -> str:
    return f"{crc32c(buf):08x}"


def _map(path: Path) -> pa.Table:
    """The Arrow table of a cache file, its columns in the mapped file (not copied)."""
    return paipc.open_file(pa.memory_map(str(path)).read_buffer()).read_all()


def _mapped(folder: Path, key: str) -> pa.Table | None:
    """The cache file of ``key`` whose bytes match its recorded checksum, mapped; None when
    there is none (a file that fails the check is deleted: it is rebuilt from the store)."""
    for path in sorted(folder.glob(f"{key}.*.arrow")):
        try:
            buf = pa.memory_map(str(path)).read_buffer()
            if _checksum(buf) == path.name.split(".")[1]:
                table = paipc.open_file(buf).read_all()
                with contextlib.suppress(OSError):
                    os.utime(path)  # in use: kept by the clean-up of stale files
                return table
        except (OSError, pa.ArrowException):
            pass  # unreadable: as damaged
        log.warning("%s fails its checksum (edited or damaged): rebuilt from the store", path)
        with contextlib.suppress(OSError):
            path.unlink()
    return None


def _write_cache(folder: Path, key: str, table: pa.Table) -> Path:
    """Write ``table`` as ``<key>.<crc32c of the file>.arrow``; returns its path."""
    table = table.combine_chunks()  # one chunk per column: pandas can then wrap it, not copy
    tmp = atomic.temp_path(folder / f"{key}.arrow")
    try:
        with paipc.new_file(str(tmp), table.schema) as w:
            w.write_table(table)
        path = folder / f"{key}.{_checksum(pa.memory_map(str(tmp)).read_buffer())}.arrow"
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    now = time.time()
    for old in folder.glob("*.arrow"):  # caches of stores nobody opened for a week
        with contextlib.suppress(OSError):
            if now - old.stat().st_mtime > CACHE_MAX_AGE_S:
                old.unlink()
    return path
