"""Errors that reach the user as one line and a non-zero exit, never a traceback.

Only :class:`CellmorphError` (a problem with the user's input, settings or environment, whose
message names the file, option or key) becomes a one-line message; any other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import sys
from collections.abc import Callable, Iterator

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

# Faults of the machine, not of the program: a full disk, a read-only mount, a denied path.
_FAULTS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
}


class CellmorphError(Exception):
    """A structural problem with the user's input or settings; the message names the key or file."""


def one_line(e: CellmorphError) -> str:
    """The error's message. A CellmorphError raised in a DataLoader worker comes back with the
    worker's traceback in its message (torch re-raises it that way): keep the original line."""
    text = str(e)
    if "\nOriginal Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]  # "<module>.<Class>: <original message>"
    return last.split(": ", 1)[1] if ": " in last else last


def worker_error(e: BaseException) -> CellmorphError | None:
    """The CellmorphError a loader's worker process raised, if ``e`` is one coming back: DALI
    re-raises it as a bare Exception whose message is the worker's traceback, the last line
    of which names the class and the message."""
    if isinstance(e, CellmorphError):
        return e
    text = str(e)
    if "Traceback (most recent call last)" not in text:
        return None
    name, _, message = text.rstrip().splitlines()[-1].partition(": ")
    module, _, cls_name = name.rpartition(".")
    if not module.startswith(("cellmorph", "conversion")):
        return None
    cls = getattr(sys.modules.get(module), cls_name, None)
    if isinstance(cls, type) and issubclass(cls, CellmorphError):
        return cls(message)
    return None


@contextlib.contextmanager
def worker_errors() -> Iterator[None]:
    """Around a loader's iteration: a worker's CellmorphError surfaces as that one-line error."""
    try:
        yield
    except Exception as e:
        err = worker_error(e)
        if err is None:
            raise
        raise err from None


def fault_message(e: BaseException) -> str | None:
    """One line for an OSError that is an ordinary fault (full disk, read-only file system,
    permission denied), naming the file; None for anything else (a bug keeps its traceback)."""
    if not isinstance(e, OSError):
        return None
    what = _FAULTS.get(e.errno)
    if what is None and "No space left on device" in str(e):  # pyarrow's IO errors
        what = _FAULTS[errno.ENOSPC]
    if what is None:
        return None
    where = f" ({e.filename})" if e.filename else ""
    advice = {
        errno.EROFS: "write the output somewhere writable",
        errno.EACCES: "check the path's permissions",
    }.get(e.errno, "free space, then rerun the command")
    return f"{what}{where}: {advice}"


def run_main(main: Callable[[], int | None]) -> int:
    """Run a command's body: ``error: <message>`` and exit 2 for a CellmorphError or a machine
    fault (:func:`fault_message`), 130 on Ctrl-C.

    Every entry point (``cellmorph``, ``python -m conversion``, ``python -m ray_jobs.*``) goes
    through here, so all of them answer mistakes the same way.
    """
    try:
        return int(main() or 0)
    except CellmorphError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:
        message = fault_message(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
