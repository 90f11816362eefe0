"""Errors that reach the user as one line and a non-zero exit, never a traceback.

Only :class:`CellmorphError` (a problem with the user's input, settings or environment, whose
message names the file, option or key) becomes a one-line message; any other exception is a bug
and keeps its traceback. A reader that closes stdout early (``| head -1``) is no error at all:
the rest of the output is dropped and the command's exit status is its work's.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import sys
from collections.abc import Callable, Iterator
from typing import Any, TextIO

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


class _ReaderMayLeave:
    """``sys.stdout`` while a command runs. When the reader of a pipe has gone (``cellmorph
    inspect | head -1``), the rest of the output goes to /dev/null, as the Python docs advise
    for SIGPIPE, and the work goes on: the exit status is the work's (0 for a complete store),
    not a BrokenPipeError's traceback."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            discard_stdout(self._stream)
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            discard_stdout(self._stream)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def discard_stdout(stream: TextIO | None = None) -> None:
    """Point stdout's file descriptor at /dev/null: its reader is gone, and Python's own flush
    at exit would otherwise fail again (``Exception ignored ... BrokenPipeError``, exit 120)."""
    stream = stream or sys.__stdout__
    try:
        fd = stream.fileno() if stream is not None else 1
    except (OSError, ValueError):  # not a real file (a test's capture): nothing to redirect
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def stdout_reader_gone() -> bool:
    """True when stdout is a pipe whose reader has closed it (Linux flags POLLERR then)."""
    try:
        poll = select.poll()
        poll.register(sys.__stdout__.fileno(), select.POLLOUT)  # type: ignore[union-attr]
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def run_main(main: Callable[[], int | None]) -> int:
    """Run a command's body: ``error: <message>`` and exit 2 for a CellmorphError or a machine
    fault (:func:`fault_message`), 130 on Ctrl-C; output to a reader that left is dropped
    (:class:`_ReaderMayLeave`).

    Every entry point (``cellmorph``, ``python -m conversion``, ``python -m ray_jobs.*``) goes
    through here, so all of them answer mistakes the same way.
    """
    stdout = sys.stdout
    sys.stdout = _ReaderMayLeave(stdout)  # type: ignore[assignment]
    try:
        return _run(main)
    finally:
        sys.stdout = stdout


def _run(main: Callable[[], int | None]) -> int:
    try:
        code = int(main() or 0)
        sys.stdout.flush()  # what is still buffered, while a closed pipe (or a full disk) is handled
        return code
    except BrokenPipeError:
        if not stdout_reader_gone():  # another pipe broke: a bug, keep its traceback
            raise
        discard_stdout()  # written past the wrapper (a raw buffer): the work stopped there
        return 1
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
