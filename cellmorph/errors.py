"""Errors that reach the user as one line and a non-zero exit, never a traceback."""


class CellmorphError(Exception):
    """A structural problem with the user's input or settings; the message names the key or file."""
