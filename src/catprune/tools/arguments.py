"""Shared argument definitions of the subcommands, so that every command documents them alike."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
from pathlib import Path
from typing import Any, TypeVar

from ..config import CATPruningConfig
from ..errors import UserError
from . import COMMANDS

Settings = TypeVar("Settings")


def add_command(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    """Subcommand ``name`` as :data:`catprune.tools.COMMANDS` describes it: its ``--help`` starts with the
    one-line summary that ``catprune --help`` lists, then the details."""
    summary, details = COMMANDS[name].summary, COMMANDS[name].details
    description = f"{summary[0].upper()}{summary[1:]}." + (f" {details}" if details else "")
    return subparsers.add_parser(name, help=summary, description=description)


def settings_from_arguments(cls: type[Settings], args: argparse.Namespace, **overrides: Any) -> Settings:
    """A settings dataclass built from the parsed arguments of the same names (``overrides`` win)."""
    names = [field.name for field in dataclasses.fields(cls) if hasattr(args, field.name)]
    return cls(**{**{name: getattr(args, name) for name in names}, **overrides})


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


def check_steps(steps: int | None, start_step: int | None = None) -> None:
    """``--steps`` is positive (None: the model's default) and, when ``start_step`` is given (commands that
    must prune), larger than ``--start-step``; else a :class:`UserError` that says so."""
    if steps is not None and steps < 1:
        raise UserError(f"--steps must be a positive number of denoising steps, got {steps}")
    if steps is not None and start_step is not None and steps <= start_step:
        raise UserError(
            f"--steps ({steps}) must be larger than --start-step ({start_step}), the first pruned step: "
            "give more steps or a smaller --start-step"
        )


def check_writable(path: Path, option: str = "--out", folder: bool = False) -> None:
    """Fail before any work if ``path`` (a file, or with ``folder`` a folder) cannot be written: a
    :class:`UserError` of one line that says why. Leaves nothing behind: the folders and the file it
    creates to try are removed again."""
    target = path if folder else path.parent
    created = [parent for parent in (target, *target.parents) if not parent.exists()]
    try:
        target.mkdir(parents=True, exist_ok=True)
        if not folder and path.exists():
            with open(path, "ab"):  # appends nothing: the file stays as it is
                pass
        else:
            probe = target / f".catprune-write-test-{os.getpid()}" if folder else path
            with open(probe, "ab"):
                pass
            probe.unlink()
    except OSError as error:
        raise UserError(f"cannot write {option} {path}: {_why_not_writable(error)}") from None
    finally:
        for parent in created:  # deepest first
            if parent.is_dir():
                parent.rmdir()


def _why_not_writable(error: OSError) -> str:
    culprit = Path(error.filename) if error.filename else None
    if error.errno == errno.EEXIST and culprit is not None:
        return f"{culprit} is a file, not a folder; choose another path"
    if error.errno == errno.ENOENT and culprit is not None and culprit.parent.is_dir():
        return f"the folder {culprit.parent} does not accept new files; choose a folder you can write"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{(error.strerror or 'not allowed').lower()}; choose a folder you can write"
    if error.errno == errno.EISDIR:
        return "it is a folder; give a file name"
    return f"{(error.strerror or str(error)).lower()}; choose another path"


def guidance_label(cfg: bool, cfg_batch: int, cfg_calls: int = 1) -> str:
    """How guidance reaches the transformer, in words (``cfg_batch``: rows per prompt under guidance;
    ``cfg_calls``: calls per step under guidance)."""
    if not cfg:
        return "no CFG"
    if cfg_calls == 2:
        return "CFG as two calls per step"
    return "CFG" if cfg_batch == 2 else "guidance-distilled: guidance is an input"


def add_size_arguments(parser: argparse.ArgumentParser) -> None:
    """The size of what a named architecture is measured on (macs, bench): an image's side, or a video's
    height, width and frames."""
    parser.add_argument(
        "--resolution",
        "--height",
        dest="resolution",
        type=int,
        default=None,
        help="square image side in pixels (default 1024), or a video's height (default 480)",
    )
    parser.add_argument(
        "--width",
        type=int,
        default=None,
        help="a video's width in pixels (default: the family's for the height: 480p is 480x832 for Wan, "
        "480x848 for HunyuanVideo 1.5; 720p is 720x1280)",
    )
    parser.add_argument(
        "--frames", type=int, default=None, help="a video model's frames (default: its pipeline's; Wan: 81)"
    )


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the commands that generate many images into a resumable folder (eval, frontier):
    seeds, guidance, device, dtype, the folder, progress bars and CPU threads."""
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default: 0)")
    parser.add_argument("--guidance-scale", type=float, help="default: the pipeline's")
    parser.add_argument("--device", help="default: cuda when available (each process its own GPU)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    parser.add_argument("--out", required=True, help="output folder (rerun with the same one to resume)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_threads_argument(parser)


def add_context_parallel_argument(parser: argparse.ArgumentParser) -> None:
    """``--context-parallel``, as the commands that run one generation across GPUs take it."""
    parser.add_argument(
        "--context-parallel",
        choices=("ulysses",),
        help="share each transformer call's tokens among the processes of torchrun --nproc_per_node P "
        "(diffusers' Ulysses context parallelism, one GPU each; Wan and Flux); CAT pruning shares the "
        "recomputed tokens and the K/V caches alike",
    )


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads``, as every command that times generations takes it."""
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: 1 for a model under 100M parameters on the CPU, whose kernels are "
        "too small to share; torch's default otherwise)",
    )
