"""Where a store's files live: a local folder or an object-store prefix, behind one handle.

:func:`open_folder` gives a :class:`Folder` for a path or URL; readers (``open_store``, the shard
reader, ``inspect --verify``) ask it for whole files, byte ranges and suffixes, so no reader
branches on where the bytes come from. A handle is one *generation* of the store:

- :class:`StoreFolder` (local) holds the folder open by a directory descriptor, so a store swapped
  in by ``convert --overwrite`` is never mixed with the one a reader started on, and takes a
  shared ``flock`` that tells the converter this generation still has readers.
- :class:`RemoteFolder` (``s3://``...) has nothing to hold open and no lock: the generation read
  at open is the one it keeps to, and :meth:`Folder.replaced` checks it.

The plain functions below (``read_file``, ``write_file``, ``path_kind``...) are the same calls
for writers, which work on paths, not generations.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from cellmorph import atomic, remote
from cellmorph.errors import CellmorphError
from cellmorph.remote import is_url
from cellmorph.shardfile import StoreDamage
from cellmorph.store.layout import GENERATION, StoreError
from cellmorph.urlpath import AnyPath, URLPath, as_path

Ranges = list[tuple[int, int]]


class Folder:
    """One generation of a store's folder, for reading. Subclasses supply the bytes."""

    path: AnyPath
    generation: str | None = None
    #: whether a local disk cache of fetched ranges saves anything (object stores)
    worth_caching = False

    def read(self, name: str) -> bytes:
        raise NotImplementedError

    def open_file(self, name: str) -> IO[bytes]:
        """A seekable binary file of ``name`` (for parquet readers)."""
        return io.BytesIO(self.read(name))

    def size(self, name: str) -> int:
        raise NotImplementedError

    def read_ranges(self, name: str, ranges: Ranges) -> list[bytes]:
        """``[start, end)`` ranges of one file (an object store fetches them concurrently)."""
        raise NotImplementedError

    def read_suffix(self, name: str, n: int) -> tuple[bytes, int]:
        """The last ``n`` bytes of a file and the file's size."""
        raise NotImplementedError

    def names(self) -> set[str]:
        raise NotImplementedError

    def replaced(self) -> bool:
        """True when this generation was deleted or another one took its place."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the handle holds."""

    def attrs(self) -> dict[str, Any]:
        """The group attributes of this generation."""
        try:
            attrs = dict(json.loads(self.read("zarr.json")).get("attributes") or {})
        except StoreError:
            raise
        except (ValueError, AttributeError):
            raise StoreError(f"{self.path}/zarr.json is not valid zarr metadata") from None
        if self.generation is None:
            self.generation = attrs.get(GENERATION)
        return attrs

    def missing(self, name: str) -> StoreError:
        """The error for a file that is not there: the store was replaced, or is damaged."""
        if self.replaced():
            return StoreError(
                f"{self.path} was replaced or deleted while this process was reading it "
                "(convert --overwrite?); start again to read the new store"
            )
        return StoreDamage(
            f"{self.path}: {name} is missing (damaged store: convert again with --overwrite)"
        )


class StoreFolder(Folder):
    """A local store folder held open by a directory descriptor (see the module docstring).

    Forked processes share the descriptor, its lock and the open files (``pread`` has no
    offset to share); spawned ones open the folder again by path.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            raise StoreError(f"{self.path}: no such store") from None
        except NotADirectoryError:
            raise StoreError(f"{self.path} is a file, not a store (a folder)") from None
        except OSError as e:
            raise StoreError(f"{self.path}: cannot open the store ({e.strerror})") from None
        with contextlib.suppress(OSError):  # best effort: some filesystems have no flock
            fcntl.flock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        self._pid = os.getpid()
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _open(self, name: str) -> int:
        """A descriptor of the regular file ``name`` (a folder opens too, then fails to read)."""
        try:
            fd = os.open(name, os.O_RDONLY, dir_fd=self.fd)
        except FileNotFoundError:
            raise self.missing(name) from None
        except OSError as e:  # e.g. a path through a file (NotADirectoryError)
            raise StoreDamage(f"{self.path}: cannot open {name} ({e.strerror})") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise StoreDamage(f"{self.path}: {name} is a folder or special file, not a file "
                              "(damaged store: convert again with --overwrite)")  # fmt: skip
        return fd

    def _fd(self, name: str) -> int:
        """An open descriptor of ``name``, kept for later reads (shard files)."""
        fd = self._fds.get(name)
        if fd is None:
            with self._lock:
                if name not in self._fds:
                    self._fds[name] = self._open(name)
                fd = self._fds[name]
        return fd

    def read(self, name: str) -> bytes:
        with os.fdopen(self._open(name), "rb") as f:
            return f.read()

    def open_file(self, name: str) -> IO[bytes]:
        return os.fdopen(self._open(name), "rb")

    def size(self, name: str) -> int:
        return os.fstat(self._fd(name)).st_size

    def read_ranges(self, name: str, ranges: Ranges) -> list[bytes]:
        fd = self._fd(name)
        out = [os.pread(fd, end - start, start) for start, end in ranges]
        if any(len(b) != end - start for b, (start, end) in zip(out, ranges)):
            raise StoreDamage(f"{self.path}: {name} is shorter than its index says (truncated)")
        return out

    def read_suffix(self, name: str, n: int) -> tuple[bytes, int]:
        fd = self._fd(name)
        size = os.fstat(fd).st_size
        return (os.pread(fd, n, size - n) if size >= n else b""), size

    def names(self) -> set[str]:
        return set(os.listdir(self.fd))

    def replaced(self) -> bool:
        return os.fstat(self.fd).st_nlink == 0

    def close(self) -> None:
        if self.fd >= 0 and self._pid == os.getpid():
            for fd in self._fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            os.close(self.fd)
        self._fds = {}
        self.fd = -1

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class RemoteFolder(Folder):
    """A store under an object-store prefix (see the module docstring).

    A store converted again at the same URL has another ``generation``; a chunk then fails the
    crc32c recorded in the metadata this reader loaded, and :meth:`replaced` says why.
    """

    worth_caching = True

    def __init__(self, url: str | URLPath):
        self.path = URLPath(str(url))
        self.url = self.path.url

    def _call(self, name: str, fn: Callable[[str], Any]) -> Any:
        try:
            return fn(f"{self.url}/{name}")
        except remote.RemoteMissing:
            raise self.missing(name) from None

    def read(self, name: str) -> bytes:
        return self._call(name, remote.read)

    def size(self, name: str) -> int:
        found = remote.size(f"{self.url}/{name}")
        if found is None:
            raise self.missing(name)
        return found

    def read_ranges(self, name: str, ranges: Ranges) -> list[bytes]:
        starts, ends = [a for a, _ in ranges], [b for _, b in ranges]
        return self._call(name, lambda url: remote.read_ranges(url, starts, ends))

    def read_suffix(self, name: str, n: int) -> tuple[bytes, int]:
        return self._call(name, lambda url: remote.read_suffix(url, n))

    def names(self) -> set[str]:
        names = remote.children(self.url)
        if not names:
            raise StoreError(f"{self.url}: no such store (no objects under this prefix)")
        return names

    def replaced(self) -> bool:
        data = read_file(self.url, "zarr.json")
        if data is None:
            return True
        current = (json.loads(data).get("attributes") or {}).get(GENERATION)
        return self.generation is not None and current != self.generation


def check_outside_store(path: str | AnyPath, store: str | AnyPath, setting: str) -> None:
    """Refuse ``path`` (the value of ``setting``) when it is the store or inside it: ``convert
    --overwrite`` replaces the whole folder (or prefix) and would delete it. Opens no file."""
    root = as_path(store).expanduser().resolve()
    target = as_path(path).expanduser().resolve()  # symlinks followed: where it really is
    if type(root) is type(target) and (target == root or root in target.parents):
        raise CellmorphError(
            f"{setting}: {path} is inside the store {store}; a later convert --overwrite of "
            f"the store would delete it: choose another {setting}"
        )


def open_folder(path: str | AnyPath) -> Folder:
    """The handle for a store at a local path (``file://`` allowed) or an object-store URL."""
    if is_url(path):
        return RemoteFolder(str(path))
    return StoreFolder(str(path).removeprefix("file://"))


# --------------------------------------------------------------------------- writers' calls


def local(path: str | AnyPath) -> Path:
    return Path(str(path).removeprefix("file://"))


def write_file(path: str | AnyPath, name: str, write: Callable[[Any], Any]) -> None:
    """Write ``<store>/<name>`` atomically with ``write(target)``: a temporary file + rename
    locally, one put for URLs (``s3://``...), where a put is already all-or-nothing."""
    if is_url(path):
        buf = io.BytesIO()
        write(buf)
        remote.write(f"{str(path).rstrip('/')}/{name}", buf.getvalue())
        return
    atomic.write_with(local(path) / name, write)


def write_bytes(path: str | AnyPath, name: str, data: bytes) -> None:
    """Write ``<store>/<name>`` (any file the store keeps beside its arrays) atomically."""
    write_file(
        path, name, lambda f: f.write(data) if hasattr(f, "write") else Path(f).write_bytes(data)
    )


def read_file(path: str | AnyPath, name: str) -> bytes | None:
    """The bytes of ``<store>/<name>``, or None when there is no such file."""
    target = f"{str(path).rstrip('/')}/{name}"
    try:
        return remote.read(target) if is_url(path) else Path(target).read_bytes()
    except FileNotFoundError:
        return None


def path_kind(path: str | AnyPath) -> str:
    """``absent``, ``file`` or ``folder`` (a URL prefix holding objects is a folder)."""
    if is_url(path):
        p = URLPath(str(path))
        return "file" if p.is_file() else "folder" if p.is_dir() else "absent"
    p = local(path)
    return "folder" if p.is_dir() else "file" if p.exists() else "absent"


def folder_names(path: str | AnyPath) -> set[str]:
    """The names directly inside a folder (or URL prefix)."""
    if is_url(path):
        return remote.children(str(path))
    return set(os.listdir(local(path)))


def remove_folder(path: str | AnyPath) -> None:
    """Delete a folder (or every object under a URL prefix) and everything in it."""
    if is_url(path):
        remote.delete_tree(str(path))
        return
    import shutil

    shutil.rmtree(local(path))


def make_folder(path: str | AnyPath) -> None:
    """Create a local folder (a URL prefix needs nothing)."""
    if not is_url(path):
        local(path).mkdir(parents=True, exist_ok=True)


def zarr_store(path: str | AnyPath, read_only: bool = False) -> Any:
    """What zarr opens for ``path``: the local folder's path, or an obstore-backed store for a
    URL (ranged reads, retries; the same client the fast reader uses)."""
    if not is_url(path):
        return str(path).removeprefix("file://")
    from zarr.storage import ObjectStore

    return ObjectStore(remote.store_at(str(path)), read_only=read_only)
