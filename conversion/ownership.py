"""One writer per store, no orphan writers, and atomic replacement of a local store.

Beside a local store ``<parent>/<name>`` its writer keeps ``<parent>/.<name>.writer/``:

- ``lock``: held (``flock``, exclusive) by the convert process for its whole run; the kernel
  releases it when that process ends, however it ends, so a rerun after ``kill -9`` needs no
  clean-up. It records who holds it (pid, host, start time) for the message a second convert
  gets, and the run's owner id.
- ``writers``: every shard writer (pool worker, Ray task, or the convert process itself) holds
  it shared while it writes a shard, and first checks that the owner id in ``lock`` is its own
  run's. A new run takes it exclusively once before packing: writers of an earlier run still
  finishing a shard are waited for, and any that start later see another owner and write nothing.
- ``next/``: the store ``--overwrite`` builds while the old one stays readable at ``<name>``;
  swapped in with one ``renameat2(RENAME_EXCHANGE)`` when it is complete.
- ``old-<id>/``: a replaced store that still had readers (they hold a shared ``flock`` on its
  folder, :class:`cellmorph.store.StoreFolder`); a later convert removes it once they are gone.

Pool workers also end as soon as the convert process that started them does (:func:`die_with`).
Object-store URLs (``s3://``) have no locks or renames: there, one writer at a time is up to you.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cellmorph.errors import CellmorphError, fault_message

LOCK, WRITERS, STAGING, OLD = "lock", "writers", "next", "old-"
WAIT_FOR_WRITERS_S = 60.0


@dataclass(frozen=True)
class Owner:
    """A convert run's claim on a store: where its lock lives and the run's id (picklable, so
    every shard task carries it)."""

    sidecar: str
    token: str


def is_local(out: str) -> bool:
    return "://" not in out


def sidecar(out: str | Path) -> Path:
    p = Path(out)
    return p.parent / f".{p.name}.writer"


def staging(out: str | Path) -> Path:
    """Where ``--overwrite`` builds the new store while the old one stays readable."""
    return sidecar(out) / STAGING


def _cannot_write(out: str, e: OSError) -> CellmorphError:
    return CellmorphError(f"--out {out}: cannot write there ({e.strerror or e})")


@contextlib.contextmanager
def hold(out: str) -> Iterator[Owner | None]:
    """Hold the store's writer lock for the duration (None for URLs: nothing to lock)."""
    if not is_local(out):
        yield None
        return
    side = sidecar(out)
    try:
        side.mkdir(parents=True, exist_ok=True)
        fd = os.open(side / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise _cannot_write(out, e) from None
    try:
        _lock_or_explain(fd, out)
        owner = Owner(str(side), uuid.uuid4().hex)
        info = {"token": owner.token, "pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.now(UTC).isoformat(timespec="seconds")}  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        wait_for_writers(owner, out)
        remove_unread_old(side)
        yield owner
    finally:
        os.close(fd)  # releases the lock


def _flock(fd: int, op: int) -> bool:
    """``flock``; False where the filesystem has no locks (Lustre without ``-o flock``...).
    A lock held by someone else raises BlockingIOError (with LOCK_NB)."""
    try:
        fcntl.flock(fd, op)
    except BlockingIOError:
        raise
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            return False
        raise
    return True


def _busy(fd: int, out: str) -> CellmorphError:
    return CellmorphError(
        f"--out {out} is being written by another convert ({_holder(fd)}); wait for it to "
        "finish, or choose another --out"
    )


def refuse_if_busy(out: str) -> None:
    """Stop with the "being written by another convert" line if another process holds the
    store's writer lock: a store that convert is still creating is a folder that is not yet a
    store, which must not be mistaken for someone else's folder."""
    if not is_local(out):
        return
    try:
        fd = os.open(sidecar(out) / LOCK, os.O_RDWR)
    except OSError:
        return  # no lock file: nobody has written here
    try:
        _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours for a moment: nobody else holds it
    except BlockingIOError:
        raise _busy(fd, out) from None
    finally:
        os.close(fd)


def _lock_or_explain(fd: int, out: str) -> None:
    try:
        locked = _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _busy(fd, out) from None
    if not locked:
        print(
            f"warning: --out {out}: this filesystem has no file locks; make sure no other "
            "convert writes to it at the same time",
            file=sys.stderr,
        )


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (ValueError, KeyError, OSError):
        return "a process that is starting"


def wait_for_writers(owner: Owner, out: str, timeout: float = WAIT_FOR_WRITERS_S) -> None:
    """Wait until no shard writer of an earlier run is writing (they hold ``writers`` shared)."""
    fd = os.open(Path(owner.sidecar) / WRITERS, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise CellmorphError(
                        f"--out {out}: shard writers of an earlier convert are still running "
                        f"after {timeout:.0f} s (they hold {Path(owner.sidecar) / WRITERS}); "
                        "end them, then rerun"
                    ) from None
                time.sleep(0.1)
    finally:
        os.close(fd)


@contextlib.contextmanager
def writing(owner: Owner | None) -> Iterator[bool]:
    """Around one shard write: True while this run still owns the store (write), False when
    another run has taken it over (write nothing: this writer outlived its run)."""
    if owner is None:
        yield True
        return
    side = Path(owner.sidecar)
    fd = os.open(side / WRITERS, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _flock(fd, fcntl.LOCK_SH)
        try:
            current = json.loads((side / LOCK).read_bytes() or b"{}").get("token")
        except (OSError, ValueError):
            current = None
        yield current == owner.token
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- orphans


def die_with(pid: int) -> None:
    """Pool-worker initializer: end this worker as soon as process ``pid`` (the convert process
    that started the pool) ends, so no worker keeps writing after its run is over.

    The pool's workers are children of the forkserver, which outlives a killed convert while
    they run, so the kernel's parent-death signal would not fire; a pidfd on the convert
    process does (polling its pid where pidfds are unavailable)."""
    try:
        fd: int | None = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):
        fd = None
    threading.Thread(target=_watch, args=(pid, fd), daemon=True, name="die-with").start()


def _watch(pid: int, fd: int | None) -> None:
    if fd is not None:
        select.select([fd], [], [])  # readable once the process has exited
    else:
        while _alive(pid):
            time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- replacement

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2); False where the filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_in(new: Path, out: Path) -> str:
    """Put the finished store ``new`` at ``out``; the replaced one is deleted, or kept aside
    while it has readers. Returns what happened to the old store, for the summary."""
    aside = sidecar(out) / f"{OLD}{uuid.uuid4().hex[:8]}"
    try:
        if _exchange(new, out):
            old = new  # the exchange left the old store where the new one was built
        else:  # two renames: for a moment there is no store at ``out`` (readers retry)
            old = aside
            os.rename(out, old)
            os.rename(new, out)
    except OSError as e:
        if aside.exists() and not out.exists():
            os.rename(aside, out)  # the second rename failed: the old store goes back
        if fault_message(e) is not None:  # a full disk, a read-only mount: said as such
            raise
        # EBUSY (``--out`` is a mount point or a working folder), EXDEV...: the old store stays;
        # the new build is removed rather than left behind as gigabytes nobody will find.
        shutil.rmtree(new, ignore_errors=True)
        raise CellmorphError(
            f"--out {out}: cannot put the new store in place ({e.strerror or e}); the store "
            "there is unchanged and the new build was removed"
        ) from None
    return dispose(old)


def dispose(old: Path) -> str:
    """Delete a replaced store unless readers still hold it; then move it to ``old-<id>``."""
    fd = os.open(old, os.O_RDONLY | os.O_DIRECTORY)
    try:
        # Without flock, readers that need no new file keep going, the others stop clearly.
        _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        kept = old if old.name.startswith(OLD) else old.with_name(f"{OLD}{uuid.uuid4().hex[:8]}")
        os.rename(old, kept)
        return f"the replaced store has readers; kept at {kept} until they finish"
    finally:
        os.close(fd)
    shutil.rmtree(old)
    return "the replaced store was removed"


def remove_unread_old(side: Path) -> None:
    """Remove replaced stores whose readers have finished."""
    for old in side.glob(f"{OLD}*"):
        with contextlib.suppress(OSError):
            dispose(old)
