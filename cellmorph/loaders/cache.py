"""A local disk cache of a URL store's shard files (``loader.cache_dir``), bounded in size.

Each cached shard is a sparse local file of the remote file's size, at
``<cache_dir>/<store generation>/<shard key>``; byte ranges are written at their own offsets as
they are fetched. Nothing records which ranges are present: every chunk and every shard index
carries its own crc32c and the metadata records each chunk's, so the reader checks what it reads
here exactly as it checks what it fetches, and fetches again whatever fails (a hole reads as
zeros and fails). So several processes (loader workers, ranks on one node) can fill one cache
without locks, a killed writer leaves nothing that could be mistaken for data, and another
generation of the store never mixes in (its folder has another name).

The cache stops growing at ``limit`` bytes of disk (as the filesystem counts blocks, measured
again every :data:`RESCAN_BYTES` written); a full cache still serves what it holds. Folders of
other generations (older conversions, other stores) are removed, least recently used first,
when the cache is over its limit at start.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from pathlib import Path

RESCAN_BYTES = 64 << 20
BLOCK = 4096


def disk_usage(root: Path) -> int:
    """Bytes of disk the files under ``root`` occupy (sparse holes are free)."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(dirpath, name)).st_blocks * 512
    return total


class ShardCache:
    """The cached shard files of one store generation, in one process."""

    def __init__(self, root: str | Path, generation: str, limit: int):
        self.root = Path(root).expanduser()
        self.folder = self.root / generation
        self.limit = int(limit)
        self.folder.mkdir(parents=True, exist_ok=True)
        os.utime(self.folder)  # most recently used: evicted last
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self.used = self._evict_others()
        self._since_scan = 0
        self.hit_bytes = 0
        self.stored_bytes = 0

    def _evict_others(self) -> int:
        used = disk_usage(self.root)
        if used <= self.limit:
            return used
        others = [p for p in self.root.iterdir() if p.is_dir() and p != self.folder]
        for old in sorted(others, key=lambda p: p.stat().st_mtime):
            shutil.rmtree(old, ignore_errors=True)
            used = disk_usage(self.root)
            if used <= self.limit:
                break
        return used

    def _fd(self, key: str, size: int | None) -> int | None:
        """The open cache file of ``key`` (created sparse at ``size`` when given)."""
        if key in self._fds:
            return self._fds[key]
        path = self.folder / key
        with self._lock:
            if key in self._fds:
                return self._fds[key]
            if size is None and not path.is_file():
                return None
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            if size is not None and os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)  # sparse: takes no disk until ranges are written
            self._fds[key] = fd
            return fd

    def size(self, key: str) -> int | None:
        """The shard file's size when this cache has seen it (no request needed)."""
        fd = self._fd(key, None)
        return os.fstat(fd).st_size if fd is not None else None

    def read(self, key: str, start: int, end: int) -> bytes | None:
        """``[start, end)`` of a cached shard, or None where nothing was written at ``start``.
        The bytes are unchecked: a caller verifies them and fetches again on failure."""
        fd = self._fd(key, None)
        if fd is None:
            return None
        try:
            if os.lseek(fd, start, os.SEEK_DATA) != start:
                return None  # a hole: never fetched
        except OSError:  # ENXIO: no data at or after start
            return None
        data = os.pread(fd, end - start, start)
        if len(data) != end - start:
            return None
        self.hit_bytes += len(data)
        return data

    def write(self, key: str, size: int, start: int, data: bytes) -> None:
        """Keep fetched bytes, unless the cache is full."""
        # Disk is taken in blocks: a range may touch one more block at each end.
        cost = (len(data) // BLOCK + 2) * BLOCK
        if self.used + cost > self.limit:
            return
        fd = self._fd(key, size)
        os.pwrite(fd, data, start)
        self.stored_bytes += len(data)
        self.used += cost
        self._since_scan += cost
        if self._since_scan > RESCAN_BYTES:  # other processes fill it too
            self._since_scan = 0
            self.used = disk_usage(self.root)

    def close(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
