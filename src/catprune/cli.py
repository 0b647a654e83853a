"""The ``catprune`` command line: one subcommand per tool module in ``catprune.tools``.

The tool modules import torch and diffusers, which take seconds, so the command line imports only the one
that argv names. ``catprune --help`` (and an unknown or missing command) lists every subcommand from the
``COMMANDS`` table of ``catprune.tools`` without importing any tool module.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from . import __version__
from .errors import UserError
from .tools import COMMANDS

TOOL_MODULES = tuple(command.module for command in COMMANDS.values())


def command_name(argv: Sequence[str]) -> str | None:
    """The subcommand that ``argv`` names: its first argument that is not an option (the top-level parser
    has no option that takes a value), or None."""
    for index, argument in enumerate(argv):
        if argument == "--":
            return argv[index + 1] if index + 1 < len(argv) else None
        if not argument.startswith("-"):
            return argument
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of the command line, with subcommand ``command`` added by its tool module (the only one
    imported) and every other subcommand a stub that only lists its summary."""
    parser = argparse.ArgumentParser(
        prog="catprune", description="CAT Pruning: cluster-aware token pruning for diffusion transformers."
    )
    parser.add_argument("--version", action="version", version=f"catprune {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, summary, _) in COMMANDS.items():
        if name == command:
            importlib.import_module(module).register(subparsers)
        else:
            subparsers.add_parser(name, help=summary)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(command_name(argv)).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, ValueError, TypeError, FileNotFoundError) as error:
        print(f"catprune {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"catprune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
