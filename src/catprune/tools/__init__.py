"""The command line's subcommands, one module each (``register(subparsers)`` adds its subcommand).

Tools import the library, never each other; what several of them share lives here.
"""

from __future__ import annotations

import argparse

from ..config import CATPruningConfig


def add_pruning_arguments(
    parser: argparse.ArgumentParser,
    steps: int | None = 28,
    keep_ratio: float | None = CATPruningConfig.keep_ratio,
) -> None:
    """``--steps``, ``--start-step`` and ``--keep-ratio``, documented alike in every command.

    ``steps`` None: the model's default number of steps; ``keep_ratio`` None: no ``--keep-ratio`` (the
    command sets keep ratios its own way)."""
    default_steps = "the model's" if steps is None else steps
    parser.add_argument(
        "--steps", type=int, default=steps, help=f"denoising steps (default: {default_steps})"
    )
    parser.add_argument(
        "--start-step",
        type=int,
        default=CATPruningConfig.start_step,
        help=f"t0, the first pruned step (default: {CATPruningConfig.start_step})",
    )
    if keep_ratio is not None:
        parser.add_argument(
            "--keep-ratio",
            type=float,
            default=keep_ratio,
            help=f"alpha, the share of image tokens recomputed at each pruned step (default: {keep_ratio})",
        )
