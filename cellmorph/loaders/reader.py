"""Fast read path for ``store.images``: shard indexes parsed once, byte ranges, threaded decode.

zarr-python spends ~2-3 ms per call and reads random rows of a sharded array slowly
(docs/platform-notes.md). The zarr v3 sharding format is simple (:mod:`cellmorph.shardfile`
parses it); this reader understands exactly the layout the store writes (one image per inner
chunk, shards along the image axis only, ``bytes`` + one numcodecs-compatible compressor +
``crc32c``) and hands everything else to zarr-python, so its output always equals
``images[rows]``.

Every chunk read is checked as zarr would check it (its crc32c) and, for a store opened with
:func:`cellmorph.store.read.open_store`, also checked to be the chunk of the row asking for it
(the crc recorded in ``metadata.parquet``). A missing shard file, a hole in a shard, a
truncated file or a failed check stops with :class:`cellmorph.shardfile.StoreDamage` naming the
file and row, never a zero image.

The bytes come from the store's :class:`cellmorph.store.files.Folder` handle, the same for a
local folder (``pread`` through the folder's descriptor, so a store swapped in by ``convert
--overwrite`` is never mixed in) and an object store (one suffix request per shard for its
index, then one concurrent ranged request per shard per batch). Where the handle says a cache
is worth it (an object store) and ``cache_dir`` is set, fetched ranges are kept on local disk
(:mod:`cellmorph.loaders.cache`) and checked like fetched bytes when read again.
"""

from __future__ import annotations

import contextlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numcodecs
import numpy as np
import zarr

from cellmorph.errors import CellmorphError
from cellmorph.loaders.cache import ShardCache
from cellmorph.shardfile import (
    EMPTY,
    StoreDamage,
    check_declared_size,
    chunk_payload,
    decode_into,
    index_range,
    layout_of,
    parse_index,
    shard_key,
)
from cellmorph.store.files import StoreFolder, open_folder, zarr_store
from cellmorph.store.layout import GENERATION, StoreError
from cellmorph.store.read import Store

# Chunks closer than this in a shard file are read as one range (one request beats two).
_MERGE_GAP = 256 * 1024
# Threads per process for a store whose reads wait on the network, not the CPU.
NETWORK_THREADS = 16

Chunk = tuple[int, int, int, int]  # (offset, nbytes, destination, row)
Task = tuple[int, int, int, list[Chunk]]  # (shard, start, end, chunks): one byte range


def _local_root(arr: zarr.Array) -> str | None:
    from zarr.storage import LocalStore

    return str(arr.store.root) if isinstance(arr.store, LocalStore) else None


class ShardReader:
    """Reads rows of ``store.images`` fast and checked; output equals ``store.images[rows]``.

    Thread pool and open files are created lazily per process, so the reader survives fork
    (DataLoader workers share the folder descriptor) and pickling (DALI's spawned workers reopen
    the folder by path and refuse a different generation of the store).
    """

    def __init__(self, store: Store | zarr.Array, threads: int = 2, cache_dir: str | None = None,
                 cache_bytes: int = 0):  # fmt: skip
        self.threads = max(1, int(threads))
        self.cache_dir, self.cache_bytes = cache_dir, int(cache_bytes)
        if isinstance(store, Store):
            self._arr, self._folder = store.images, store.folder
            self._expected: np.ndarray | None = store.chunk_crcs()
            self._layout = layout_of(self._arr) if self._folder is not None else None
            if self._layout is None or not self._layout.chunk_crc or self._arr.dtype != np.uint16:
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
        self._indexes: dict[int, np.ndarray] = {}
        self._sizes: dict[int, int] = {}  # shard file sizes
        self._codec = numcodecs.get_codec(dict(self._layout.codec)) if self._layout else None
        self._cache: ShardCache | None = None
        folder = self._folder
        if folder is not None and folder.worth_caching and self.cache_dir and self.cache_bytes:
            folder.attrs()  # the generation names the cache's folder
            self._cache = ShardCache(self.cache_dir, folder.generation or "unknown",
                                     self.cache_bytes)  # fmt: skip
        self.fetched_bytes = 0  # from the store's files, not the cache, in this process

    def __getstate__(self) -> dict[str, Any]:
        if self._folder is None:
            return {"arr": self._arr, "threads": self.threads}
        generation = self._folder.attrs().get(GENERATION) if self._expected is not None else None
        return {"root": str(self._folder.path), "path": self._arr.path, "threads": self.threads,
                "expected": self._expected, "generation": generation,
                "cache": (self.cache_dir, self.cache_bytes)}  # fmt: skip

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.threads = state["threads"]
        self.cache_dir, self.cache_bytes = state.get("cache", (None, 0))
        if "arr" in state:
            self._arr, self._folder, self._expected = state["arr"], None, None
            self._layout = None
        else:
            root = state["root"]
            self._folder = open_folder(root)
            generation = state["generation"]
            if generation is not None and generation != self._folder.attrs().get(GENERATION):
                raise StoreError(
                    f"{root} was replaced (convert --overwrite?) after this process "
                    "started reading it; start again to read the new store"
                )
            self._arr = zarr.open_array(store=zarr_store(root, read_only=True),
                                        path=state["path"] or None, mode="r")  # fmt: skip
            self._expected = state["expected"]
            self._layout = layout_of(self._arr)
        self._init_process_state()

    def _check_process(self) -> None:
        if self._pid != os.getpid():  # forked: threads are not ours
            self._init_process_state()

    def close(self) -> None:
        """Release threads (also done at garbage collection); the store's handle stays open."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
        if self._cache is not None:
            self._cache.close()

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
        # Uninitialized, as every byte is then written: each chunk's decode fills its image
        # whole or raises (decode_into), zarr fills its slices, duplicates are copied.
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
            task = (shard, off, off + n, [(off, n, 0, r)])
            raw = self._fetch(shard, [task])[0]
            payload = self._payload(memoryview(raw), shard, r)
            # The GPU inflates into a buffer of one image: the frame must declare exactly that.
            check_declared_size(self._layout.codec["id"], payload, self._image_nbytes,
                                self._where(shard, r))  # fmt: skip
            out.append(bytes(payload))
        return out

    @property
    def _image_nbytes(self) -> int:
        return math.prod(self.shape[1:]) * self._arr.dtype.itemsize

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
            threads = max(self.threads, NETWORK_THREADS if self._folder.worth_caching else 1)
            self._pool = ThreadPoolExecutor(threads, thread_name_prefix="shard-reader")
        return self._pool

    def _read_zarr(self, uniq: np.ndarray, out: np.ndarray, dest: np.ndarray) -> None:
        """Fallback: contiguous runs as slices (far cheaper than ``oindex`` on shards)."""
        breaks = np.nonzero(np.diff(uniq) != 1)[0] + 1
        for run, d in zip(np.split(uniq, breaks), np.split(dest, breaks)):
            out[d] = self._arr[int(run[0]) : int(run[-1]) + 1]

    def _index(self, shard: int) -> np.ndarray:
        """``(shard_rows, 2)`` uint64 (offset, nbytes), checked once per process."""
        if shard not in self._indexes:
            key, n = shard_key(self._arr, shard), self._layout.index_nbytes
            found = self._cached_index(key, n)
            if found is None:
                if self._layout.index_at_end:
                    raw, size = self._folder.read_suffix(key, n)
                else:
                    size = self._folder.size(key)
                    raw = self._folder.read_ranges(key, [(0, min(n, size))])[0]
                found = (raw, size)
                if self._cache is not None:
                    self._cache.write(key, size, index_range(self._layout, size)[0], raw)
            raw, size = found
            self._indexes[shard] = parse_index(raw, self._layout, size, self._where(shard))
            self._sizes[shard] = size
        return self._indexes[shard]

    def _cached_index(self, key: str, n: int) -> tuple[bytes, int] | None:
        """The shard's index from the local cache, when it holds all of it intact."""
        size = self._cache.size(key) if self._cache is not None else None
        if size is None or size < n:
            return None
        start, _ = index_range(self._layout, size)
        raw = self._cache.read(key, start, start + n)
        if raw is None:
            return None
        try:
            parse_index(raw, self._layout, size, key)
        except StoreDamage:  # not (fully) cached yet: fetch it
            return None
        return raw, size

    def _entry(self, shard: int, row: int) -> tuple[int, int]:
        off, n = self._index(shard)[row - shard * self._layout.shard_rows]
        if off == EMPTY:
            raise StoreDamage(f"{self._where(shard, row)}: chunk missing from its shard")
        return int(off), int(n)

    def _payload(self, raw: memoryview, shard: int, row: int) -> memoryview:
        expected = int(self._expected[row]) if self._expected is not None else None
        return chunk_payload(raw, self._layout, expected, self._where(shard, row))

    def _plan(self, uniq: np.ndarray, dest: np.ndarray) -> list[Task]:
        """One task per byte range to read: nearby chunks of a shard merged, at most enough
        chunks per task that every thread gets work."""
        lay = self._layout
        per_task = max(1, math.ceil(len(uniq) / (2 * self.threads)))
        shards = uniq // lay.shard_rows
        tasks: list[Task] = []
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
    def _merge(chunks: list[Chunk], per_task: int) -> list[tuple[int, int, list[Chunk]]]:
        tasks: list[tuple[int, int, list[Chunk]]] = []
        run: list[Chunk] = []
        for c in chunks:
            if run and (c[0] - (run[-1][0] + run[-1][1]) > _MERGE_GAP or len(run) >= per_task):
                tasks.append((run[0][0], run[-1][0] + run[-1][1], run))
                run = []
            run.append(c)
        if run:
            tasks.append((run[0][0], run[-1][0] + run[-1][1], run))
        return tasks

    def _read_fast(self, uniq: np.ndarray, out: np.ndarray, dest: np.ndarray) -> None:
        """Each shard's ranges in one call to the handle (one request for an object store),
        then every task checked and decoded; shards and tasks run in the thread pool."""
        tasks = self._plan(uniq, dest)
        by_shard: dict[int, list[Task]] = {}
        for t in tasks:
            by_shard.setdefault(t[0], []).append(t)
        if self.threads == 1 and not self._folder.worth_caching or len(tasks) == 1:
            for shard, group in by_shard.items():
                self._decode_all(group, self._fetch(shard, group), out)
            return
        pool = self._pool_get()
        fetched = {s: pool.submit(self._fetch, s, group) for s, group in by_shard.items()}
        jobs = [pool.submit(self._decode, t, memoryview(buf), out)
                for s, group in by_shard.items()
                for t, buf in zip(group, fetched[s].result())]  # fmt: skip
        try:
            for job in jobs:
                job.result()
        except StoreDamage:
            if self._folder.replaced():  # converted again meanwhile: say so, not "damaged"
                raise self._folder.missing("images") from None
            raise

    def _decode_all(self, tasks: list[Task], bufs: list[bytes], out: np.ndarray) -> None:
        for t, buf in zip(tasks, bufs):
            self._decode(t, memoryview(buf), out)

    def _decode(self, task: Task, buf: memoryview, out: np.ndarray) -> None:
        shard, start, _end, chunks = task
        codec_id = self._layout.codec["id"]
        for off, n, d, row in chunks:
            payload = self._payload(buf[off - start : off - start + n], shard, row)
            decode_into(self._codec, codec_id, payload, out[d], self._where(shard, row))

    def _fetch(self, shard: int, tasks: list[Task]) -> list[bytes]:
        """The byte ranges of ``tasks`` (one shard): sound ones from the cache, the rest from
        the store's files in one call (kept in the cache)."""
        key = shard_key(self._arr, shard)
        got: list[bytes | None] = [None] * len(tasks)
        if self._cache is not None:
            self._index(shard)  # the file's size, for the sparse cache file
            for i, t in enumerate(tasks):
                cached = self._cache.read(key, t[1], t[2])
                if cached is not None and self._sound(t, cached):
                    got[i] = cached
        todo = [i for i, g in enumerate(got) if g is None]
        if todo:
            fresh = self._folder.read_ranges(key, [(tasks[i][1], tasks[i][2]) for i in todo])
            self.fetched_bytes += sum(len(b) for b in fresh)
            for i, data in zip(todo, fresh):
                got[i] = data
                if self._cache is not None:
                    self._cache.write(key, self._sizes[shard], tasks[i][1], data)
        return got  # type: ignore[return-value]

    def _sound(self, task: Task, buf: bytes) -> bool:
        """Whether cached bytes hold every chunk of ``task`` intact (else fetched again)."""
        view, (shard, start, _end, chunks) = memoryview(buf), task
        try:
            for off, n, _d, row in chunks:
                self._payload(view[off - start : off - start + n], shard, row)
        except StoreDamage:
            return False
        return True
