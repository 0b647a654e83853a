"""``catprune frontier``: pruned settings against fewer steps at equal MACs, resumable and data-parallel."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from ..grid import FrontierSettings, config_fields, parse_grid, type_name
from ..names import PEER_SWEEPS, SOLVER_NAMES
from ..prompts import PROMPT_SETS, PromptSetError
from .arguments import add_command, add_run_arguments, check_writable, settings_from_arguments

DEFAULT_GRID = ("keep_ratio=0.3,0.5", "start_step=4,8")
"""The pruned settings' grid when no ``--grid`` is given."""
CURVE_START = 4
"""The fewest steps of the default fewer-steps curve."""


def step_counts(text: str) -> list[int]:
    """Step counts as argparse's type: ``28,20``, ``4-27`` (inclusive) or both, e.g. ``4-12,16,20``."""
    counts: list[int] = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            low, high = int(first), int(last if dash else first)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected step counts like 28,20 or 4-27, got {text!r}"
            ) from None
        if not 1 <= low <= high:
            raise argparse.ArgumentTypeError(f"step counts must be >= 1 and ranges ascending, got {text!r}")
        counts += range(low, high + 1)
    return list(dict.fromkeys(counts))


def names(known: tuple[str, ...] | list[str], what: str) -> argparse.Namespace:
    """An argparse type: comma-separated names, each one of ``known`` (an unknown one: one line naming
    the known ones)."""

    def parse(text: str) -> list[str]:
        chosen = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in chosen if name not in known]
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(unknown) or repr(text)}; known: {', '.join(known)}"
            )
        return list(dict.fromkeys(chosen))

    return parse  # type: ignore[return-value]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "frontier")
    parser.add_argument(
        "--model", required=True, help="shapes-mmdit, shapes-pixart, textures-mmdit, or a diffusers pipeline"
    )
    parser.add_argument(
        "--prompts", required=True, help=f"{', '.join(PROMPT_SETS)}, or a file (one per line)"
    )
    parser.add_argument("--num-prompts", type=int, default=32, help="the first N prompts (default: 32)")
    parser.add_argument(
        "--reference-steps",
        type=int,
        default=FrontierSettings.reference_steps,
        help="steps of the unpruned model whose images are the reference of PSNR and SSIM "
        f"(default: {FrontierSettings.reference_steps})",
    )
    parser.add_argument(
        "--curve-steps",
        type=step_counts,
        help="step counts of the unpruned fewer-steps curve, e.g. 8,12,16 or 6-27 "
        f"(default: every count from {CURVE_START} to the reference steps - 1)",
    )
    parser.add_argument(
        "--steps",
        type=step_counts,
        help="step counts of the pruned settings, e.g. 28,20 (default: the reference steps)",
    )
    fields = ", ".join(f"{name} ({type_name(kind)})" for name, kind in config_fields().items())
    parser.add_argument(
        "--grid",
        action="append",
        metavar="FIELD=V1,V2,...",
        help="values of a CATPruningConfig field; repeat for more fields: the pruned settings are --steps x "
        "every combination, other fields at their defaults (default: "
        f"{' '.join(f'--grid {spec}' for spec in DEFAULT_GRID)}). Values are read by the field's type: "
        "true/false, none, a tuple as [4,-1] (quote it) or one bare element. Fields: " + fields,
    )
    parser.add_argument(
        "--solvers",
        type=names(SOLVER_NAMES, "solver"),
        default=[],
        help=f"a fewer-steps curve for each of these solvers ({', '.join(SOLVER_NAMES)}), at --curve-steps "
        "(Heun: the counts whose 2N - 1 calls do not exceed the reference's); the pipeline's own solver's "
        "curve is always there",
    )
    parser.add_argument(
        "--cat-solvers",
        type=names(SOLVER_NAMES, "solver"),
        default=[],
        help="run the pruned settings (--steps x --grid) on these solvers too",
    )
    parser.add_argument(
        "--reference-solver",
        choices=SOLVER_NAMES,
        default=None,
        help="the reference's solver (default: the pipeline's own)",
    )
    parser.add_argument(
        "--peers",
        type=names(list(PEER_SWEEPS), "peer"),
        default=[],
        help="diffusers' caches to sweep at the reference steps: "
        + "; ".join(
            f"{name} ({knob} {', '.join(map(str, values))})" for name, (knob, values) in PEER_SWEEPS.items()
        )
        + ". MagCache is calibrated on the first prompt first; a cache diffusers refuses is reported with "
        "its error",
    )
    add_run_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..frontier import run_frontier

    check_writable(Path(args.out), folder=True)
    grid = parse_grid(args.grid or DEFAULT_GRID)
    settings = settings_from_arguments(FrontierSettings, args)
    curve = args.curve_steps or list(range(CURVE_START, settings.reference_steps))
    pruned = args.steps or [settings.reference_steps]
    try:
        rows = run_frontier(
            settings,
            curve,
            pruned,
            grid,
            args.num_prompts,
            args.out,
            args.device,
            not args.no_progress,
            solvers=args.solvers,
            cat_solvers=args.cat_solvers,
            caches=args.peers,
            threads=args.threads,
        )
    except PromptSetError as error:
        raise UserError(str(error)) from error
    if rows is not None:
        out = Path(args.out)
        print((out / "frontier.md").read_text(), end="")
        print(
            f"wrote {out / 'frontier.csv'}, {out / 'frontier.md'}, {out / 'frontier.png'} and "
            f"{out / 'methods.png'}"
        )
    return 0
