"""``catprune generate``: text to image with CAT pruning, optionally side by side with the full model.

The default model (``shapes-mmdit``, shipped inside the package) runs offline in seconds on a CPU; a hub id
or a local folder of SD3 / PixArt-Sigma works the same where its weights are available.
"""

from __future__ import annotations

import argparse
import math
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import CATPruningConfig
from ..errors import UserError
from ..formatting import plural
from ..names import DTYPE_NAMES, MODEL_NOTES, SHIPPED_MODELS, check_model_name
from ..shapes.scenes import GRAMMAR_HELP
from ..shapes.textures import TEXTURES_GRAMMAR_HELP
from .arguments import (
    add_command,
    add_context_parallel_argument,
    add_pruning_arguments,
    add_threads_argument,
    check_steps,
    check_writable,
)

if TYPE_CHECKING:  # imported where used: ``catprune generate --help`` imports no torch
    import numpy as np
    import torch
    from PIL import Image, ImageFont

    from ..engine import GenerationStats, StepRecord

PANEL = 256
"""Side of each panel in pixels: the shapes models' 32x32 and 64x64 images are upscaled (nearest) to it."""
MARGIN = 8
LABEL_HEIGHT = 20
LEGEND_HEIGHT = 30
DIFF_GAIN = 4
"""The difference panel shows ``DIFF_GAIN * |full - CAT|`` so that small errors are visible."""
HEAT_ANCHORS = ((48, 18, 59), (40, 120, 220), (30, 200, 140), (250, 220, 40), (220, 40, 20))
"""Colours of the heat map from "never recomputed" to "recomputed at every pruned step" (blue to red)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "generate")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        f"Prompts of the shipped shapes models (shapes-mmdit, shapes-pixart; 32x32):\n{GRAMMAR_HELP}\n\n"
        f"{TEXTURES_GRAMMAR_HELP}\n\n" + textwrap.fill(f"Note: {MODEL_NOTES['textures-mmdit']}.", 100)
    )
    parser.add_argument("prompt", help="text prompt (for the shapes models: their caption grammar, below)")
    parser.add_argument(
        "--model",
        default="shapes-mmdit",
        help=f"{', '.join(SHIPPED_MODELS)} (shipped), a hub id or a pipeline folder (default: %(default)s)",
    )
    add_pruning_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    parser.add_argument(
        "--compare",
        action="store_true",
        help="write full | CAT | difference | selection frequency, with timings",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="with --compare: timed runs of each, alternating after a warm-up; medians (default: 3)",
    )
    parser.add_argument(
        "--out", type=Path, help="output PNG (default: compare.png with --compare, else image.png, here)"
    )
    real = parser.add_argument_group("real models (hub id or folder)")
    real.add_argument("--height", type=int, help="image height in pixels (default: the pipeline's)")
    real.add_argument("--width", type=int, help="image width in pixels (default: the pipeline's)")
    real.add_argument("--negative-prompt", help="what the image should not show")
    real.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda when available)")
    real.add_argument(
        "--dtype", choices=("auto", *DTYPE_NAMES), default="auto", help="default: float16 on cuda"
    )
    add_context_parallel_argument(real)
    add_threads_argument(parser)
    parser.set_defaults(func=run)


class SelectionCounter:
    """A pruning observer: counts, per image token, the pruned steps that recomputed it in the last prompt
    row (the conditional row of the last prompt under CFG). Counts stay on the device: no host reads."""

    def __init__(self) -> None:
        self.counts: torch.Tensor | None = None
        self.pruned_steps = 0
        self.num_tokens = 0

    def __call__(self, record: StepRecord) -> None:
        import torch

        self.num_tokens = record.height * record.width
        if record.indices is None:
            return
        # scatter_add_ on the device: bincount would read the indices' maximum on the host to size its output.
        indices = record.indices[-1]
        if self.counts is None:
            self.counts = torch.zeros(self.num_tokens, dtype=torch.long, device=indices.device)
        self.counts.scatter_add_(0, indices, torch.ones_like(indices))
        self.pruned_steps += 1

    def frequency(self) -> np.ndarray:
        """(tokens,) share of pruned steps that recomputed each token."""
        import numpy as np

        if self.counts is None or not self.pruned_steps:
            return np.zeros(self.num_tokens)
        return (self.counts.float() / self.pruned_steps).cpu().numpy()


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] to uint8 RGB by linear interpolation between ``HEAT_ANCHORS``."""
    import numpy as np

    anchors = np.array(HEAT_ANCHORS, np.float32)
    position = np.clip(values, 0, 1) * (len(HEAT_ANCHORS) - 1)
    low = np.minimum(position.astype(int), len(HEAT_ANCHORS) - 2)
    weight = (position - low)[..., None]
    return ((1 - weight) * anchors[low] + weight * anchors[low + 1]).round().astype(np.uint8)


def frequency_image(frequency: np.ndarray, width: int, height: int) -> Image.Image:
    """The per-token frequency as a heat map on the token grid, shaped like the image."""
    from PIL import Image

    rows = max(1, round(math.sqrt(frequency.size * height / width)))
    grid = frequency.reshape(rows, frequency.size // rows)
    return Image.fromarray(heat_colours(grid))


def panel(image: Image.Image) -> Image.Image:
    """Fit an image to ``PANEL``: nearest-neighbour when enlarging (crisp pixels), Lanczos when shrinking."""
    from PIL import Image

    resample = Image.Resampling.NEAREST if image.width <= PANEL else Image.Resampling.LANCZOS
    return image.resize((PANEL, PANEL * image.height // image.width), resample)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def compare_figure(
    full: Image.Image, cat: Image.Image, frequency: np.ndarray, labels: list[str]
) -> Image.Image:
    """full | CAT | gain x |difference| | selection frequency, labelled, with the heat map's legend."""
    import numpy as np
    from PIL import Image, ImageDraw

    difference = np.abs(np.asarray(full, np.int16) - np.asarray(cat, np.int16)).mean(-1) * DIFF_GAIN
    panels = [
        panel(full),
        panel(cat),
        panel(Image.fromarray(np.clip(difference, 0, 255).astype(np.uint8)).convert("RGB")),
    ]
    panels.append(
        frequency_image(frequency, full.width, full.height).resize(panels[0].size, Image.Resampling.NEAREST)
    )
    panel_height = panels[0].height
    figure = Image.new(
        "RGB",
        (4 * PANEL + 5 * MARGIN, MARGIN + LABEL_HEIGHT + panel_height + LEGEND_HEIGHT + MARGIN),
        "white",
    )
    draw = ImageDraw.Draw(figure)
    font = _font(14)
    top = MARGIN + LABEL_HEIGHT
    for i, (image, label) in enumerate(zip(panels, labels, strict=True)):
        left = MARGIN + i * (PANEL + MARGIN)
        draw.text((left, MARGIN), label, fill="black", font=font)
        figure.paste(image, (left, top))
        # A frame keeps white-background images apart from the white figure.
        draw.rectangle((left - 1, top - 1, left + image.width, top + image.height), outline=(160, 160, 160))
    legend_left, legend_top = MARGIN + 3 * (PANEL + MARGIN), top + panel_height + 4
    ramp = heat_colours(np.linspace(0, 1, PANEL))[None].repeat(8, axis=0)
    figure.paste(Image.fromarray(ramp), (legend_left, legend_top))
    draw.text((legend_left, legend_top + 10), "0%", fill="black", font=font)
    right_label = "100% of pruned steps"
    right = legend_left + PANEL - draw.textlength(right_label, font=font)
    draw.text((right, legend_top + 10), right_label, fill="black", font=font)
    return figure


def generate_with_cat(
    pipe: Any, args: argparse.Namespace, config: CATPruningConfig, steps: int, options: dict[str, Any]
) -> tuple[Image.Image, float, GenerationStats, np.ndarray]:
    """A CAT-pruned image, its wall time, the pruning statistics and each token's selection frequency."""
    from PIL import Image

    from ..runtime import run_generation

    counter = SelectionCounter()
    result = run_generation(
        pipe, args.prompt, steps, args.seed, config, args.guidance, observers=[counter], **options
    )
    assert result.stats is not None  # pruning was applied
    return Image.fromarray(result.images[0]), result.seconds, result.stats, counter.frequency()


def _report(name: str, seconds: float, macs: int, full_macs: int) -> str:
    return f"{name}: {seconds:.2f} s, {macs / 1e9:.2f} GMACs ({macs / full_macs:.0%} of full)"


def _pipeline_options(args: argparse.Namespace, grammar: str | None) -> dict[str, Any]:
    """The real-model options that were given, as pipeline arguments (the shapes models, which have a
    caption ``grammar``, take none)."""
    options = {
        name: value
        for name, value in (
            ("height", args.height),
            ("width", args.width),
            ("negative_prompt", args.negative_prompt),
        )
        if value is not None
    }
    if grammar is not None and options:
        from ..shapes.pipelines import model_image_size

        flags = ", ".join(f"--{name.replace('_', '-')}" for name in options)
        side = model_image_size(args.model)
        raise UserError(
            f"{flags}: {args.model} draws {side}x{side} images from its caption grammar only (no size "
            "options, no negative prompt)"
        )
    return options


def _prompt(prompt: str, grammar: str | None) -> str:
    """The prompt as the model reads it: a shapes model's caption in its grammar's canonical object order
    (``grammar``: :func:`~catprune.shapes.pipelines.prompt_grammar`, None for other models)."""
    if grammar is None:
        return prompt
    from ..shapes.pipelines import normalize_model_prompt
    from ..shapes.scenes import PromptGrammarError

    try:
        canonical = normalize_model_prompt(prompt, grammar)
    except PromptGrammarError as error:
        raise UserError(str(error)) from None
    if canonical != prompt:
        print(f"prompt read as: {canonical}")
    return canonical


def run(args: argparse.Namespace) -> int:
    """One generation (or the comparison); under ``--context-parallel`` in every process of the group, the
    first one printing and writing the image."""
    from .. import parallelism

    if args.context_parallel is not None:
        args.device = str(parallelism.start(args.device))
    try:
        with parallelism.quiet_unless_first():
            return _run(args)
    finally:
        parallelism.finish()


def _run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from .. import parallelism
    from ..measure import alternating_medians, busy_note
    from ..runtime import load_pipeline, psnr, run_generation, use_cpu_threads, warm_up
    from ..shapes.pipelines import prompt_grammar

    config = CATPruningConfig(keep_ratio=args.keep_ratio, start_step=args.start_step)
    check_steps(args.steps, config.start_step)
    args.out = args.out or Path("compare.png" if args.compare else "image.png")
    if args.out.suffix.lower() != ".png":
        raise UserError(f"--out must be a .png file, got {args.out}")
    if args.repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {args.repeats}")
    if parallelism.is_first_process():  # the others write nothing
        check_writable(args.out)
    check_model_name(args.model)
    grammar = prompt_grammar(args.model)
    options = _pipeline_options(args, grammar)
    args.prompt = _prompt(args.prompt, grammar)
    if str(args.model) in MODEL_NOTES:
        print(f"note: {MODEL_NOTES[str(args.model)]}")
    pipe = load_pipeline(args.model, args.device, args.dtype)
    if args.context_parallel is not None:
        parallelism.enable(pipe.transformer)
    writes = parallelism.is_first_process()
    use_cpu_threads(pipe.transformer, args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not args.compare:
        cat, cat_seconds, stats, frequency = generate_with_cat(pipe, args, config, args.steps, options)
        if writes:
            (panel(cat) if cat.width < PANEL else cat).save(args.out)
        print(_report("CAT", cat_seconds, stats.macs, stats.full_macs))
        print(f"wrote {args.out}")
        return 0
    # A short pruned generation runs the full and the pruned code paths once, so that no timed run pays
    # for one-off initialisation; then full and CAT alternate, and each time printed is their median.
    warm_up(pipe, args.prompt, args.steps, args.seed, config, args.guidance, **options)
    runs: dict[str, Any] = {}

    def full_run() -> float:
        runs["full"] = run_generation(
            pipe, args.prompt, args.steps, args.seed, guidance_scale=args.guidance, **options
        )
        return runs["full"].seconds

    def cat_run() -> float:
        runs["cat"] = generate_with_cat(pipe, args, config, args.steps, options)
        return runs["cat"][1]

    medians, cpu_share = alternating_medians({"full": full_run, "cat": cat_run}, args.repeats)
    full, full_seconds = Image.fromarray(runs["full"].images[0]), medians["full"]
    cat, _, stats, frequency = runs["cat"]
    cat_seconds = medians["cat"]
    quality = psnr(np.asarray(full), np.asarray(cat))
    labels = [
        f"full ({args.steps} steps)",
        f"CAT (keep {config.keep_ratio:.0%} from step {config.start_step})",
        f"|full - CAT| x{DIFF_GAIN}  (PSNR {quality:.1f} dB)",
        f"recomputed, of {stats.pruned_steps} pruned steps",
    ]
    if writes:
        compare_figure(full, cat, frequency, labels).save(args.out)
    print(_report("full", full_seconds, stats.full_macs, stats.full_macs))
    print(_report("CAT ", cat_seconds, stats.macs, stats.full_macs))
    threads = (
        f", {plural(torch.get_num_threads(), 'CPU thread')}" if pipe.transformer.device.type == "cpu" else ""
    )
    print(
        f"speed-up {full_seconds / cat_seconds:.2f}x (MAC bound {stats.full_macs / stats.macs:.2f}x); "
        f"times are medians of {args.repeats} alternating runs{threads}"
    )
    busy = busy_note(cpu_share) if pipe.transformer.device.type == "cpu" else ""
    if busy:
        print(f"note: {busy}; timings on a busy machine vary")
    print(f"PSNR of CAT against full: {quality:.2f} dB")
    print(f"wrote {args.out}")
    return 0
