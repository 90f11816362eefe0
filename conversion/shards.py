"""Running conversion tasks and writing one shard: what every kind of store (fields or cells)
shares.

- A :data:`Mapper` runs tasks inline, in a local process pool (:class:`ProcessMapper`), or as Ray
  tasks (``ray_jobs.convert``), keeping only a few in flight.
- :func:`write_shard` writes a shard's block in one write (the file's bytes encoded by
  :mod:`cellmorph.shardfile`, as zarr would write them), reads it back and records it in the
  manifest (data first, so a record means done and verified), under the store's owner check.
- :func:`corrected` divides a site's planes by their illumination functions, counting what the
  division saturated.
- :func:`read_rows` reads rows back from the shard files (``finish``'s sample for the
  channel percentiles), each chunk checked.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any, Protocol, TypeVar

import numpy as np

from cellmorph import shardfile
from cellmorph.errors import CellmorphError
from cellmorph.loaders import stats as sstats
from cellmorph.store import files as sfiles
from cellmorph.store import layout as slayout
from cellmorph.store import write as swrite
from conversion import ownership
from conversion.manifest import Manifest
from conversion.ownership import Owner
from conversion.tiffs import apply_illum

T = TypeVar("T")
R = TypeVar("R")
# map_unordered(fn, tasks) -> results as they finish (inline, process pool, or Ray). Tasks come
# from an iterator and a mapper keeps only a few in flight: a task carries its sites' paths, and
# all of them at once would be the whole plan as Python objects (GBs at millions of sites).
Mapper = Callable[[Callable[[T], R], Iterable[T]], Iterator[R]]
IN_FLIGHT_PER_WORKER = 4
SATURATED = 65535  # the largest stored value: anything above is clipped to it


@dataclass(frozen=True)
class ShardResult:
    index: int
    count: int
    failures: dict[int, str] = field(default_factory=dict)  # row within shard -> reason
    abandoned: bool = False  # another run owns the store now: nothing was written


class Written(Protocol):
    """What :func:`write_shard` needs of a shard's task."""

    out: str
    index: int
    start: int
    key: str
    owner: Owner | None


def inline_map(fn: Callable[[T], R], tasks: Iterable[T]) -> Iterator[R]:
    """Run tasks one after another in this process."""
    return (fn(t) for t in tasks)


class ProcessMapper:
    """A local process pool (forkserver: safe next to threads started by zarr or Ray)."""

    def __init__(self, workers: int) -> None:
        ctx = get_context("forkserver")
        # Workers fork from a server that already imported the packing code: fast start.
        ctx.set_forkserver_preload(["conversion.pack"])
        # Workers are the forkserver's children; each ends when this process ends, and each
        # takes this process's environment as it is now: the forkserver keeps the one it
        # started with, which may predate the credentials or endpoint set since.
        self.workers = workers
        self.window = workers * IN_FLIGHT_PER_WORKER
        self.pool = ProcessPoolExecutor(
            workers,
            mp_context=ctx,
            initializer=_init_worker,
            initargs=(os.getpid(), dict(os.environ)),
        )

    def __call__(self, fn: Callable[[T], R], tasks: Iterable[T]) -> Iterator[R]:
        todo = iter(tasks)
        running: dict[Future, T] = {}  # in flight -> its task, to name it if a worker dies
        try:
            while True:
                for t in itertools.islice(todo, self.window - len(running)):
                    running[self.pool.submit(fn, t)] = t
                if not running:
                    return
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    try:
                        result = fut.result()
                    except BrokenProcessPool:
                        raise dead_worker(_unfinished(running), self.workers) from None
                    del running[fut]
                    yield result
        finally:
            for fut in running:
                fut.cancel()

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


def describe_task(task: Any) -> str:
    """What a pool task holds, in words: a shard's rows and files, or a probe's sites."""
    if hasattr(task, "describe"):  # a shard's task (sites or cells) says what it holds
        return str(task.describe())
    if isinstance(task, list) and task and isinstance(task[0], tuple) and len(task[0]) > 1:
        files = [item[1][0][0] for item in task if item[1]] or ["no file"]
        return f"header checks of {len(task)} site(s) ({files[0]} .. {files[-1]})"
    return repr(task)[:200]


def _unfinished(running: dict[Future, T]) -> list[T]:
    """The tasks of a broken pool that had not finished, in the order they were submitted (a
    task that finished before the break is not a suspect)."""
    return [t for f, t in running.items() if not f.done() or f.exception() is not None]


def dead_worker(unfinished: list[Any], workers: int) -> CellmorphError:
    """The stop for a pool worker that died: the tasks the workers held (the pool hands tasks
    out in order, so the oldest unfinished ones; the dead worker's is among them), and why."""
    held = "; ".join(describe_task(t) for t in unfinished[:workers])
    waiting = len(unfinished) - workers
    queued = f" ({waiting} more task(s) were waiting)" if waiting > 0 else ""
    return CellmorphError(
        f"a conversion worker died (killed by the system, most likely for memory) while the "
        f"workers held: {held}{queued}. A very large image is the usual cause: lower "
        "--max-pixels so such files are quarantined from their header (convert again with "
        "--overwrite), or use fewer --workers (the rerun keeps the shards already written)"
    )


def _init_worker(parent: int, environ: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(environ)
    ownership.die_with(parent)


@functools.lru_cache(maxsize=64)
def illum_function(path: str) -> np.ndarray:
    """An illumination function as float32 (cached: a worker divides many sites by it)."""
    return np.load(path).astype(np.float32)


def corrected(raw: list[np.ndarray], illum: list[str],
              saturated: np.ndarray | None = None) -> list[np.ndarray]:  # fmt: skip
    """``raw`` divided by its illumination functions (float32), or ``raw`` when there are none.

    ``saturated`` (per channel) gains the pixels the division pushed past 65535, which the
    store clips: a function on the wrong scale would otherwise whiten cells without a word."""
    if not illum:
        return raw
    img = apply_illum(raw, [illum_function(p) for p in illum])
    if saturated is not None:
        saturated += [np.count_nonzero((c > SATURATED) & (r < SATURATED))
                      for r, c in zip(raw, img)]  # fmt: skip
    return img


_VALUES = np.arange(65536, dtype=np.float64)
_LOGS = np.log1p(_VALUES)
# value, square, log1p, its square: the per-channel moments of sstats.sums_by_group, as rows.
_MOMENT_ROWS = np.stack([_VALUES, _VALUES**2, _LOGS, _LOGS**2])


# Rows counted per np.bincount call: bincount first copies its input as int64, and for a
# few rows that copy stays in the CPU's cache (a whole shard's copy goes through memory:
# ~2x the time for 1024 crops of 5 x 96 x 96).
COUNT_ROWS = 32


def value_counts(images: np.ndarray) -> np.ndarray:
    """(C, 65536) int64: how many pixels of each channel of ``images`` ((N, C, H, W) uint16)
    hold each value; counted a few rows at a time."""
    counts = np.zeros((images.shape[1], 65536), dtype=np.int64)
    for start in range(0, len(images), COUNT_ROWS):
        part = images[start : start + COUNT_ROWS]
        for c in range(images.shape[1]):
            counts[c] += np.bincount(part[:, c].ravel(), minlength=65536)
    return counts


def sums_by_histogram(block: np.ndarray, groups: list[str]) -> dict[str, dict[str, Any]]:
    """:func:`cellmorph.loaders.stats.sums_by_group`'s sums through a histogram of the uint16
    values: one counting pass instead of four float64 copies of the block (a cell store's
    shard is 1024 crops: the float path took as long as decoding their sites). The same sums,
    added in another order (equal to ~1e-15 relative)."""
    keys = np.asarray(groups)
    out: dict[str, dict[str, Any]] = {}
    for key in dict.fromkeys(groups):
        sel = keys == key
        rows = block if sel.all() else block[sel]
        counts = value_counts(rows).astype(np.float64)
        moments = counts @ _MOMENT_ROWS.T  # (C, 4)
        out[key] = {"n": int(sel.sum()),
                    **{m: moments[:, i].tolist() for i, m in enumerate(sstats.MOMENTS)}}  # fmt: skip
    return out


def write_shard(task: Written, block: np.ndarray, groups: list[str], saturated: np.ndarray,
                pixels: int, histogram: bool = False) -> ShardResult:  # fmt: skip
    """Write ``block`` as rows ``task.start ..`` in one write, read the file back (the bytes
    written, every chunk's crc32c), then record the shard with its images' checksums,
    per-group sums (``histogram``: counted, for many small images) and the correction's
    saturation."""
    n = len(block)
    arr = swrite.open_images(task.out)
    with ownership.writing(task.owner) as ours:
        if not ours:  # this writer outlived its run: the store belongs to another run now
            return ShardResult(task.index, 0, abandoned=True)
        swrite.discard_shard(task.out, arr, task.index)
        written = swrite.write_shard_file(task.out, arr, task.index, block)
        record = {
            "key": task.key,
            "start": task.start,
            "checksums": [slayout.image_checksum(b) for b in block],
            "chunk_crcs": swrite.shard_chunk_crcs(task.out, arr, task.index, n, written),
            "sums": (sums_by_histogram if histogram else sstats.sums_by_group)(block, groups),
            "saturated": saturated.tolist(),  # per channel, by the illumination correction
            "pixels": pixels,  # per channel, of the raw images the correction divided
        }
        Manifest(task.out).write_shard(task.index, record)
    return ShardResult(task.index, n)


def read_rows(out: str, images: Any, rows: np.ndarray) -> np.ndarray:
    """``images[rows]`` ((len(rows), C, H, W)) of a store being written, decoded from its shard
    files by :mod:`cellmorph.shardfile` (each chunk's crc32c checked): zarr-python takes ~3 ms
    a row. A layout that module cannot read is read through zarr."""
    layout = shardfile.layout_of(images)
    if layout is None or not layout.chunk_crc or images.dtype != np.uint16:
        return np.stack([images[int(i)] for i in rows])
    import numcodecs

    codec, codec_id = numcodecs.get_codec(dict(layout.codec)), layout.codec["id"]
    block = np.empty((len(rows), *images.shape[1:]), dtype=images.dtype)
    folder = sfiles.open_folder(out)
    try:
        shards = np.asarray(rows, dtype=np.int64) // layout.shard_rows
        for shard in np.unique(shards).tolist():
            key = shardfile.shard_key(images, shard)
            where = f"{out}/{key}"
            size = folder.size(key)
            start, n = shardfile.index_range(layout, size)
            [raw] = folder.read_ranges(key, [(start, start + n)])
            index = shardfile.parse_index(raw, layout, size, where)
            mine = np.flatnonzero(shards == shard)
            entries = [index[int(rows[j]) - shard * layout.shard_rows] for j in mine]
            if any(e[0] == shardfile.EMPTY for e in entries):
                raise shardfile.StoreDamage(f"{where}: a sampled chunk was not written")
            ranges = [(int(off), int(off + nbytes)) for off, nbytes in entries]
            for j, chunk in zip(mine, folder.read_ranges(key, ranges)):
                at = f"{where} (row {int(rows[j])})"
                payload = shardfile.chunk_payload(memoryview(chunk), layout, None, at)
                shardfile.decode_into(codec, codec_id, payload, block[j], at)
    finally:
        folder.close()
    return block
