"""Object-store URLs (``s3://bucket/key``, ``gs://``, ``az://``, ``memory://``) through obstore.

One client per bucket and process; every call retries timeouts, dropped connections and 5xx
answers with exponential backoff (:data:`RETRY`), and stops on anything else with a one-line
:class:`RemoteError` naming the URL (a missing bucket or key, refused credentials). Endpoint and
credentials come from the standard variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``; ``GOOGLE_*``, ``AZURE_*``) or
the machine's role, read by obstore; nothing here stores, logs or prints them.

:class:`cellmorph.urlpath.URLPath` is the pathlib-like view built on these calls.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

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
