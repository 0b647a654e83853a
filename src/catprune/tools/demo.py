"""``catprune demo``: full vs CAT-pruned generation on a small random-weight SD3 model, offline, in seconds.

The model (``catprune.adapters.sd3.MINIATURE``) has SD3's architecture at a small width with random weights:
it shows the mechanism and its cost (time, MACs), not image quality.
"""

from __future__ import annotations

import argparse
import functools
from typing import TYPE_CHECKING, Any

from ..config import CATPruningConfig
from ..formatting import plural
from .arguments import add_command, add_pruning_arguments, check_steps

if TYPE_CHECKING:  # imported where used: the command's --help imports no torch
    import torch

    from ..architectures import Architecture

STEPS = 28
"""The demo's default steps: SD3's (``SD3Adapter.default_steps``; ``tests/test_cli.py`` checks they agree)."""


def __getattr__(name: str) -> Any:
    """:data:`MODEL` is built on first use: ``catprune demo --help`` imports no torch."""
    if name == "MODEL":
        return model()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def model() -> Architecture:
    """SD3's structure at width 256 (4 heads x 64), 4 blocks, fed as many text tokens as SD3's pipeline
    (``MODEL``)."""
    from ..adapters.sd3 import MINIATURE, SD3Adapter
    from ..architectures import Architecture

    return Architecture(
        "sd3-miniature", SD3Adapter.family, MINIATURE.config, MINIATURE.text_tokens, SD3Adapter.default_steps
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "demo")
    add_pruning_arguments(parser, steps=STEPS)
    parser.add_argument("--resolution", type=int, default=512, help="image side in pixels (default: 512)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs of each, alternating after a warm-up (default: 3)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: 1: the model's kernels are too small to share)",
    )
    parser.set_defaults(func=run)


def build_pipeline(seed: int) -> Any:
    """:data:`MODEL` with random weights (seeded by ``seed``) in SD3's pipeline, without text encoders or VAE:
    the demo feeds prompt embeddings and latents and takes latents out."""
    architecture = model()
    # Imported here: diffusers' SD3 pipeline needs transformers, which the other commands do not.
    from transformers.utils import logging

    logging.set_verbosity_error()  # its import-time notes on optional image processors concern no demo part
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=architecture.build("cpu", seed=seed),
        scheduler=architecture.make_scheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def pipeline_inputs(pipe: Any, resolution: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Random prompt embeddings of the shapes SD3's text encoders give (a prompt and a negative prompt)
    and the initial latents, seeded."""
    import torch

    architecture = model()
    generator = torch.Generator().manual_seed(seed)
    conditioning = architecture.conditioning(pipe.transformer, 2, resolution, generator=generator)
    embeds, pooled = conditioning["encoder_hidden_states"], conditioning["pooled_projections"]
    prompts = {
        "prompt_embeds": embeds[:1],
        "negative_prompt_embeds": embeds[1:],
        "pooled_prompt_embeds": pooled[:1],
        "negative_pooled_prompt_embeds": pooled[1:],
    }
    return prompts, torch.randn(architecture.latent_shape(1, resolution), generator=generator)


def run(args: argparse.Namespace) -> int:
    from ..integration import apply_cat_pruning, remove_cat_pruning
    from ..measure import alternating_medians, busy_note, timed
    from ..runtime import use_cpu_threads

    architecture = model()
    config = CATPruningConfig(keep_ratio=args.keep_ratio, start_step=args.start_step)
    check_steps(args.steps, config.start_step)
    if args.resolution % 16:
        raise ValueError(f"--resolution must be a multiple of 16, got {args.resolution}")
    pipe = build_pipeline(args.seed)
    device = pipe.transformer.device
    prompts, latents = pipeline_inputs(pipe, args.resolution, args.seed)

    def generate(steps: int = args.steps) -> tuple[torch.Tensor, float]:
        def call() -> torch.Tensor:
            return pipe(
                height=args.resolution,
                width=args.resolution,
                num_inference_steps=steps,
                guidance_scale=architecture.guidance_scale,
                latents=latents,
                output_type="latent",
                **prompts,
            ).images

        return timed(call, device)

    width = architecture.config["num_attention_heads"] * architecture.config["attention_head_dim"]
    print(
        f"SD3 architecture, random weights, width {width}, {architecture.config['num_layers']} blocks, "
        f"{args.resolution}x{args.resolution} "
        f"({architecture.image_tokens(args.resolution)} image tokens + {architecture.text_tokens} text "
        "tokens), "
        f"{args.steps} steps, CFG"
    )
    pipe.set_progress_bar_config(disable=True)
    threads = use_cpu_threads(pipe.transformer, args.threads)
    generate(steps=2)  # warm-up: first calls pay one-time allocation and dispatch costs
    results: dict[str, Any] = {}

    def full_run() -> float:
        results["full"], seconds = generate()
        return seconds

    def cat_run() -> float:
        state = apply_cat_pruning(pipe, config)
        try:
            results["cat"], seconds = generate()
        finally:
            remove_cat_pruning(pipe)
        results["stats"] = state.stats
        return seconds

    medians, cpu_share = alternating_medians({"full": full_run, "cat": cat_run}, args.repeats)
    full, pruned, stats = results["full"], results["cat"], results["stats"]
    full_seconds, pruned_seconds = medians["full"], medians["cat"]

    error = (pruned - full).square().mean().sqrt() / full.square().mean().sqrt()
    print(f"full: {full_seconds:6.2f} s  {stats.full_macs / 1e9:8.1f} GMACs")
    print(
        f"CAT:  {pruned_seconds:6.2f} s  {stats.macs / 1e9:8.1f} GMACs  "
        f"(keeps {stats.kept_tokens} of {stats.image_tokens} tokens from step {config.start_step})"
    )
    print(
        f"speed-up {full_seconds / pruned_seconds:.2f}x, MACs {stats.macs_fraction:.3f} of full "
        f"(bound {1 / stats.macs_fraction:.2f}x); relative RMS difference of the latents {float(error):.3f}"
    )
    print(
        f"times: medians of {args.repeats} alternating runs after a warm-up, {plural(threads, 'CPU thread')}"
    )
    busy = busy_note(cpu_share)
    if busy:
        print(f"note: {busy}; timings on a busy machine vary")
    return 0
