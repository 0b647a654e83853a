"""Pruning combined with the rest of diffusers: tiny real components, random weights, no downloads."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import POOLED_DIM, TEXT_DIM, sd3_prompts, seeded_latents, tiny_sd3
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3ControlNetModel,
    SD3MultiControlNetModel,
    StableDiffusion3ControlNetPipeline,
)

from catprune import CATPruningConfig, apply_cat_pruning

STEPS, START = 6, 3


def tiny_controlnet(seed: int) -> SD3ControlNetModel:
    """An SD3 ControlNet matching ``tiny_sd3`` (one block: its residual is added to every block)."""
    torch.manual_seed(seed)
    return SD3ControlNetModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=TEXT_DIM,
        caption_projection_dim=32,
        pooled_projection_dim=POOLED_DIM,
        out_channels=4,
        pos_embed_max_size=32,
    ).eval()


def tiny_vae() -> AutoencoderKL:
    """Encodes the control image: 4 latent channels, downscale 2 (32x32 pixels -> 16x16 latents)."""
    torch.manual_seed(0)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        shift_factor=0.1,
    ).eval()


def controlnet_pipeline(controlnets: int) -> StableDiffusion3ControlNetPipeline:
    controlnet: Any = tiny_controlnet(1)
    if controlnets > 1:
        controlnet = SD3MultiControlNetModel([tiny_controlnet(seed + 1) for seed in range(controlnets)])
    pipe = StableDiffusion3ControlNetPipeline(
        transformer=tiny_sd3(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
        controlnet=controlnet,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate_with_control(pipe: StableDiffusion3ControlNetPipeline, controlnets: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    images = [torch.rand(1, 3, 32, 32, generator=generator) * 2 - 1 for _ in range(controlnets)]
    return pipe(
        control_image=images[0] if controlnets == 1 else images,
        controlnet_conditioning_scale=0.7 if controlnets == 1 else [0.7, 0.4],
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        latents=seeded_latents(1),
        output_type="latent",
        **sd3_prompts(1),
    ).images


@pytest.mark.parametrize("controlnets", [1, 2], ids=["controlnet", "multi-controlnet"])
def test_controlnet_residuals_are_gathered_at_the_selected_tokens(controlnets: int) -> None:
    """Regression: the residuals of all N image tokens were added to the K gathered ones (a crash at the
    first pruned step). They are gathered like the tokens: keep 1.0 equals the unpatched pipeline."""
    pipe = controlnet_pipeline(controlnets)
    reference = generate_with_control(pipe, controlnets)
    state = apply_cat_pruning(pipe, CATPruningConfig(keep_ratio=1.0, start_step=START))
    torch.testing.assert_close(generate_with_control(pipe, controlnets), reference, atol=1e-5, rtol=0)

    pipe = controlnet_pipeline(controlnets)
    state = apply_cat_pruning(pipe, CATPruningConfig(keep_ratio=0.3, start_step=START))
    pruned = generate_with_control(pipe, controlnets)
    assert (state.stats.steps, state.stats.pruned_steps) == (STEPS, STEPS - START)
    assert pruned.shape == reference.shape and torch.isfinite(pruned).all()
    assert not torch.allclose(pruned, reference, atol=1e-4)
