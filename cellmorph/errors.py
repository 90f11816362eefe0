"""Errors that reach the user as one line and a non-zero exit, never a traceback.

Only :class:`CellmorphError` (a problem with the user's input, settings or environment, whose
message names the file, option or key) becomes a one-line message; any other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


class CellmorphError(Exception):
    """A structural problem with the user's input or settings; the message names the key or file."""


def run_main(main: Callable[[], int | None]) -> int:
    """Run a command's body: ``error: <message>`` and exit 2 for a CellmorphError, 130 on Ctrl-C.

    Every entry point (``cellmorph``, ``python -m conversion``, ``python -m ray_jobs.*``) goes
    through here, so all of them answer mistakes the same way.
    """
    try:
        return int(main() or 0)
    except CellmorphError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
