"""The pathlib-like view of an object-store URL (:class:`URLPath`), and :func:`as_path`, which
picks it or a local ``Path``.

The run directory, checkpoints and reports use it, so the same code writes ``runs/<name>/`` on a
disk or in a bucket. Every call goes through :mod:`cellmorph.remote` (its retries and errors). A
put replaces an object whole (an object store's own atomic write); an append reads the object and
puts it back (the run's append-only files are small and written by one process, rank 0).
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Union

from cellmorph import remote


def as_path(path: str | os.PathLike | URLPath) -> Path | URLPath:
    """A local ``Path`` or a :class:`URLPath` for an object-store URL."""
    if isinstance(path, URLPath):
        return path
    text = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    if remote.is_url(text):
        return URLPath(text)
    return Path(text.removeprefix("file://"))


class URLPath:
    """The part of ``pathlib.Path`` cellmorph uses, for an object-store URL.

    Folders are key prefixes: ``mkdir`` does nothing and a folder exists while it holds an
    object. No ``__fspath__``: passing one to code that wants a local file fails loudly.
    """

    __slots__ = ("url",)

    def __init__(self, url: str):
        scheme, _, rest = str(url).partition("://")
        self.url = f"{scheme}://{rest.strip('/')}"

    # ------------------------------------------------------------------------ names
    def __truediv__(self, name: str | os.PathLike) -> URLPath:
        return URLPath(f"{self.url}/{str(name).strip('/')}")

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"URLPath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, URLPath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    @property
    def name(self) -> str:
        root, key = remote.split_url(self.url)
        return key.rsplit("/", 1)[-1] if key else root.partition("://")[2]

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix

    @property
    def stem(self) -> str:
        return Path(self.name).stem

    @property
    def parent(self) -> URLPath:
        root, key = remote.split_url(self.url)
        return URLPath(f"{root}/{key.rpartition('/')[0]}") if "/" in key else URLPath(root)

    @property
    def parents(self) -> list[URLPath]:
        out, p = [], self
        while remote.split_url(p.url)[1]:
            p = p.parent
            out.append(p)
        return out

    def with_name(self, name: str) -> URLPath:
        return self.parent / name

    def resolve(self) -> URLPath:
        return self

    def expanduser(self) -> URLPath:
        return self

    def is_absolute(self) -> bool:
        return True

    # ------------------------------------------------------------------------ queries
    def is_file(self) -> bool:
        return remote.size(self.url) is not None

    def is_dir(self) -> bool:
        store, key = remote._bucket(self.url)
        import obstore

        with remote.errors(self.url):
            found = obstore.list_with_delimiter(store, prefix=f"{key}/" if key else None)
        return bool(found["objects"] or found["common_prefixes"])

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def iterdir(self) -> Iterator[URLPath]:
        return (self / n for n in sorted(remote.children(self.url)))

    def glob(self, pattern: str) -> Iterator[URLPath]:
        return (self / n for n in sorted(remote.children(self.url)) if fnmatch.fnmatch(n, pattern))

    def rglob(self, pattern: str) -> Iterator[URLPath]:
        names = [n for n, _ in remote.list_objects(self.url)]
        return (self / n for n in sorted(names) if fnmatch.fnmatch(n.rsplit("/", 1)[-1], pattern))

    # ------------------------------------------------------------------------ bytes
    def read_bytes(self) -> bytes:
        return remote.read(self.url)

    def read_text(self, encoding: str = "utf-8") -> str:
        return remote.read(self.url).decode(encoding)

    def write_bytes(self, data: bytes) -> int:
        remote.write(self.url, bytes(data))
        return len(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(text.encode(encoding))

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: a prefix exists as soon as an object is put under it."""

    def unlink(self, missing_ok: bool = False) -> None:
        if missing_ok and not self.is_file():
            return
        remote.delete(self.url)

    def open(self, mode: str = "r", encoding: str | None = None) -> Any:
        """Read (``r``, ``rb``) the object, or write (``w``, ``wb``) or append (``a``, ``ab``)
        through a buffer put when the file is closed (an append rewrites the object)."""
        text = "b" not in mode
        if mode.strip("bt") == "r":
            raw = io.BytesIO(remote.read(self.url))
            return io.TextIOWrapper(raw, encoding=encoding or "utf-8") if text else raw
        if mode.strip("bt") not in ("w", "a"):
            raise ValueError(f"URLPath.open: mode {mode!r} is not supported")
        start = b""
        if mode.startswith("a"):
            with contextlib.suppress(remote.RemoteMissing):
                start = remote.read(self.url)
        buf = _PutOnClose(self.url, start)
        return io.TextIOWrapper(buf, encoding=encoding or "utf-8") if text else buf


class _PutOnClose(io.BytesIO):
    def __init__(self, url: str, start: bytes):
        super().__init__()
        self.url = url
        self.write(start)

    def close(self) -> None:
        if not self.closed:
            remote.write(self.url, self.getvalue())
        super().close()


AnyPath = Union[Path, URLPath]  # noqa: UP007 (a runtime alias for annotations)


@contextlib.contextmanager
def local_copy(path: AnyPath) -> Iterator[Path]:
    """A local file with ``path``'s bytes (``path`` itself when it is local)."""
    if not isinstance(path, URLPath):
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="cellmorph-") as d:
        local = Path(d) / path.name
        remote.download(path.url, local)
        yield local
