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
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3Pipeline,
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


def sd3_pipeline_with_vae() -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline(
        transformer=tiny_sd3(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_to_image(pipe: StableDiffusion3Img2ImgPipeline) -> torch.Tensor:
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    return pipe(
        image=image,
        strength=0.7,
        num_inference_steps=12,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(6),
        output_type="latent",
        **sd3_prompts(1),
    ).images


def test_pipelines_from_pipe_start_fresh_generations_whichever_runs() -> None:
    """Regression: an img2img pipeline made with ``from_pipe`` after a text-to-image generation ran all its
    steps pruned on the previous prompt's caches (21 steps counted, 17 pruned, for 9 steps at strength
    0.7). The generation start now comes from the shared scheduler, so it is exact."""
    config = CATPruningConfig(keep_ratio=0.3, start_step=START)
    pipe = sd3_pipeline_with_vae()
    state = apply_cat_pruning(pipe, config)
    pipe(
        num_inference_steps=12,
        guidance_scale=5.0,
        latents=seeded_latents(1),
        output_type="latent",
        **sd3_prompts(1, seed=2),
    )
    assert (state.stats.steps, state.stats.pruned_steps) == (12, 12 - START)
    shared = image_to_image(StableDiffusion3Img2ImgPipeline.from_pipe(pipe))
    assert (state.stats.steps, state.stats.pruned_steps) == (9, 9 - START)

    fresh = StableDiffusion3Img2ImgPipeline.from_pipe(sd3_pipeline_with_vae())
    apply_cat_pruning(fresh, config)
    torch.testing.assert_close(shared, image_to_image(fresh), atol=0, rtol=0)


def test_a_pipeline_with_another_scheduler_is_refused_clearly() -> None:
    pipe = sd3_pipeline_with_vae()
    apply_cat_pruning(pipe, CATPruningConfig(start_step=START))
    other = StableDiffusion3Img2ImgPipeline.from_pipe(
        pipe, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0)
    )
    with pytest.raises(RuntimeError, match="another pipeline with its own scheduler"):
        image_to_image(other)


def test_one_step_generations_in_a_row_are_each_a_generation() -> None:
    pipe = sd3_pipeline_with_vae()
    state = apply_cat_pruning(pipe, CATPruningConfig(start_step=START))
    for _ in range(3):
        pipe(num_inference_steps=1, latents=seeded_latents(1), output_type="latent", **sd3_prompts(1))
        assert (state.stats.steps, state.stats.pruned_steps) == (1, 0)
