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

import numpy as np
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
    if table is None and folder is not None:
        try:
            table = _map(_write_cache(folder, key.hexdigest(), file, names))
        except OSError as e:
            log.warning("metadata stays in this process: cannot write in %s (%s)", folder, e)
    if table is None:
        file.seek(0)
        table = pq.read_table(file, columns=names)
    return table.to_pandas(split_blocks=True)  # zero-copy: columns stay in the mapped file


def _gather(file: IO[bytes], names: list[str], scratch: Path) -> pa.Table:
    """The columns ``names`` of the parquet ``file`` as a one-chunk table whose buffers map
    files in ``scratch``, read a row group at a time. Columns of other types than fixed-width
    values and text (booleans, nested...) are read whole: a label column at most."""
    file.seek(0)
    pf = pq.ParquetFile(file)
    if pf.num_row_groups == 0:
        return pq.read_table(file, columns=names).combine_chunks()
    columns: list[_ScratchColumn | None] = []
    for g in range(pf.num_row_groups):
        part = pf.read_row_group(g, columns=names)
        if g == 0:  # the schema read_table gives, with its pandas metadata
            schema = part.schema
            columns = [_ScratchColumn.start(scratch / str(i), f.type, pf.metadata.num_rows)
                       for i, f in enumerate(schema)]  # fmt: skip
        for column, values in zip(columns, part.columns):
            if column is not None:
                column.append(values)
        del part
    arrays = []
    for name, column in zip(names, columns):
        if column is None:
            file.seek(0)
            arrays.append(pq.read_table(file, columns=[name]).column(0).combine_chunks())
        else:
            arrays.append(column.finish())
    return pa.Table.from_batches([pa.RecordBatch.from_arrays(arrays, schema=schema)])


class _ScratchColumn:
    """One column appended chunk by chunk to files (values or offsets, and text) that are
    then mapped: the buffers ``combine_chunks`` would build, outside private memory."""

    def __init__(self, folder: Path, type_: pa.DataType, rows: int, width: int,
                 offsets: type[np.integer] | None):  # fmt: skip
        self.type, self.rows, self.width, self.offsets = type_, rows, width, offsets
        self.valid = np.ones(rows, dtype=bool)
        size = width * (rows if offsets is None else rows + 1)  # offsets: one more than rows
        self.values = np.memmap(folder / "values", np.uint8, "w+", shape=max(size, 1))
        self.text = folder / "text"  # text columns' bytes, appended
        self.at = self.base = 0  # rows written; text bytes written

    @classmethod
    def start(cls, folder: Path, type_: pa.DataType, rows: int) -> _ScratchColumn | None:
        """A column of fixed-width values or text; None for any other type."""
        folder.mkdir()
        if pa.types.is_large_string(type_) or pa.types.is_large_binary(type_):
            return cls(folder, type_, rows, 8, np.int64)
        if pa.types.is_string(type_) or pa.types.is_binary(type_):
            return cls(folder, type_, rows, 4, np.int32)
        if pa.types.is_primitive(type_) and not pa.types.is_boolean(type_):
            return cls(folder, type_, rows, type_.bit_width // 8, None)
        return None

    def append(self, values: pa.ChunkedArray) -> None:
        for chunk in values.chunks:
            k, buffers, at = len(chunk), chunk.buffers(), self.at
            if chunk.null_count:
                self.valid[at : at + k] = chunk.is_valid().to_numpy(zero_copy_only=False)
            if self.offsets is None:
                w = self.width
                raw = np.frombuffer(buffers[1], np.uint8)[chunk.offset * w :][: k * w]
                self.values[at * w : (at + k) * w] = raw
            elif k:
                off = np.frombuffer(buffers[1], self.offsets)[chunk.offset :][: k + 1]
                ends = off[1:].astype(np.int64) - off[0] + self.base
                if ends[-1] > np.iinfo(self.offsets).max:
                    raise pa.ArrowInvalid(f"a {self.type} column holds more text than it can")
                self.values.view(self.offsets)[at + 1 : at + k + 1] = ends
                if buffers[2] is not None:
                    with open(self.text, "ab") as f:
                        f.write(memoryview(buffers[2])[off[0] : off[-1]])
                self.base = int(ends[-1])
            self.at += k

    def finish(self) -> pa.Array:
        """The column as one array over the mapped files."""
        nulls = self.rows - int(np.count_nonzero(self.valid))
        validity = pa.py_buffer(np.packbits(self.valid, bitorder="little")) if nulls else None
        self.values.flush()
        buffers = [validity, pa.py_buffer(self.values)]
        if self.offsets is not None:
            text = pa.memory_map(str(self.text)).read_buffer() if self.base else pa.py_buffer(b"")
            buffers.append(text)
        return pa.Array.from_buffers(self.type, self.rows, buffers, null_count=nulls)


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


def _write_cache(folder: Path, key: str, file: IO[bytes], names: list[str]) -> Path:
    """Write the columns ``names`` of ``file`` as ``<key>.<crc32c of the file>.arrow`` (one
    record batch: pandas can then wrap its columns, not copy them); returns its path.

    The columns are gathered a row group at a time into scratch files beside it and written
    from their mapping, so their bytes are never in this process's private memory (reading
    them whole, then joining their chunks, took ~200 bytes a row: ~15 GB at 75 M)."""
    tmp = atomic.temp_path(folder / f"{key}.arrow")
    try:
        with tempfile.TemporaryDirectory(dir=folder, prefix=".scratch-") as scratch:
            table = _gather(file, names, Path(scratch))
            with paipc.new_file(str(tmp), table.schema) as w:
                w.write_table(table)
            del table  # its buffers map the scratch files, removed next
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
