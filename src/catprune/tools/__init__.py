"""The command line's subcommands, one module each (``register(subparsers)`` adds its subcommand).

Tools import the library, never each other; what several of them share lives in
``catprune.tools.arguments``. This module is data only, so that ``catprune --help`` imports nothing heavy.
"""

from __future__ import annotations

from typing import NamedTuple


class Command(NamedTuple):
    """One subcommand: where it lives and how its help describes it."""

    module: str
    summary: str
    """The one line ``catprune --help`` lists; its ``--help`` starts with it."""
    details: str = ""
    """The rest of its ``--help`` description."""


COMMANDS: dict[str, Command] = {
    "demo": Command(
        "catprune.tools.demo",
        "full vs CAT-pruned generation on a small random-weight SD3 model (offline)",
    ),
    "macs": Command(
        "catprune.tools.macs",
        "count transformer MACs of full and CAT generations (no weights needed)",
        "FlopCounterMode counts them while the real forward runs (pruning applied) on the meta device: no "
        "weights, no memory, no GPU.",
    ),
    "bench": Command(
        "catprune.tools.bench",
        "time full vs CAT denoising loops and compare the speedup with the MAC bound",
        "The denoising loop runs as the diffusers pipeline runs it (with its scheduler), in full and with "
        "CAT pruning, alternating after a warm-up. Text encoding is excluded: the prompt embeddings are "
        "random tensors of the pipeline's shapes.",
    ),
    "models": Command(
        "catprune.tools.models",
        "the support matrix: every transformer class in the installed diffusers, supported or why not",
        "Supported classes come from the adapter registry, with their named architectures and the pipelines "
        "the tests run; docs/models.md is this command's output (--write docs/models.md).",
    ),
    "generate": Command(
        "catprune.tools.generate",
        "generate an image with CAT pruning (default: the shipped shapes-mmdit model, offline, seconds)",
    ),
    "train-shapes": Command(
        "catprune.tools.train_shapes",
        "train the shapes-mmdit or shapes-pixart model (resumes when --out holds a checkpoint)",
    ),
    "viz": Command(
        "catprune.tools.viz",
        "diagnostic figures of the paper (figures 3-9) as PNGs",
        "Each figure is drawn from a real run; the plotted data are saved beside the PNG (same name, .npz "
        "and .json).",
    ),
    "eval": Command(
        "catprune.tools.eval",
        "compare methods at equal budget: MACs, throughput, CLIP/alignment, PSNR/SSIM vs full",
        "One image per (method, prompt index), seeded by the prompt index, summarised as the paper's Tables "
        "2/3. Resumable (a rerun skips finished items); data-parallel with `accelerate launch -m catprune "
        "eval ...`.",
    ),
    "frontier": Command(
        "catprune.tools.frontier",
        "pruned settings against fewer steps: PSNR/SSIM vs MACs and time, the Pareto frontier",
        "The unpruned model at the reference steps (the reference image) and at fewer steps (the curve), and "
        "a grid of pruned settings (--steps x --grid FIELD=V1,V2 of any CATPruningConfig field), one image "
        "per (setting, prompt). Writes a table (frontier.csv, frontier.md) with each setting's dB above the "
        "fewer-steps curve at equal MACs, and a plot (frontier.png). Resumable and data-parallel like "
        "`catprune eval`.",
    ),
}
"""Every subcommand by name.

Each module defines ``register(subparsers)``, which adds its subcommand with
:func:`catprune.tools.arguments.add_command` (the same summary) and sets ``func=run(args) -> int``."""
