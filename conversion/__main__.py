"""``python -m conversion convert|inspect``: the conversion commands without the rest of the CLI.

Same arguments, messages and exit codes as ``cellmorph convert``; starts faster because it
does not import the training stack.
"""

from __future__ import annotations

import argparse
import sys

from cellmorph.errors import run_main
from conversion.cli import add_parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conversion")
    add_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return run_main(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
