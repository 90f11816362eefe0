"""One writer per run directory: ``<run>/.lock``, held by the process that drives the run.

Two ``cellmorph train name=X`` at once would otherwise interleave their epochs in one
``metrics.jsonl`` and mix their checkpoints. The driver of a run (``run_local``,
``run_ray_training``, ``evaluate_run``, a sweep for its own folder) holds the lock for the
run's whole life; Ray workers run under their driver and never take it. A second writer is
refused with a :class:`CellmorphError` naming the run and the holder; a run submitted again
after its holder ended (a resume) takes the lock as usual.

- **Local folder**: an exclusive ``flock`` on ``<run>/.lock``, kept on an open descriptor. The
  kernel releases it when the holder ends, however it ends, so a killed run never blocks the
  next one. The file records the holder (pid, host, user, start time, command line) for the
  refusal, and is removed when the run ends.
- **Object store** (``s3://...``): a lease object ``<run>/.lock`` created with a conditional
  put (``If-None-Match``: only one creator wins), renewed every :data:`RENEW_S` seconds by a
  background thread with a conditional update on the version it wrote (``If-Match``), and
  deleted at the end. A lease not renewed for :data:`LEASE_S` seconds (by the store's own
  ``last_modified`` clock) belongs to a dead holder: it is taken over with a conditional update
  on that stale version, so of two takers only one wins. A holder that finds its lease taken
  (it could not renew for a whole lease) stops its run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import getpass
import json
import os
import shlex
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cellmorph import remote
from cellmorph.errors import CellmorphError
from cellmorph.urlpath import AnyPath, URLPath, as_path

LOCK_NAME = ".lock"
# Object-store lease: valid this long after its last renewal, renewed this often (module
# constants, read at acquire time, so tests can shorten them).
LEASE_S = 60.0
RENEW_S = 15.0
# A lock that changes hands while we look at it (a release, a takeover) is looked at again.
_ATTEMPTS = 10
_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)

_held: dict[str, int] = {}  # runs this process already holds: a nested hold is a no-op


def holder_info() -> dict[str, Any]:
    """Who this process is, for the message a second writer gets."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no passwd entry (some containers)
        user = str(os.getuid())
    return {"pid": os.getpid(), "host": socket.gethostname(), "user": user,
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": _command(), "token": uuid.uuid4().hex}  # fmt: skip


def _command() -> str:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    head = f"python -m {spec.name.removesuffix('.__main__')}" if spec else Path(sys.argv[0]).name
    text = " ".join([head or "python", *map(shlex.quote, sys.argv[1:])])
    return text if len(text) <= 160 else text[:157] + "..."


def describe(info: dict[str, Any] | None) -> str:
    """``pid 12 (user u) on host h since <time> (<command>)``."""
    if not info or "pid" not in info:
        return "another process (not yet described: it is starting)"
    return (f"pid {info['pid']} (user {info.get('user', '?')}) on host {info.get('host', '?')} "
            f"since {info.get('started', '?')} ({info.get('command', '?')})")  # fmt: skip


def _refusal(
    what: str, path: AnyPath, info: dict[str, Any] | None, extra: str = ""
) -> CellmorphError:
    return CellmorphError(
        f"{what} {path.name} ({path}) is being written by {describe(info)}{extra}; wait for it "
        "to finish, or choose another name="
    )


@contextlib.contextmanager
def hold(path: str | AnyPath, what: str = "run") -> Iterator[None]:
    """Hold the writer lock of the run directory ``path`` for the block (``what`` names it in
    messages: "run", "sweep"); a CellmorphError when another process holds it."""
    folder = as_path(path)
    key = str(folder)
    if _held.get(key):
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    lock = Lease(folder, what) if isinstance(folder, URLPath) else FileLock(folder, what)
    restore = None
    if isinstance(lock, Lease):
        lock.wake, restore = _wake_signal()
    lock.acquire()
    _held[key] = 1
    try:
        yield
    except BaseException:  # the signal a lost lease sends, or what the run made of it
        if lock.lost is None:
            raise
        raise _lost(what, folder, lock) from None
    else:
        if lock.lost is not None:
            raise _lost(what, folder, lock)
    finally:
        del _held[key]
        lock.release()
        if restore is not None:
            signal.signal(lock.wake, restore)


def _wake_signal() -> tuple[int, Any]:
    """The signal the renewing thread sends the main thread when the lease is lost, and the
    handler to put back afterwards. SIGUSR1 with a handler of ours when nothing else uses it:
    a job a shell starts in the background ignores SIGINT, which then would not stop the run.
    Else SIGINT (a lease held off the main thread: no handler can be installed there)."""
    usr1 = getattr(signal, "SIGUSR1", None)
    if (usr1 is None or threading.current_thread() is not threading.main_thread()
            or signal.getsignal(usr1) != signal.SIG_DFL):  # fmt: skip
        return signal.SIGINT, None
    return usr1, signal.signal(usr1, _lease_lost)


def _lease_lost(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwinds the run; hold() turns it into the lost lock's error


def _lost(what: str, folder: AnyPath, lock: Lease | FileLock) -> CellmorphError:
    return CellmorphError(
        f"{what} {folder.name} ({folder}): stopped, its lock was taken over by "
        f"{describe(lock.lost)} (this run could not renew its lease for {lock.lease_s:g} s)"
    )


# --------------------------------------------------------------------------- local folder


class FileLock:
    """``flock`` on ``<folder>/.lock``, held on an open descriptor until :meth:`release`."""

    lease_s = 0.0
    lost: dict[str, Any] | None = None  # a flock is never taken away

    def __init__(self, folder: Path, what: str = "run"):
        self.folder, self.what = Path(folder), what
        self.file = self.folder / LOCK_NAME
        self.fd: int | None = None
        self.made: list[Path] = []  # the folders acquire created, innermost first

    def acquire(self) -> None:
        self.made = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
        for _ in range(_ATTEMPTS):
            self.folder.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the folder was removed by a release just now
                continue
            if not self._lock(fd):
                break
            # A release unlinks the file while holding it: the one we locked must still be
            # the one at the path, or a third process could lock a new file beside us.
            if _same_file(fd, self.file):
                break
            os.close(fd)
        else:
            raise CellmorphError(f"{self.what} {self.folder.name}: could not lock {self.file}")
        self.fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder_info()).encode(), 0)
        except OSError:  # a full disk: no run can start here, and this one holds nothing
            self.release()
            raise

    def _lock(self, fd: int) -> bool:
        """Lock ``fd``; False where the filesystem has no locks (warned: nothing to hold)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            info = _read_json(os.pread(fd, 8192, 0))
            os.close(fd)
            raise _refusal(self.what, self.folder, info) from None
        except OSError as e:
            if e.errno not in _NO_LOCKS:
                os.close(fd)
                raise
        print(f"warning: {self.folder}: this filesystem has no file locks; make sure no other "
              "process writes this run at the same time", file=sys.stderr)  # fmt: skip
        return False

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.file.unlink()  # while still locked: see the check in acquire
        for folder in self.made:  # a run that failed before writing anything leaves none
            try:
                folder.rmdir()
            except OSError:  # not empty: the run wrote there
                break
        os.close(self.fd)
        self.fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (st.st_dev, st.st_ino)


def _read_json(data: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(data or b"null")
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


# --------------------------------------------------------------------------- object store


class Lease:
    """A lease object ``<folder>/.lock`` in an object store, renewed by a background thread."""

    def __init__(self, folder: URLPath, what: str = "run"):
        self.folder, self.what = folder, what
        self.url = str(folder / LOCK_NAME)
        self.lease_s, self.renew_s = float(LEASE_S), float(RENEW_S)
        self.info = {**holder_info(), "lease_s": self.lease_s}
        self.version: dict[str, str] | None = None  # what we last wrote (e_tag, version)
        self.lost: dict[str, Any] | None = None  # the holder that took our lease over
        self.wake: int = signal.SIGINT  # what stops the main thread then (hold() may choose)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _put(self, mode: Any) -> dict[str, str]:
        """Put our lease with ``mode``; obstore's AlreadyExists/Precondition errors pass through."""
        import obstore
        from obstore import exceptions as ox

        root, key = remote.split_url(self.url)
        body = json.dumps({**self.info, "renewed": time.time()}).encode()
        try:
            result = obstore.put(remote.store_at(root), key, body, mode=mode)
        except (ox.AlreadyExistsError, ox.PreconditionError):
            raise
        except Exception as e:
            raise remote.translate(e, self.url) from None
        return {k: v for k, v in result.items() if v is not None}

    def _read(self) -> tuple[dict[str, Any] | None, dict[str, str], float] | None:
        """The current lease: (holder, its version, seconds since it was written by the
        store's clock); None when there is none."""
        import obstore
        from obstore import exceptions as ox

        root, key = remote.split_url(self.url)
        try:
            with remote.errors(self.url):
                got = obstore.get(remote.store_at(root), key)
                data = bytes(got.bytes())
        except (remote.RemoteMissing, ox.NotFoundError):
            return None
        meta = got.meta
        version = {k: meta[k] for k in ("e_tag", "version") if meta.get(k) is not None}
        age = time.time() - meta["last_modified"].timestamp()
        return _read_json(data), version, age

    def acquire(self) -> None:
        from obstore import exceptions as ox

        for _ in range(_ATTEMPTS):
            try:
                self.version = self._put("create")
                break
            except ox.AlreadyExistsError:
                pass
            if self._take_over_stale():
                break
        else:
            raise CellmorphError(
                f"{self.what} {self.folder.name}: its lock {self.url} kept changing hands; retry"
            )
        self._thread = threading.Thread(target=self._renew, daemon=True, name="runlock-renew")
        self._thread.start()

    def _take_over_stale(self) -> bool:
        """Take the existing lease if its holder stopped renewing it; a refusal if it is live,
        False when it changed meanwhile (look again)."""
        from obstore import exceptions as ox

        current = self._read()
        if current is None:
            return False  # released just now: create it again
        info, version, age = current
        lease_s = float((info or {}).get("lease_s", self.lease_s))
        if age <= lease_s:
            left = f"; its lease runs {lease_s - age:.0f} s more unless renewed"
            raise _refusal(self.what, self.folder, info, left)
        try:
            self.version = self._put(version)  # If-Match the stale one: one taker wins
        except ox.PreconditionError:
            return False
        print(f"warning: {self.what} {self.folder.name}: took over the lock of {describe(info)}, "
              f"not renewed for {age:.0f} s (a crashed run)", file=sys.stderr)  # fmt: skip
        return True

    def _renew(self) -> None:
        from obstore import exceptions as ox

        while not self._stop.wait(self.renew_s):
            try:
                self.version = self._put(self.version)
            except ox.PreconditionError:  # taken over: we could not renew for a whole lease
                current = self._read()
                self.lost = (current[0] if current else None) or {}
                print(f"error: {self.what} {self.folder.name}: lost its lock to "
                      f"{describe(self.lost)}; stopping", file=sys.stderr)  # fmt: skip
                # A signal to the main thread itself: it also wakes a sleep or a wait there
                signal.pthread_kill(threading.main_thread().ident, self.wake)
                return
            except Exception as e:  # the store unreachable past its retries: try again later
                print(f"warning: {self.url}: lease not renewed ({e})", file=sys.stderr)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost is not None or self.version is None:
            return
        current = self._read()
        if current is not None and current[1].get("e_tag") == self.version.get("e_tag"):
            remote.delete(self.url)  # still ours (renewed until now, so nobody took it)
        self.version = None
