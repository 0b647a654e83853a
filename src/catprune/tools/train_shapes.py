"""``catprune train-shapes``: train a shapes model (resumable) and save it as a diffusers pipeline."""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path

from ..errors import UserError
from ..formatting import plural
from ..shapes.train_config import ARCHES, DATASETS, TrainConfig
from .arguments import add_command, settings_from_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    defaults = TrainConfig(steps=1)
    parser = add_command(subparsers, "train-shapes")
    parser.add_argument("--arch", choices=ARCHES, required=True)
    parser.add_argument(
        "--data",
        choices=tuple(DATASETS),
        default=defaults.data,
        help="training set: shapes (32x32, plain backgrounds) or textures (64x64, textured; a 32x32 token "
        "grid) (default: %(default)s)",
    )
    parser.add_argument("--out", type=Path, required=True, help="run folder: checkpoint/ and pipeline/")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument(
        "--minutes", type=float, help="train for this much wall time (the LR schedule spans it)"
    )
    budget.add_argument("--steps", type=int, help="train for this many steps")
    parser.add_argument("--width", type=int, default=defaults.width, help=f"(default: {defaults.width})")
    parser.add_argument("--layers", type=int, default=defaults.layers, help=f"(default: {defaults.layers})")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--ema-decay", type=float, default=defaults.ema_decay)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in float32 throughout")
    parser.add_argument(
        "--object-weight",
        type=float,
        default=None,
        help="loss weight of the caption's objects' pixels relative to the backdrop's; may change when "
        "resuming; an undertrained model then floods images with the named colours (default: unweighted, "
        "or the checkpoint's when resuming)",
    )
    parser.add_argument(
        "--checkpoint-every", type=int, default=200, help="steps between checkpoints (default: 200)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--device", default="cpu", help="torch device to train on (default: cpu)")
    parser.add_argument(
        "--data-workers",
        type=int,
        default=0,
        help="processes drawing batches ahead of the model; worth it on a GPU (default: 0, inline)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..shapes.training import Trainer

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.checkpoint_every < 1:
        raise UserError(f"--checkpoint-every must be positive, got {args.checkpoint_every}")
    if args.data_workers < 0:
        raise UserError(f"--data-workers must be 0 or more, got {args.data_workers}")
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        raise UserError(f"cannot train on --device {args.device}: {str(error).splitlines()[0]}") from None
    config = settings_from_arguments(TrainConfig, args)
    trainer = Trainer(
        config,
        args.out,
        checkpoint_every=args.checkpoint_every,
        device=device,
        data_workers=args.data_workers,
    )
    if trainer.step:
        print(f"resuming from step {trainer.step} ({trainer.elapsed / 60:.1f} min trained)", flush=True)
    start = time.perf_counter()
    # A scheduler's or `kill`'s SIGTERM stops the run like Ctrl-C: with a checkpoint of the last step.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        trainer.run()
    except KeyboardInterrupt:
        trainer.save_checkpoint()
        print(f"interrupted: checkpoint of step {trainer.step} saved; run the same command to resume")
        raise
    params = sum(p.numel() for p in trainer.params.values())
    print(
        f"trained {args.arch} on {trainer.config.data}: {plural(trainer.step, 'step')}, "
        f"{trainer.elapsed / 60:.1f} min in all "
        f"({(time.perf_counter() - start) / 60:.1f} min this run), {params / 1e6:.2f}M parameters; "
        f"EMA pipeline in {args.out / 'pipeline'}"
    )
    return 0
