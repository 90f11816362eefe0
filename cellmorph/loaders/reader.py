"""Fast read path for ``store.images``: shard indexes parsed once, byte ranges, threaded decode.

zarr-python spends ~2-3 ms per call and reads random rows of a sharded array slowly
(docs/PLATFORM_NOTES.md). The zarr v3 sharding format is simple (:mod:`cellmorph.shardfile`
parses it); this reader understands exactly the layout the store writes (one image per inner
chunk, shards along the image axis only, ``bytes`` + one numcodecs-compatible compressor +
``crc32c``) and hands everything else to zarr-python, so its output always equals
``images[rows]``.

Every chunk read is checked as zarr would check it (its crc32c) and, for a store opened with
:func:`cellmorph.store.open_store`, also checked to be the chunk of the row asking for it (the
crc recorded in ``metadata.parquet``). A missing shard file, a hole in a shard, a truncated
file or a failed check stops with :class:`cellmorph.shardfile.StoreDamage` naming the file and
row, never a zero image. Files are opened through the store's folder descriptor, so a store
swapped in by ``convert --overwrite`` is never mixed with the one this reader started on.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numcodecs
import numpy as np
import zarr

from cellmorph.errors import CellmorphError
from cellmorph.shardfile import (
    EMPTY,
    StoreDamage,
    chunk_payload,
    index_range,
    layout_of,
    parse_index,
    shard_key,
)
from cellmorph.store import GENERATION, Store, StoreError, StoreFolder

# Chunks closer than this in a shard file are read with one pread (one syscall beats two).
_MERGE_GAP = 256 * 1024


def _local_root(arr: zarr.Array) -> str | None:
    from zarr.storage import LocalStore

    return str(arr.store.root) if isinstance(arr.store, LocalStore) else None


class ShardReader:
    """Reads rows of ``store.images`` fast and checked; output equals ``store.images[rows]``.

    Thread pool and open files are created lazily per process, so the reader survives fork
    (DataLoader workers share the folder descriptor) and pickling (DALI's spawned workers reopen
    the folder by path and refuse a different generation of the store).
    """

    def __init__(self, store: Store | zarr.Array, threads: int = 2):
        self.threads = max(1, int(threads))
        if isinstance(store, Store):
            self._arr, self._folder = store.images, store.folder
            self._expected: np.ndarray | None = store.chunk_crcs()
            self._layout = layout_of(self._arr) if self._folder is not None else None
            if self._layout is None or not self._layout.chunk_crc:
                raise StoreError(f"{store.path}: images are not laid out as cellmorph writes them")
        else:
            root = _local_root(store)
            self._arr, self._expected = store, None
            self._folder = StoreFolder(root) if root is not None else None
            self._layout = layout_of(store) if root is not None else None
        self._init_process_state()

    # ----------------------------------------------------------------- pickling / fork safety
    def _init_process_state(self) -> None:
        self._pid = os.getpid()
        self._pool: ThreadPoolExecutor | None = None
        self._fds: dict[int, int] = {}
        self._indexes: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        self._codec = numcodecs.get_codec(dict(self._layout.codec)) if self._layout else None

    def __getstate__(self) -> dict[str, Any]:
        if self._folder is None:
            return {"arr": self._arr, "threads": self.threads}
        generation = self._folder.attrs().get(GENERATION) if self._expected is not None else None
        return {"root": str(self._folder.path), "path": self._arr.path, "threads": self.threads,
                "expected": self._expected, "generation": generation}  # fmt: skip

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.threads = state["threads"]
        if "arr" in state:
            self._arr, self._folder, self._expected = state["arr"], None, None
            self._layout = None
        else:
            self._folder = StoreFolder(state["root"])
            generation = state["generation"]
            if generation is not None and generation != self._folder.attrs().get(GENERATION):
                raise StoreError(
                    f"{state['root']} was replaced (convert --overwrite?) after this process "
                    "started reading it; start again to read the new store"
                )
            self._arr = zarr.open_array(store=state["root"], path=state["path"] or None, mode="r")
            self._expected = state["expected"]
            self._layout = layout_of(self._arr)
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
        """Compressed chunk bytes, checked and without their crc32c (numcodecs framing
        included: an LZ4 chunk starts with its 4-byte size), in the order given."""
        self._check_process()
        if self._layout is None:
            raise CellmorphError(
                f"{self._root()}: raw chunks need a sharded store with a known codec"
            )
        rows = self._check_rows(rows)
        out: list[bytes] = []
        for r in rows.tolist():
            shard = r // self._layout.shard_rows
            off, n = self._entry(shard, r)
            raw = os.pread(self._fd(shard), n, off)
            if len(raw) != n:
                raise StoreDamage(
                    f"{self._where(shard, r)}: shard file shorter than its index says"
                )
            out.append(bytes(self._payload(memoryview(raw), shard, r)))
        return out

    # ---------------------------------------------------------------------------- helpers
    def _root(self) -> str:
        return str(self._folder.path) if self._folder else str(self._arr.store)

    def _where(self, shard: int, row: int | None = None) -> str:
        at = f" (row {row})" if row is not None else ""
        return f"{self._root()}: {shard_key(self._arr, shard)}{at}"

    def _check_rows(self, rows: Any) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).ravel()
        n = self.shape[0]
        if len(rows) and (rows.min() < 0 or rows.max() >= n):
            bad = rows[(rows < 0) | (rows >= n)][0]
            raise CellmorphError(f"{self._root()}: row {bad} outside the store (0..{n - 1})")
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

    def _fd(self, shard: int) -> int:
        """The open shard file; a missing one is damage (or a store deleted under us)."""
        if shard not in self._fds:
            with self._lock:
                if shard not in self._fds:
                    self._fds[shard] = self._folder.open_fd(shard_key(self._arr, shard))
        return self._fds[shard]

    def _index(self, shard: int) -> np.ndarray:
        """``(shard_rows, 2)`` uint64 (offset, nbytes), checked once per process."""
        if shard not in self._indexes:
            fd = self._fd(shard)
            size = os.fstat(fd).st_size
            start, n = index_range(self._layout, size)
            raw = os.pread(fd, n, start) if size >= n else b""
            self._indexes[shard] = parse_index(raw, self._layout, size, self._where(shard))
        return self._indexes[shard]

    def _entry(self, shard: int, row: int) -> tuple[int, int]:
        off, n = self._index(shard)[row - shard * self._layout.shard_rows]
        if off == EMPTY:
            raise StoreDamage(f"{self._where(shard, row)}: chunk missing from its shard")
        return int(off), int(n)

    def _payload(self, raw: memoryview, shard: int, row: int) -> memoryview:
        expected = int(self._expected[row]) if self._expected is not None else None
        return chunk_payload(raw, self._layout, expected, self._where(shard, row))

    def _read_fast(self, uniq: np.ndarray, out: np.ndarray, dest: np.ndarray) -> None:
        tasks = self._plan(uniq, dest)
        if self.threads == 1 or len(tasks) == 1:
            for t in tasks:
                self._run_task(*t, out)
            return
        for f in [self._pool_get().submit(self._run_task, *t, out) for t in tasks]:
            f.result()

    def _plan(self, uniq: np.ndarray, dest: np.ndarray) -> list[tuple]:
        """Tasks ``(shard, start, end, [(offset, nbytes, dest, row)])``: one pread each."""
        lay = self._layout
        per_task = max(1, math.ceil(len(uniq) / (2 * self.threads)))
        shards = uniq // lay.shard_rows
        tasks: list[tuple] = []
        for shard in np.unique(shards).tolist():
            sel = shards == shard
            rows = uniq[sel]
            ent = self._index(shard)[rows - shard * lay.shard_rows]
            empty = ent[:, 0] == EMPTY
            if empty.any():
                row = int(rows[empty][0])
                raise StoreDamage(f"{self._where(shard, row)}: chunk missing from its shard")
            order = np.argsort(ent[:, 0], kind="stable")
            chunks = list(zip(ent[order, 0].tolist(), ent[order, 1].tolist(),
                              dest[sel][order].tolist(), rows[order].tolist()))  # fmt: skip
            tasks.extend((shard, *t) for t in self._merge(chunks, per_task))
        return tasks

    @staticmethod
    def _merge(chunks: list[tuple[int, int, int, int]], per_task: int) -> list[tuple]:
        tasks: list[tuple] = []
        run: list[tuple[int, int, int, int]] = []
        for c in chunks:
            if run and (c[0] - (run[-1][0] + run[-1][1]) > _MERGE_GAP or len(run) >= per_task):
                tasks.append((run[0][0], run[-1][0] + run[-1][1], run))
                run = []
            run.append(c)
        if run:
            tasks.append((run[0][0], run[-1][0] + run[-1][1], run))
        return tasks

    def _run_task(self, shard: int, start: int, end: int, chunks: list, out: np.ndarray) -> None:
        buf = memoryview(os.pread(self._fd(shard), end - start, start))
        if len(buf) != end - start:
            raise StoreDamage(f"{self._where(shard)}: shard file shorter than its index says")
        for off, n, d, row in chunks:
            payload = self._payload(buf[off - start : off - start + n], shard, row)
            try:
                self._codec.decode(payload, out=out[d])
            except Exception as e:  # the decoder's own error: bytes that are not a valid frame
                raise StoreDamage(
                    f"{self._where(shard, row)}: chunk does not decode ({e})"
                ) from None
