"""The ``catprune`` command line: one subcommand per tool module in ``catprune.tools``.

The tool modules import torch and diffusers, which take seconds, so the command line imports only the one
that argv names. ``catprune --help`` (and an unknown or missing command) lists every subcommand from the
``COMMANDS`` table below without importing any tool module.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .errors import UserError

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "catprune.tools.demo",
        "full vs CAT-pruned generation on a small random-weight SD3 model (offline)",
    ),
    "macs": (
        "catprune.tools.macs",
        "count transformer MACs of full and CAT generations (no weights needed)",
    ),
    "bench": (
        "catprune.tools.bench",
        "time full vs CAT denoising loops and compare the speedup with the MAC bound",
    ),
    "generate": (
        "catprune.tools.generate",
        "generate an image with CAT pruning (default: the shipped shapes-mmdit model, offline, seconds)",
    ),
    "train-shapes": (
        "catprune.tools.train_shapes",
        "train the shapes-mmdit or shapes-pixart model (resumes when --out holds a checkpoint)",
    ),
    "viz": (
        "catprune.tools.viz",
        "diagnostic figures of the paper (figures 3-9) as PNGs",
    ),
    "eval": (
        "catprune.tools.eval",
        "compare methods at equal budget: MACs, throughput, CLIP/alignment, PSNR/SSIM vs full",
    ),
}
"""Subcommand name -> (its tool module, its one-line summary as ``catprune --help`` lists it).

Each module defines ``register(subparsers)``, which adds its subcommand (with the same summary, which
tests/test_cli.py checks) and sets ``func=run(args) -> int``."""

TOOL_MODULES = tuple(module for module, _ in COMMANDS.values())


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
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, summary) in COMMANDS.items():
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
