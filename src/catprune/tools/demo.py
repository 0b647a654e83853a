"""``catprune demo``: full vs CAT-pruned generation on a small random-weight SD3 model, offline, in seconds.

The model has SD3's architecture at a small width with random weights: it shows the mechanism and its
cost (time, MACs), not image quality.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from ..config import CATPruningConfig
from ..integration import apply_cat_pruning, remove_cat_pruning

TEXT_TOKENS = 333
"""As many text tokens as SD3's pipeline feeds its transformer (77 CLIP + 256 T5)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="full vs CAT-pruned generation on a small random-weight SD3 model (offline, seconds)"
    )
    parser.add_argument("--steps", type=int, default=28, help="denoising steps (default: 28)")
    parser.add_argument(
        "--keep-ratio", type=float, default=0.3, help="share of tokens recomputed (default: 0.3)"
    )
    parser.add_argument("--start-step", type=int, default=8, help="first pruned step (default: 8)")
    parser.add_argument("--resolution", type=int, default=512, help="image side in pixels (default: 512)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


def build_pipeline(seed: int) -> Any:
    """SD3's structure at width 256 (4 heads x 64), 4 blocks; no text encoders or VAE are needed."""
    # Imported here: diffusers' SD3 pipeline needs transformers, which the other commands do not.
    from diffusers import StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=64,
        patch_size=2,
        in_channels=16,
        num_layers=4,
        attention_head_dim=64,
        num_attention_heads=4,
        joint_attention_dim=256,
        caption_projection_dim=256,
        pooled_projection_dim=64,
        out_channels=16,
        pos_embed_max_size=96,
    ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def run(args: argparse.Namespace) -> int:
    config = CATPruningConfig(keep_ratio=args.keep_ratio, start_step=args.start_step)
    if args.steps <= config.start_step:
        raise ValueError(f"--steps ({args.steps}) must be larger than --start-step ({config.start_step})")
    if args.resolution % 16:
        raise ValueError(f"--resolution must be a multiple of 16, got {args.resolution}")
    pipe = build_pipeline(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    width = pipe.transformer.config.joint_attention_dim
    pooled = pipe.transformer.config.pooled_projection_dim
    prompts = {
        "prompt_embeds": torch.randn(1, TEXT_TOKENS, width, generator=generator),
        "negative_prompt_embeds": torch.randn(1, TEXT_TOKENS, width, generator=generator),
        "pooled_prompt_embeds": torch.randn(1, pooled, generator=generator),
        "negative_pooled_prompt_embeds": torch.randn(1, pooled, generator=generator),
    }
    latent_side = args.resolution // 8
    latents = torch.randn(1, 16, latent_side, latent_side, generator=generator)

    def generate(steps: int = args.steps) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        images = pipe(
            height=args.resolution,
            width=args.resolution,
            num_inference_steps=steps,
            guidance_scale=7.0,
            latents=latents,
            output_type="latent",
            **prompts,
        ).images
        return images, time.perf_counter() - start

    print(
        f"SD3 architecture, random weights, width 256, 4 blocks, {args.resolution}x{args.resolution} "
        f"({(latent_side // 2) ** 2} image tokens + {TEXT_TOKENS} text tokens), {args.steps} steps, CFG"
    )
    pipe.set_progress_bar_config(leave=False)
    generate(steps=2)  # warm-up: first calls pay one-time allocation and dispatch costs
    full, full_seconds = generate()
    state = apply_cat_pruning(pipe, config)
    pruned, pruned_seconds = generate()
    stats = state.stats
    remove_cat_pruning(pipe)

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
    return 0
