"""Atomic file writes: every output is written beside its target, then renamed over it.

A reader (or a rerun after a crash or a full disk) sees the old file or the new one, never half
of one; a write that fails removes its temporary file. Every writer in cellmorph goes through
here, so there is one naming scheme for temporary files: ``.<name>.<pid>.<random>.tmp``.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"


def temp_path(path: str | Path) -> Path:
    """A unique temporary name in ``path``'s folder (same filesystem, so the rename is atomic)."""
    p = Path(path)
    return p.with_name(f".{p.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it is removed.

    An OSError that names no file (a full disk seen by a writer library) or names the temporary
    file is raised again naming ``path``, so the one-line message says which output failed.
    """
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


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_with(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """``write(tmp_path)`` (``torch.save``, ``df.to_parquet``...), then rename it to ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def link_or_copy(src: str | Path, dst: str | Path) -> Path:
    """Make ``dst`` a copy of ``src`` atomically: a hard link where the filesystem allows one."""
    import shutil

    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:  # no hard links here (another device, some network filesystems)
            shutil.copyfile(src, tmp)
    return Path(dst)


def remove_stale_temps(folder: str | Path) -> int:
    """Delete temporary files left in ``folder`` by a killed writer; returns how many."""
    n = 0
    for p in Path(folder).glob(f".*{TMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            n += 1
    return n
