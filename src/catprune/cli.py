"""The ``catprune`` command line: one subcommand per tool module in ``catprune.tools``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .errors import UserError

TOOL_MODULES = (
    "catprune.tools.demo",
    "catprune.tools.macs",
    "catprune.tools.bench",
    "catprune.tools.generate",
    "catprune.tools.train_shapes",
    "catprune.tools.viz",
    "catprune.tools.eval",
)
"""Each module defines ``register(subparsers)``, which adds its subcommand with ``func=run(args) -> int``."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="catprune", description="CAT Pruning: cluster-aware token pruning for diffusion transformers."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in TOOL_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
