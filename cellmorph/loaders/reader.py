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

A store at a URL (``s3://...``) is read the same way over the network: each shard's index once
(one suffix request, which also gives the file's size), then, per batch, one concurrent
ranged request per shard for the chunks it needs. With ``cache_dir`` the fetched ranges are
kept on local disk (:mod:`cellmorph.loaders.cache`) and later epochs read them from there.
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
from cellmorph.loaders.cache import ShardCache
from cellmorph.shardfile import (
    EMPTY,
    StoreDamage,
    chunk_payload,
    index_range,
    layout_of,
    parse_index,
    shard_key,
)
from cellmorph.store import GENERATION, RemoteFolder, Store, StoreError, StoreFolder, zarr_store

# Chunks closer than this in a shard file are read with one pread (one syscall beats two).
_MERGE_GAP = 256 * 1024
# A URL store: concurrent requests per process (they wait on the network, not the CPU).
REMOTE_THREADS = 16


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
            if self._layout is None or not self._layout.chunk_crc:
                raise StoreError(f"{store.path}: images are not laid out as cellmorph writes them")
        else:
            root = _local_root(store)
            self._arr, self._expected = store, None
            self._folder = StoreFolder(root) if root is not None else None
            self._layout = layout_of(store) if root is not None else None
        self._init_process_state()

    # ----------------------------------------------------------------- pickling / fork safety
    @property
    def remote(self) -> bool:
        return isinstance(self._folder, RemoteFolder)

    def _init_process_state(self) -> None:
        self._pid = os.getpid()
        self._pool: ThreadPoolExecutor | None = None
        self._fds: dict[int, int] = {}
        self._indexes: dict[int, np.ndarray] = {}
        self._sizes: dict[int, int] = {}  # remote shard file sizes
        self._lock = threading.Lock()
        self._codec = numcodecs.get_codec(dict(self._layout.codec)) if self._layout else None
        self._cache: ShardCache | None = None
        self.fetched_bytes = 0  # from the object store, in this process

    def __getstate__(self) -> dict[str, Any]:
        if self._folder is None:
            return {"arr": self._arr, "threads": self.threads}
        generation = self._folder.attrs().get(GENERATION) if self._expected is not None else None
        return {"root": str(self._folder.path), "path": self._arr.path, "threads": self.threads,
                "expected": self._expected, "generation": generation, "remote": self.remote,
                "cache": (self.cache_dir, self.cache_bytes)}  # fmt: skip

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.threads = state["threads"]
        self.cache_dir, self.cache_bytes = state.get("cache", (None, 0))
        if "arr" in state:
            self._arr, self._folder, self._expected = state["arr"], None, None
            self._layout = None
        else:
            root = state["root"]
            self._folder = RemoteFolder(root) if state.get("remote") else StoreFolder(root)
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
            chunk = [(off, n, 0, r)]
            raw = self._bytes(shard, off, off + n, chunk)
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
            if self.remote:
                self._indexes[shard] = self._remote_index(shard)
                return self._indexes[shard]
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
        if self.remote:
            self._read_remote(tasks, out)
            return
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
        self._decode(shard, start, buf, chunks, out)

    def _decode(self, shard: int, start: int, buf: memoryview, chunks: list,
                out: np.ndarray) -> None:  # fmt: skip
        for off, n, d, row in chunks:
            payload = self._payload(buf[off - start : off - start + n], shard, row)
            try:
                self._codec.decode(payload, out=out[d])
            except Exception as e:  # the decoder's own error: bytes that are not a valid frame
                raise StoreDamage(
                    f"{self._where(shard, row)}: chunk does not decode ({e})"
                ) from None

    # ------------------------------------------------------------------- a store at a URL
    def _url(self, shard: int) -> str:
        return f"{self._folder.url}/{shard_key(self._arr, shard)}"  # type: ignore[union-attr]

    def _cache_get(self) -> ShardCache | None:
        if self._cache is None and self.cache_dir and self.cache_bytes > 0:
            generation = self._folder.generation or "unknown"  # type: ignore[union-attr]
            self._cache = ShardCache(self.cache_dir, generation, self.cache_bytes)
        return self._cache

    def _remote_index(self, shard: int) -> np.ndarray:
        """The shard's index from the cache, else one suffix request (which gives the size)."""
        key, n, where = shard_key(self._arr, shard), self._layout.index_nbytes, self._where(shard)
        cache = self._cache_get()
        size = cache.size(key) if cache else None
        if size is not None:
            start, _ = index_range(self._layout, size)
            raw = cache.read(key, start, start + n) if size >= n else None
            if raw is not None:
                with contextlib.suppress(StoreDamage):  # not (fully) cached yet: fetch it
                    index = parse_index(raw, self._layout, size, where)
                    self._sizes[shard] = size
                    return index
        raw, size = self._fetch_index(shard, n)
        self._sizes[shard] = size
        start, _ = index_range(self._layout, size)
        index = parse_index(raw, self._layout, size, where)
        if cache:
            cache.write(key, size, start, raw)
        return index

    def _fetch_index(self, shard: int, n: int) -> tuple[bytes, int]:
        from cellmorph import remote

        url = self._url(shard)
        try:
            if self._layout.index_at_end:
                return remote.read_suffix(url, n)
            size = remote.size(url)
            if size is None:
                raise remote.RemoteMissing(url)
            return remote.read_ranges(url, [0], [min(n, size)])[0], size
        except remote.RemoteMissing:
            raise self._folder.missing(shard_key(self._arr, shard)) from None  # type: ignore[union-attr]

    def _fetch(self, shard: int, ranges: list[tuple[int, int]]) -> list[bytes]:
        """Ranges of one shard file from the object store (concurrent), kept in the cache."""
        from cellmorph import remote

        try:
            got = remote.read_ranges(
                self._url(shard), [a for a, _ in ranges], [b for _, b in ranges]
            )
        except remote.RemoteMissing:
            raise self._folder.missing(shard_key(self._arr, shard)) from None  # type: ignore[union-attr]
        self.fetched_bytes += sum(len(g) for g in got)
        cache = self._cache_get()
        if cache:
            key = shard_key(self._arr, shard)
            for (a, _), data in zip(ranges, got):
                cache.write(key, self._sizes[shard], a, data)
        return got

    def _bytes(self, shard: int, start: int, end: int, chunks: list) -> bytes:
        """``[start, end)`` of a shard file, whose ``chunks`` are checked (raw reads)."""
        if not self.remote:
            raw = os.pread(self._fd(shard), end - start, start)
            if len(raw) != end - start:
                raise StoreDamage(f"{self._where(shard)}: shard file shorter than its index says")
            return raw
        self._index(shard)
        cache = self._cache_get()
        cached = cache.read(shard_key(self._arr, shard), start, end) if cache else None
        if cached is not None and self._sound(shard, start, cached, chunks):
            return cached
        return self._fetch(shard, [(start, end)])[0]

    def _sound(self, shard: int, start: int, buf: bytes, chunks: list) -> bool:
        """Whether cached bytes hold every chunk intact (else they are fetched again)."""
        view = memoryview(buf)
        try:
            for off, n, _d, row in chunks:
                self._payload(view[off - start : off - start + n], shard, row)
        except StoreDamage:
            return False
        return True

    def _read_remote(self, tasks: list[tuple], out: np.ndarray) -> None:
        """Cached ranges from local disk; the rest with one concurrent request per shard;
        then every chunk checked and decoded in threads."""
        for shard in {t[0] for t in tasks}:
            self._index(shard)
        cache = self._cache_get()
        bufs: list[bytes | None] = [None] * len(tasks)
        if cache:
            for i, (shard, start, end, chunks) in enumerate(tasks):
                got = cache.read(shard_key(self._arr, shard), start, end)
                if got is not None and self._sound(shard, start, got, chunks):
                    bufs[i] = got
        missing: dict[int, list[int]] = {}
        for i, t in enumerate(tasks):
            if bufs[i] is None:
                missing.setdefault(t[0], []).append(i)
        pool = self._remote_pool()
        futures = {
            shard: pool.submit(self._fetch, shard, [(tasks[i][1], tasks[i][2]) for i in idx])
            for shard, idx in missing.items()
        }
        for shard, fut in futures.items():
            for i, data in zip(missing[shard], fut.result()):
                bufs[i] = data
        jobs = [pool.submit(self._decode, t[0], t[1], memoryview(b), t[3], out)
                for t, b in zip(tasks, bufs)]  # fmt: skip
        try:
            for f in jobs:
                f.result()
        except StoreDamage:
            if self._folder.replaced():  # type: ignore[union-attr]  # converted again meanwhile
                raise self._folder.missing("images") from None  # type: ignore[union-attr]
            raise

    def _remote_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max(self.threads, REMOTE_THREADS),
                                            thread_name_prefix="shard-fetch")  # fmt: skip
        return self._pool
