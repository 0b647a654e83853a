"""``catprune generate``: text to image with CAT pruning, optionally side by side with the full model.

The default model (``shapes-mmdit``, shipped inside the package) runs offline in seconds on a CPU; a hub id
or a local folder of SD3 / PixArt-Sigma works the same where its weights are available.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..cli import CLIError
from ..config import CATPruningConfig
from ..integration import apply_cat_pruning, remove_cat_pruning
from ..pruning import GenerationStats, PruningState, StepMode
from ..shapes.pipelines import SHIPPED_MODELS, load_shapes_pipeline, shapes_pipeline_class

PANEL = 256
"""Side of each panel in pixels: the 32x32 shapes images are upscaled (nearest) to it."""
MARGIN = 8
LABEL_HEIGHT = 20
LEGEND_HEIGHT = 30
DIFF_GAIN = 4
"""The difference panel shows ``DIFF_GAIN * |full - CAT|`` so that small errors are visible."""
HEAT_ANCHORS = np.array(
    [(48, 18, 59), (40, 120, 220), (30, 200, 140), (250, 220, 40), (220, 40, 20)], np.float32
)
"""Colours of the heat map from "never recomputed" to "recomputed at every pruned step" (blue to red)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate an image with CAT pruning (default: the shipped shapes-mmdit model, offline, seconds)",
    )
    parser.add_argument("prompt", help="text prompt (for the shapes models: words of their caption grammar)")
    parser.add_argument(
        "--model",
        default="shapes-mmdit",
        help=f"{' or '.join(SHIPPED_MODELS)} (shipped), a hub id or a pipeline folder (default: %(default)s)",
    )
    parser.add_argument("--steps", type=int, default=28, help="denoising steps (default: 28)")
    parser.add_argument(
        "--keep-ratio", type=float, default=0.3, help="share of tokens recomputed (default: 0.3)"
    )
    parser.add_argument("--start-step", type=int, default=8, help="first pruned step (default: 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    parser.add_argument(
        "--compare",
        action="store_true",
        help="write full | CAT | difference | selection frequency, with timings",
    )
    parser.add_argument("--out", type=Path, required=True, help="output PNG")
    parser.set_defaults(func=run)


def load_pipeline(model: str) -> Any:
    """A shipped or saved shapes pipeline, else any diffusers pipeline (fp16 on CUDA when available)."""
    from diffusers.utils import logging

    logging.set_verbosity_error()  # the outcome is reported in one line; hub retries are noise here
    logging.disable_progress_bar()
    if model in SHIPPED_MODELS or shapes_pipeline_class(model) is not None:
        return load_shapes_pipeline(model)
    from diffusers import DiffusionPipeline

    cuda = torch.cuda.is_available()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch_dtype: renamed in newer diffusers only
            pipe = DiffusionPipeline.from_pretrained(
                model, torch_dtype=torch.float16 if cuda else torch.float32
            )
    except Exception as error:  # hub, network and format errors all mean the same thing to the user
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CLIError(
            f"cannot load model {model!r} (not a shipped model, a local pipeline folder, or a hub id whose "
            f"weights are available here): {reason}"
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cuda") if cuda else pipe


def generate(
    pipe: Any, prompt: str, steps: int, guidance: float | None, seed: int
) -> tuple[Image.Image, float]:
    """One image and its wall time in seconds."""
    device = pipe.transformer.device
    kwargs: dict[str, Any] = {
        "num_inference_steps": steps,
        "generator": torch.Generator(device).manual_seed(seed),
    }
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    image = pipe(prompt, **kwargs).images[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return image.convert("RGB"), time.perf_counter() - start


class SelectionCounter:
    """Counts, per image token, the pruned steps that recomputed it (the conditional row under CFG)."""

    def __init__(self, state: PruningState) -> None:
        self.state = state
        self.counts: torch.Tensor | None = None

    def __call__(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self.state.mode is not StepMode.PRUNED or self.state.indices is None:
            return
        # On the device, without a host read: bincount would sync to size its output.
        indices = self.state.indices[-1]
        if self.counts is None:
            self.counts = torch.zeros(self.state.num_tokens, dtype=torch.long, device=indices.device)
        self.counts.scatter_add_(0, indices, torch.ones_like(indices))

    def frequency(self) -> np.ndarray:
        """(tokens,) share of pruned steps that recomputed each token."""
        if self.counts is None or not self.state.stats.pruned_steps:
            return np.zeros(self.state.stats.image_tokens)
        return (self.counts.float() / self.state.stats.pruned_steps).cpu().numpy()


def psnr(a: Image.Image, b: Image.Image) -> float:
    """PSNR in dB between two 8-bit images (inf when identical)."""
    error = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return math.inf if error == 0 else 10 * math.log10(255.0**2 / error)


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] to uint8 RGB by linear interpolation between ``HEAT_ANCHORS``."""
    position = np.clip(values, 0, 1) * (len(HEAT_ANCHORS) - 1)
    low = np.minimum(position.astype(int), len(HEAT_ANCHORS) - 2)
    weight = (position - low)[..., None]
    return ((1 - weight) * HEAT_ANCHORS[low] + weight * HEAT_ANCHORS[low + 1]).round().astype(np.uint8)


def frequency_image(frequency: np.ndarray, width: int, height: int) -> Image.Image:
    """The per-token frequency as a heat map on the token grid, shaped like the image."""
    rows = max(1, round(math.sqrt(frequency.size * height / width)))
    grid = frequency.reshape(rows, frequency.size // rows)
    return Image.fromarray(heat_colours(grid))


def panel(image: Image.Image) -> Image.Image:
    """Fit an image to ``PANEL``: nearest-neighbour when enlarging (crisp pixels), Lanczos when shrinking."""
    resample = Image.Resampling.NEAREST if image.width <= PANEL else Image.Resampling.LANCZOS
    return image.resize((PANEL, PANEL * image.height // image.width), resample)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def compare_figure(
    full: Image.Image, cat: Image.Image, frequency: np.ndarray, labels: list[str]
) -> Image.Image:
    """full | CAT | gain x |difference| | selection frequency, labelled, with the heat map's legend."""
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
    pipe: Any, args: argparse.Namespace, config: CATPruningConfig, steps: int
) -> tuple[Image.Image, float, GenerationStats, np.ndarray]:
    """A CAT-pruned image, its wall time, the pruning statistics and each token's selection frequency."""
    state = apply_cat_pruning(pipe, config)
    counter = SelectionCounter(state)
    handle = pipe.transformer.register_forward_hook(counter)
    try:
        image, seconds = generate(pipe, args.prompt, steps, args.guidance, args.seed)
    finally:
        handle.remove()
        remove_cat_pruning(pipe)
    return image, seconds, state.stats, counter.frequency()


def _report(name: str, seconds: float, macs: int, full_macs: int) -> str:
    return f"{name}: {seconds:.2f} s, {macs / 1e9:.2f} GMACs ({macs / full_macs:.0%} of full)"


def run(args: argparse.Namespace) -> int:
    config = CATPruningConfig(keep_ratio=args.keep_ratio, start_step=args.start_step)
    if args.steps <= config.start_step:
        raise CLIError(f"--steps ({args.steps}) must be larger than --start-step ({config.start_step})")
    if args.out.suffix.lower() != ".png":
        raise CLIError(f"--out must be a .png file, got {args.out}")
    pipe = load_pipeline(args.model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.compare:
        # A short pruned generation runs the full and the pruned code paths once, so that neither timed
        # run pays for one-off initialisation.
        generate_with_cat(pipe, args, config, config.start_step + 2)
        full, full_seconds = generate(pipe, args.prompt, args.steps, args.guidance, args.seed)
    cat, cat_seconds, stats, frequency = generate_with_cat(pipe, args, config, args.steps)
    if not args.compare:
        (panel(cat) if cat.width < PANEL else cat).save(args.out)
        print(_report("CAT", cat_seconds, stats.macs, stats.full_macs))
        print(f"wrote {args.out}")
        return 0
    quality = psnr(full, cat)
    labels = [
        f"full ({args.steps} steps)",
        f"CAT (keep {config.keep_ratio:.0%} from step {config.start_step})",
        f"|full - CAT| x{DIFF_GAIN}  (PSNR {quality:.1f} dB)",
        f"recomputed, of {stats.pruned_steps} pruned steps",
    ]
    compare_figure(full, cat, frequency, labels).save(args.out)
    print(_report("full", full_seconds, stats.full_macs, stats.full_macs))
    print(_report("CAT ", cat_seconds, stats.macs, stats.full_macs))
    print(f"PSNR of CAT against full: {quality:.2f} dB")
    print(f"wrote {args.out}")
    return 0
