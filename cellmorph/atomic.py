"""Atomic file writes: every output is written beside its target, then renamed over it.

A reader (or a rerun after a crash or a full disk) sees the old file or the new one, never half
of one; a write that fails removes its temporary file. Every writer in cellmorph goes through
here, so there is one naming scheme for temporary files: ``.<name>.<pid>.<random>.tmp``.

A target may also be an object-store URL (:class:`cellmorph.urlpath.URLPath`): there one put
replaces the object whole, which is the store's own atomic write; writers that need a file
(``torch.save``, ``to_parquet``) write a local temporary file that is then put.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cellmorph.urlpath import AnyPath, URLPath, as_path

TMP_SUFFIX = ".tmp"


def temp_path(path: str | Path) -> Path:
    """A unique temporary name in ``path``'s folder (same filesystem, so the rename is atomic)."""
    p = Path(path)
    return p.with_name(f".{p.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


@contextlib.contextmanager
def atomic_path(path: str | AnyPath) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it is removed.

    An OSError that names no file (a full disk seen by a writer library) or names the temporary
    file is raised again naming ``path``, so the one-line message says which output failed.
    For a URL the temporary file is local and is put at ``path`` on success.
    """
    if isinstance(as_path(path), URLPath):
        with _remote_temp(as_path(path)) as tmp:  # type: ignore[arg-type]
            yield tmp
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(p)
    try:
        yield tmp
        os.replace(tmp, p)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno is not None and e.filename in (None, str(tmp)):
            raise OSError(e.errno, e.strerror or str(e), str(p)) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _remote_temp(target: URLPath) -> Iterator[Path]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="cellmorph-put-") as d:
        tmp = Path(d) / target.name
        yield tmp
        from cellmorph import remote

        remote.write(target.url, tmp)


def write_bytes(path: str | AnyPath, data: bytes) -> AnyPath:
    target = as_path(path)
    if isinstance(target, URLPath):
        target.write_bytes(data)  # one put: all or nothing
        return target
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return target


def write_text(path: str | AnyPath, text: str) -> AnyPath:
    return write_bytes(path, text.encode("utf-8"))


def write_with(path: str | AnyPath, write: Callable[[Path], Any]) -> AnyPath:
    """``write(tmp_path)`` (``torch.save``, ``df.to_parquet``...), then rename it to ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)
    return as_path(path)


def link_or_copy(src: str | AnyPath, dst: str | AnyPath) -> AnyPath:
    """Make ``dst`` a copy of ``src`` atomically: a hard link where the filesystem allows one
    (a server-side copy in an object store)."""
    import shutil

    source = as_path(src)
    if isinstance(as_path(dst), URLPath):
        from cellmorph import remote

        if isinstance(source, URLPath):
            remote.copy(source.url, str(as_path(dst)))
        else:
            remote.write(str(as_path(dst)), source)
        return as_path(dst)
    if isinstance(source, URLPath):
        return write_bytes(dst, source.read_bytes())
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:  # no hard links here (another device, some network filesystems)
            shutil.copyfile(src, tmp)
    return Path(dst)


def remove_stale_temps(folder: str | AnyPath) -> int:
    """Delete temporary files left in ``folder`` by a killed writer; returns how many (none in
    an object store: a killed put leaves nothing behind)."""
    if isinstance(as_path(folder), URLPath):
        return 0
    n = 0
    for p in Path(folder).glob(f".*{TMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            n += 1
    return n
