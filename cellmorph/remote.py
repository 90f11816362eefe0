"""Object-store URLs (``s3://bucket/key``, ``gs://``, ``az://``, ``memory://``) through obstore.

One client per bucket and process; every call retries timeouts, dropped connections and 5xx
answers with exponential backoff (:data:`RETRY`), and stops on anything else with a one-line
:class:`RemoteError` naming the URL (a missing bucket or key, refused credentials). Endpoint and
credentials come from the standard variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``; ``GOOGLE_*``, ``AZURE_*``) or
the machine's role, read by obstore; nothing here stores, logs or prints them.

:class:`URLPath` is the pathlib-like view the run directory, checkpoints and reports use, so the
same code writes ``runs/<name>/`` on a disk or in a bucket. A put replaces an object whole (an
object store's own atomic write); an append reads the object and puts it back (the run's
append-only files are small and written by one process, rank 0).
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, Union

from cellmorph.errors import CellmorphError

# Transient faults (timeouts, resets, 5xx, 429) are retried: 8 tries, 0.1 s doubling to 10 s,
# for at most 3 minutes in all. Other answers (403, 404...) are not: they are mistakes.
RETRY = {
    "max_retries": 8,
    "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=10),
                "base": 2},
    "retry_timeout": timedelta(minutes=3),
}  # fmt: skip
TIMEOUTS = {"connect_timeout": "10s", "timeout": "120s"}
ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT")


class RemoteError(CellmorphError):
    """An object-store request that failed for a reason retrying cannot fix; names the URL."""


class RemoteMissing(RemoteError, FileNotFoundError):
    """The object does not exist; also a FileNotFoundError for callers that treat a missing
    file as "not yet written"."""


class NoSuchBucket(RemoteError):
    """The bucket does not exist: a mistake in the URL or the endpoint, never "not yet written"."""


def is_url(path: Any) -> bool:
    """True for an object-store URL; ``file://`` and plain paths are local."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def as_path(path: str | os.PathLike | URLPath) -> Path | URLPath:
    """A local ``Path`` or a :class:`URLPath` for an object-store URL."""
    if isinstance(path, URLPath):
        return path
    text = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    if is_url(text):
        return URLPath(text)
    return Path(text.removeprefix("file://"))


def split_url(url: str) -> tuple[str, str]:
    """``("s3://bucket", "key/inside")`` for ``s3://bucket/key/inside``."""
    scheme, _, rest = str(url).partition("://")
    bucket, _, key = rest.partition("/")
    return f"{scheme}://{bucket}", key.strip("/")


def _client_options() -> dict[str, Any]:
    endpoint = next((os.environ[v] for v in ENDPOINT_VARS if os.environ.get(v)), "")
    # A plain-http endpoint (a local S3 server, MinIO on a private network) must be allowed.
    return {**TIMEOUTS, "allow_http": endpoint.startswith("http://")}


_stores: dict[tuple[int, str], Any] = {}
_lock = threading.Lock()


def store_at(url: str) -> Any:
    """The obstore store rooted at ``url`` (cached per process: fork-safe)."""
    key = (os.getpid(), url.rstrip("/"))
    with _lock:
        if key not in _stores:
            from obstore.store import from_url

            try:
                _stores[key] = from_url(key[1], client_options=_client_options(),
                                        retry_config=RETRY)  # fmt: skip
            except Exception as e:  # obstore names the bad scheme or option
                raise RemoteError(f"{url}: not an object-store URL cellmorph can open ({_first_line(e)})") from None  # fmt: skip
    return _stores[key]


def _bucket(url: str) -> tuple[Any, str]:
    root, key = split_url(url)
    return store_at(root), key


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _xml(text: str, tag: str) -> str | None:
    m = re.search(rf"<{tag}>([^<]*)</{tag}>", text)
    return m.group(1) if m else None


def translate(e: BaseException, url: str) -> BaseException:
    """A one-line error naming ``url`` for an obstore failure (retries are already spent)."""
    from obstore import exceptions as ox

    text = str(e)
    code, status = _xml(text, "Code"), re.search(r"status code: (\d{3}[^:<]*)", text)
    if "NoSuchBucket" in text:
        bucket = split_url(url)[0]
        return NoSuchBucket(f"{url}: the bucket {bucket} does not exist (or this endpoint "
                             "does not serve it; check AWS_ENDPOINT_URL)")  # fmt: skip
    if isinstance(e, ox.NotFoundError | FileNotFoundError):
        return RemoteMissing(f"{url}: no such object")
    if isinstance(e, ox.UnauthenticatedError | ox.PermissionDeniedError) or (
        status and status.group(1).startswith(("401", "403"))
    ):
        why = code or (status.group(1).strip() if status else "access denied")
        return RemoteError(f"{url}: the object store refused the credentials ({why}); check "
                           "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the machine's role)")  # fmt: skip
    if isinstance(e, ox.BaseError):
        detail = code or (status.group(1).strip() if status else _first_line(text))
        return RemoteError(f"{url}: object-store request failed after retries ({detail})")
    return e


@contextlib.contextmanager
def errors(url: str) -> Iterator[None]:
    """Turn obstore's failures inside the block into one-line errors naming ``url``."""
    try:
        yield
    except RemoteError:
        raise
    except Exception as e:
        err = translate(e, url)
        if err is e:
            raise
        raise err from None


# --------------------------------------------------------------------------- operations


def read(url: str) -> bytes:
    store, key = _bucket(url)
    import obstore

    with errors(url):
        return bytes(obstore.get(store, key).bytes())


def download(url: str, dest: Path) -> None:
    """Stream the object at ``url`` into the local file ``dest`` (never whole in memory)."""
    store, key = _bucket(url)
    import obstore

    with errors(url), open(dest, "wb") as f:
        for chunk in obstore.get(store, key).stream(min_chunk_size=8 << 20):
            f.write(memoryview(chunk))


def read_ranges(url: str, starts: list[int], ends: list[int]) -> list[bytes]:
    """Byte ranges ``[start, end)`` of one object, fetched concurrently (nearby ones merged)."""
    store, key = _bucket(url)
    import obstore

    with errors(url):
        return [bytes(b) for b in obstore.get_ranges(store, key, starts=starts, ends=ends)]


def read_suffix(url: str, n: int) -> tuple[bytes, int]:
    """The last ``n`` bytes of an object and the object's size, in one request."""
    store, key = _bucket(url)
    import obstore

    with errors(url):
        result = obstore.get(store, key, options={"range": {"suffix": n}})
        return bytes(result.bytes()), int(result.meta["size"])


def size(url: str) -> int | None:
    """The object's size, or None when there is none at ``url``."""
    store, key = _bucket(url)
    import obstore

    try:
        with errors(url):
            return int(obstore.head(store, key)["size"])
    except RemoteMissing:
        return None


def write(url: str, data: bytes | Path) -> None:
    """Put ``data`` (bytes, or a local file streamed in parts) at ``url``, replacing it whole."""
    store, key = _bucket(url)
    import obstore

    with errors(url):
        obstore.put(store, key, data)


def list_objects(url: str) -> list[tuple[str, int]]:
    """``(key relative to url, size)`` for every object under the prefix ``url``."""
    store, key = _bucket(url)
    import obstore

    prefix = f"{key}/" if key else ""
    out = []
    with errors(url):
        for batch in obstore.list(store, prefix=prefix or None):
            # Keys ending in "/" are folder markers some writers (pyarrow) put: not files.
            out += [(m["path"][len(prefix) :], int(m["size"])) for m in batch
                    if not m["path"].endswith("/")]  # fmt: skip
    return out


def children(url: str) -> set[str]:
    """Names directly under the prefix ``url`` (objects and sub-prefixes)."""
    store, key = _bucket(url)
    import obstore

    with errors(url):
        found = obstore.list_with_delimiter(store, prefix=f"{key}/" if key else None)
    names = {m["path"].rstrip("/").rsplit("/", 1)[-1] for m in found["objects"]}
    return names | {p.rstrip("/").rsplit("/", 1)[-1] for p in found["common_prefixes"]}


def delete(url: str) -> None:
    store, key = _bucket(url)
    import obstore

    with errors(url):
        obstore.delete(store, key)


def delete_tree(url: str) -> int:
    """Delete every object under the prefix ``url``; returns how many."""
    names = [name for name, _ in list_objects(url)]
    store, key = _bucket(url)
    import obstore

    with errors(url):
        for i in range(0, len(names), 1000):
            obstore.delete(store, [f"{key}/{n}" if key else n for n in names[i : i + 1000]])
    return len(names)


def copy(src: str, dst: str) -> None:
    """Server-side copy within one bucket (a download and upload across buckets)."""
    (s_root, s_key), (d_root, d_key) = split_url(src), split_url(dst)
    if s_root != d_root:
        write(dst, read(src))
        return
    import obstore

    with errors(src):
        obstore.copy(store_at(s_root), s_key, d_key)


# --------------------------------------------------------------------------- URLPath


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
        root, key = split_url(self.url)
        return key.rsplit("/", 1)[-1] if key else root.partition("://")[2]

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix

    @property
    def stem(self) -> str:
        return Path(self.name).stem

    @property
    def parent(self) -> URLPath:
        root, key = split_url(self.url)
        return URLPath(f"{root}/{key.rpartition('/')[0]}") if "/" in key else URLPath(root)

    @property
    def parents(self) -> list[URLPath]:
        out, p = [], self
        while split_url(p.url)[1]:
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
        return size(self.url) is not None

    def is_dir(self) -> bool:
        store, key = _bucket(self.url)
        import obstore

        with errors(self.url):
            found = obstore.list_with_delimiter(store, prefix=f"{key}/" if key else None)
        return bool(found["objects"] or found["common_prefixes"])

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def iterdir(self) -> Iterator[URLPath]:
        return (self / n for n in sorted(children(self.url)))

    def glob(self, pattern: str) -> Iterator[URLPath]:
        return (self / n for n in sorted(children(self.url)) if fnmatch.fnmatch(n, pattern))

    def rglob(self, pattern: str) -> Iterator[URLPath]:
        names = [n for n, _ in list_objects(self.url)]
        return (self / n for n in sorted(names) if fnmatch.fnmatch(n.rsplit("/", 1)[-1], pattern))

    # ------------------------------------------------------------------------ bytes
    def read_bytes(self) -> bytes:
        return read(self.url)

    def read_text(self, encoding: str = "utf-8") -> str:
        return read(self.url).decode(encoding)

    def write_bytes(self, data: bytes) -> int:
        write(self.url, bytes(data))
        return len(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(text.encode(encoding))

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: a prefix exists as soon as an object is put under it."""

    def unlink(self, missing_ok: bool = False) -> None:
        if missing_ok and not self.is_file():
            return
        delete(self.url)

    def open(self, mode: str = "r", encoding: str | None = None) -> Any:
        """Read (``r``, ``rb``) the object, or write (``w``, ``wb``) or append (``a``, ``ab``)
        through a buffer put when the file is closed (an append rewrites the object)."""
        text = "b" not in mode
        if mode.strip("bt") == "r":
            raw = io.BytesIO(read(self.url))
            return io.TextIOWrapper(raw, encoding=encoding or "utf-8") if text else raw
        if mode.strip("bt") not in ("w", "a"):
            raise ValueError(f"URLPath.open: mode {mode!r} is not supported")
        start = b""
        if mode.startswith("a"):
            with contextlib.suppress(RemoteMissing):
                start = read(self.url)
        buf = _PutOnClose(self.url, start)
        return io.TextIOWrapper(buf, encoding=encoding or "utf-8") if text else buf


class _PutOnClose(io.BytesIO):
    def __init__(self, url: str, start: bytes):
        super().__init__()
        self.url = url
        self.write(start)

    def close(self) -> None:
        if not self.closed:
            write(self.url, self.getvalue())
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
        download(path.url, local)
        yield local
