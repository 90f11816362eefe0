"""Fast read path for ``store.images``: shard indexes parsed once, byte ranges, threaded decode.

zarr-python spends ~2-3 ms per call and reads random rows of a sharded array slowly
(docs/PLATFORM_NOTES.md). The zarr v3 sharding format is simple: each shard file holds the
compressed inner chunks and an index of ``(offset, nbytes)`` uint64 pairs per inner chunk
(``2**64-1`` twice for a chunk that was never written), at the end or start of the file, followed
by a crc32c when the index codecs include it. This reader understands exactly the layout the
store writes (one image per inner chunk, shards along the image axis only, ``bytes`` + one
numcodecs-compatible compressor) and hands everything else to zarr-python, so its output always
equals ``images[rows]``.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import zarr

from cellmorph.errors import CellmorphError
from cellmorph.store import Store

_EMPTY = np.uint64(2**64 - 1)
# Chunks closer than this in a shard file are read with one pread (one syscall beats two).
_MERGE_GAP = 256 * 1024


@dataclass(frozen=True)
class _Layout:
    """What the fast path needs to know about a sharded array (derived from its metadata)."""

    root: Path
    shard_rows: int
    chunk_shape: tuple[int, ...]
    codec: dict[str, Any]  # numcodecs config of the chunk compressor
    index_at_end: bool
    index_crc: bool


def _numcodecs_config(codec: Any) -> dict[str, Any] | None:
    """The numcodecs config that decodes chunks written by this zarr v3 codec, if any."""
    from zarr.codecs import BloscCodec, ZstdCodec

    if isinstance(codec, BloscCodec):
        return {"id": "blosc"}  # Blosc frames describe themselves; no parameters needed.
    if isinstance(codec, ZstdCodec):
        return {"id": "zstd"}
    name = getattr(codec, "codec_name", "")
    if name in ("numcodecs.lz4", "numcodecs.zstd", "numcodecs.blosc"):
        return dict(codec.codec_config)
    return None


def _layout(arr: zarr.Array) -> _Layout | None:
    """The fast-path layout of ``arr``, or None when zarr-python must read it."""
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
    from zarr.storage import LocalStore

    meta = arr.metadata
    if getattr(meta, "zarr_format", None) != 3 or not isinstance(arr.store, LocalStore):
        return None
    if len(meta.codecs) != 1 or not isinstance(meta.codecs[0], ShardingCodec):
        return None
    sc = meta.codecs[0]
    shard = tuple(meta.chunk_grid.chunk_shape)
    inner = tuple(sc.chunk_shape)
    # One image per inner chunk and shards along the image axis only.
    if inner[0] != 1 or inner[1:] != tuple(arr.shape[1:]) or shard[1:] != inner[1:]:
        return None
    if len(sc.codecs) != 2 or not isinstance(sc.codecs[0], BytesCodec):
        return None
    if sc.codecs[0].endian is not None and sc.codecs[0].endian.value != "little":
        return None
    codec = _numcodecs_config(sc.codecs[1])
    idx = list(sc.index_codecs)
    if codec is None or not idx or not isinstance(idx[0], BytesCodec):
        return None
    if idx[0].endian is not None and idx[0].endian.value != "little":
        return None
    if len(idx) > 2 or (len(idx) == 2 and not isinstance(idx[1], Crc32cCodec)):
        return None
    return _Layout(
        root=Path(str(arr.store.root)) / arr.path,
        shard_rows=int(shard[0]),
        chunk_shape=inner[1:],
        codec=codec,
        index_at_end=sc.index_location.value == "end",
        index_crc=len(idx) == 2,
    )


class ShardReader:
    """Reads rows of ``store.images`` fast; output equals ``store.images[rows]`` exactly.

    Thread pool and open files are created lazily per process, so the reader survives fork
    (DataLoader workers) and pickling (DALI's spawned workers reopen the array by path).
    """

    def __init__(self, store: Store | zarr.Array, threads: int = 2):
        self._arr = store.images if isinstance(store, Store) else store
        self.threads = max(1, int(threads))
        self._layout = _layout(self._arr)
        self._init_process_state()

    # ----------------------------------------------------------------- pickling / fork safety
    def _init_process_state(self) -> None:
        self._pid = os.getpid()
        self._pool: ThreadPoolExecutor | None = None
        self._fds: dict[int, int | None] = {}
        self._indexes: dict[int, np.ndarray | None] = {}
        self._lock = threading.Lock()
        self._codec = numcodecs.get_codec(dict(self._layout.codec)) if self._layout else None
        self._fill = np.full(self.shape[1:], self._arr.fill_value or 0, dtype=self._arr.dtype)

    def __getstate__(self) -> dict[str, Any]:
        from zarr.storage import LocalStore

        if isinstance(self._arr.store, LocalStore):
            arr: Any = (str(self._arr.store.root), self._arr.path)
        else:
            arr = self._arr
        return {"arr": arr, "threads": self.threads}

    def __setstate__(self, state: dict[str, Any]) -> None:
        arr = state["arr"]
        if isinstance(arr, tuple):
            arr = zarr.open_array(store=arr[0], path=arr[1] or None, mode="r")
        self._arr = arr
        self.threads = state["threads"]
        self._layout = _layout(arr)
        self._init_process_state()

    def _check_process(self) -> None:
        if self._pid != os.getpid():  # forked: threads and file offsets are not ours
            self._init_process_state()

    def close(self) -> None:
        """Release threads and file descriptors (also done at garbage collection)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
        for fd in self._fds.values():
            if fd is not None:
                os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            # at interpreter shutdown modules may be gone already
            with contextlib.suppress(Exception):
                self.close()

    # ----------------------------------------------------------------------------- public
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._arr.shape)

    @property
    def fast(self) -> bool:
        """True when rows are read through the shard index (False: zarr-python fallback)."""
        return self._layout is not None

    @property
    def codec_id(self) -> str | None:
        """numcodecs id of the chunk compressor on the fast path (``lz4`` allows GPU inflate)."""
        return self._layout.codec["id"] if self._layout else None

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Decoded images ``(len(rows), C, H, W)`` uint16, in the order given."""
        self._check_process()
        rows = self._check_rows(rows)
        out = np.empty((len(rows), *self.shape[1:]), dtype=self._arr.dtype)
        if len(rows) == 0:
            return out
        uniq, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
        if self._layout is None:
            self._read_zarr(uniq, out, first)
        else:
            self._read_fast(uniq, out, first)
        src = first[inverse]
        dup = np.nonzero(src != np.arange(len(rows)))[0]
        if len(dup):
            out[dup] = out[src[dup]]
        return out

    def read_raw(self, rows: np.ndarray) -> list[bytes]:
        """Compressed chunk bytes as stored (numcodecs framing included), in the order given."""
        self._check_process()
        if self._layout is None:
            raise CellmorphError(
                f"{self._layout_root()}: raw chunks need a sharded store with a known codec"
            )
        rows = self._check_rows(rows)
        out: list[bytes] = []
        for r in rows.tolist():
            shard, inner = divmod(r, self._layout.shard_rows)
            index = self._index(shard)
            if index is None or index[inner, 0] == _EMPTY:
                out.append(bytes(self._codec.encode(self._fill)))
                continue
            off, n = (int(v) for v in index[inner])
            out.append(os.pread(self._fd(shard), n, off))
        return out

    # ---------------------------------------------------------------------------- helpers
    def _layout_root(self) -> str:
        return str(getattr(self._arr.store, "root", self._arr.store))

    def _check_rows(self, rows: Any) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).ravel()
        n = self.shape[0]
        if len(rows) and (rows.min() < 0 or rows.max() >= n):
            bad = rows[(rows < 0) | (rows >= n)][0]
            raise CellmorphError(f"{self._layout_root()}: row {bad} outside the store (0..{n - 1})")
        return rows

    def _pool_get(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="shard-reader")
        return self._pool

    def _read_zarr(self, uniq: np.ndarray, out: np.ndarray, dest: np.ndarray) -> None:
        """Fallback: contiguous runs as slices (far cheaper than ``oindex`` on shards)."""
        breaks = np.nonzero(np.diff(uniq) != 1)[0] + 1
        for run, d in zip(np.split(uniq, breaks), np.split(dest, breaks)):
            out[d] = self._arr[int(run[0]) : int(run[-1]) + 1]

    def _fd(self, shard: int) -> int | None:
        if shard not in self._fds:
            with self._lock:
                if shard not in self._fds:
                    key = self._arr.metadata.encode_chunk_key(
                        (shard,) + (0,) * (self._arr.ndim - 1)
                    )
                    path = self._layout.root / key
                    self._fds[shard] = os.open(path, os.O_RDONLY) if path.is_file() else None
        return self._fds[shard]

    def _index(self, shard: int) -> np.ndarray | None:
        """``(shard_rows, 2)`` uint64 (offset, nbytes), or None for a shard never written."""
        if shard in self._indexes:
            return self._indexes[shard]
        fd = self._fd(shard)
        index = None
        if fd is not None:
            lay = self._layout
            nbytes = lay.shard_rows * 16 + (4 if lay.index_crc else 0)
            start = os.fstat(fd).st_size - nbytes if lay.index_at_end else 0
            raw = os.pread(fd, nbytes, start)
            if len(raw) != nbytes:
                raise CellmorphError(f"{lay.root}: shard {shard} is truncated")
            if lay.index_crc:
                import google_crc32c

                crc = int.from_bytes(raw[-4:], "little")
                if google_crc32c.value(raw[:-4]) != crc:
                    raise CellmorphError(f"{lay.root}: shard {shard} index fails its crc32c")
            index = np.frombuffer(raw, dtype="<u8", count=lay.shard_rows * 2).reshape(-1, 2)
        self._indexes[shard] = index
        return index

    def _read_fast(self, uniq: np.ndarray, out: np.ndarray, dest: np.ndarray) -> None:
        tasks = self._plan(uniq, dest, out)
        if self.threads == 1 or len(tasks) == 1:
            for t in tasks:
                self._run_task(*t, out)
            return
        for f in [self._pool_get().submit(self._run_task, *t, out) for t in tasks]:
            f.result()

    def _plan(self, uniq: np.ndarray, dest: np.ndarray, out: np.ndarray) -> list[tuple]:
        """Tasks ``(fd, start, end, [(offset, nbytes, dest)])``: one pread each, merged runs."""
        lay = self._layout
        per_task = max(1, math.ceil(len(uniq) / (2 * self.threads)))
        shards = uniq // lay.shard_rows
        tasks: list[tuple] = []
        for shard in np.unique(shards):
            sel = shards == shard
            index = self._index(int(shard))
            inner = uniq[sel] - shard * lay.shard_rows
            dsel = dest[sel]
            if index is None:
                out[dsel] = self._fill
                continue
            ent = index[inner]
            empty = ent[:, 0] == _EMPTY
            out[dsel[empty]] = self._fill
            ent, dsel = ent[~empty], dsel[~empty]
            order = np.argsort(ent[:, 0], kind="stable")
            chunks = list(zip(ent[order, 0].tolist(), ent[order, 1].tolist(), dsel[order].tolist()))
            tasks.extend(self._merge(self._fd(int(shard)), chunks, per_task))
        return tasks

    @staticmethod
    def _merge(fd: int, chunks: list[tuple[int, int, int]], per_task: int) -> list[tuple]:
        tasks: list[tuple] = []
        run: list[tuple[int, int, int]] = []
        for c in chunks:
            if run and (c[0] - (run[-1][0] + run[-1][1]) > _MERGE_GAP or len(run) >= per_task):
                tasks.append((fd, run[0][0], run[-1][0] + run[-1][1], run))
                run = []
            run.append(c)
        if run:
            tasks.append((fd, run[0][0], run[-1][0] + run[-1][1], run))
        return tasks

    def _run_task(self, fd: int, start: int, end: int, chunks: list, out: np.ndarray) -> None:
        buf = memoryview(os.pread(fd, end - start, start))
        if len(buf) != end - start:
            raise CellmorphError(f"{self._layout.root}: shard file shorter than its index says")
        for off, n, d in chunks:
            self._codec.decode(buf[off - start : off - start + n], out=out[d])
