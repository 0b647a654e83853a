"""``catprune eval``: methods at equal budget on a prompt set, resumable and data-parallel (Tables 2/3)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from ..names import AUTO_CLIP, DEFAULT_CLIP_MODEL, METHOD_ORDER
from ..prompts import PROMPT_SETS, PromptSetError
from .arguments import (
    add_command,
    add_pruning_arguments,
    add_run_arguments,
    check_writable,
    settings_from_arguments,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "eval")
    parser.add_argument(
        "--model", required=True, help="shapes-mmdit, shapes-pixart, textures-mmdit, or a diffusers pipeline"
    )
    parser.add_argument(
        "--prompts", required=True, help=f"{', '.join(PROMPT_SETS)}, or a file (one per line)"
    )
    parser.add_argument(
        "--methods",
        help=f"comma-separated, from {', '.join(METHOD_ORDER)} and any other registered strategy (default: "
        "all); full always runs",
    )
    parser.add_argument("--num-prompts", type=int, default=64, help="the first N prompts (default: 64)")
    add_pruning_arguments(parser)
    add_run_arguments(parser)
    parser.add_argument(
        "--clip-model",
        default=AUTO_CLIP,
        help="CLIP model for the CLIP score (a hub id or folder; skipped with a note if it cannot be "
        f"loaded), 'none', or '{AUTO_CLIP}' (default): none for the shapes models and --prompts shapes, "
        f"whose shapes checker measures alignment, {DEFAULT_CLIP_MODEL} for other models",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluation import EvalSettings, method_names, resolve_clip_model, resolve_methods, run_evaluation

    check_writable(Path(args.out), folder=True)
    names = args.methods.split(",") if args.methods is not None else method_names()
    methods = resolve_methods(name.strip() for name in names if name.strip())
    # Resolved here, so that the run records (and a resumed run compares) the CLIP model actually used.
    clip_model = resolve_clip_model(args.clip_model, args.model, args.prompts)
    settings = settings_from_arguments(EvalSettings, args, clip_model=clip_model)
    try:
        rows = run_evaluation(
            settings,
            methods,
            args.num_prompts,
            args.out,
            args.device,
            progress=not args.no_progress,
            threads=args.threads,
        )
    except PromptSetError as error:
        raise UserError(str(error)) from error
    if rows is not None:
        print((Path(args.out) / "summary.md").read_text(), end="")
    return 0
