"""The ``cellmorph`` command. Each subcommand is registered by the module that implements it."""

from __future__ import annotations

import argparse
import importlib
import sys

from cellmorph.errors import CellmorphError

# Subcommand → the module that registers it with ``add_parser(subparsers)`` (setting ``func``).
# Only the module of the command being run is imported: torch and Ray take seconds to load.
COMMANDS = {
    "synth": "cellmorph.synth",
    "convert": "conversion.cli",
    "inspect": "conversion.cli",
    "train": "cellmorph.train",
    "demo": "cellmorph.demo",
    "predict": "cellmorph.predict",
    "evaluate": "cellmorph.report",
    "audit": "cellmorph.audit",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cellmorph",
        description="Train perturbation classifiers on Cell Painting images.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = [COMMANDS[command]] if command in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    for name in modules:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CellmorphError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
