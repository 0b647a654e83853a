"""Pruning combined with the rest of diffusers: tiny real components, random weights, no downloads."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
from conftest import (
    pixart_pipeline,
    pixart_prompts,
    sd3_pipeline,
    sd3_prompts,
    seeded_latents,
    tiny_pixart,
    tiny_sd3,
    tiny_vae,
)
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    PixArtSigmaPipeline,
    SD3ControlNetModel,
    SD3MultiControlNetModel,
    SD3Transformer2DModel,
    StableDiffusion3ControlNetPipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3InpaintPipeline,
    StableDiffusion3Pipeline,
)
from test_readme import tiny_sd3_pipeline

from catprune import CATPruningConfig, apply_cat_pruning, remove_cat_pruning

STEPS, START = 6, 3


def tiny_controlnet(seed: int) -> SD3ControlNetModel:
    """An SD3 ControlNet matching ``tiny_sd3`` (one block: its residual is added to every block)."""
    accepted = inspect.signature(SD3ControlNetModel.__init__).parameters
    config = {key: value for key, value in tiny_sd3().config.items() if key in accepted}
    torch.manual_seed(seed)
    return SD3ControlNetModel(**{**config, "num_layers": 1}).eval()


def controlnet_pipeline(controlnets: int) -> StableDiffusion3ControlNetPipeline:
    controlnet: Any = tiny_controlnet(1)
    if controlnets > 1:
        controlnet = SD3MultiControlNetModel([tiny_controlnet(seed + 1) for seed in range(controlnets)])
    return sd3_pipeline(tiny_sd3(), tiny_vae(), StableDiffusion3ControlNetPipeline, controlnet=controlnet)


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


def sd3_pipeline_with_vae(latent_channels: int = 4) -> StableDiffusion3Pipeline:
    transformer = tiny_sd3()
    if latent_channels != 4:  # SD3's inpainting pipeline wants SD3's 16 latent channels
        torch.manual_seed(0)
        config = {**transformer.config, "in_channels": latent_channels, "out_channels": latent_channels}
        transformer = SD3Transformer2DModel.from_config(config).eval()
    return sd3_pipeline(transformer, tiny_vae(latent_channels))


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


def test_a_pipeline_with_another_scheduler_is_followed_by_its_timesteps() -> None:
    """A pipeline sharing the transformer with its own scheduler (``from_pipe(..., scheduler=...)``) is not
    the one pruning watches: its steps are told by the timesteps. Refused until the step engine; now each of
    its generations is counted right and keep 1.0 equals the unpatched model."""
    pipe = sd3_pipeline_with_vae()
    other = StableDiffusion3Img2ImgPipeline.from_pipe(
        pipe, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0)
    )
    reference = image_to_image(other)
    engine = apply_cat_pruning(pipe, CATPruningConfig(keep_ratio=1.0, start_step=START))
    torch.testing.assert_close(image_to_image(other), reference, atol=1e-5, rtol=0)
    steps = 12 - int(12 - 12 * 0.7)  # image_to_image's strength cut, as diffusers rounds it
    assert (engine.stats.steps, engine.stats.pruned_steps) == (steps, steps - START)

    remove_cat_pruning(pipe)
    engine = apply_cat_pruning(pipe, CATPruningConfig(keep_ratio=0.3, start_step=START))
    for _ in range(2):
        pruned = image_to_image(other)
        assert (engine.stats.steps, engine.stats.pruned_steps) == (steps, steps - START)
        assert torch.isfinite(pruned).all() and not torch.allclose(pruned, reference, atol=1e-4)


def test_one_step_generations_in_a_row_are_each_a_generation() -> None:
    pipe = sd3_pipeline_with_vae()
    state = apply_cat_pruning(pipe, CATPruningConfig(start_step=START))
    for _ in range(3):
        pipe(num_inference_steps=1, latents=seeded_latents(1), output_type="latent", **sd3_prompts(1))
        assert (state.stats.steps, state.stats.pruned_steps) == (1, 0)


def text_to_image(pipe: StableDiffusion3Pipeline, latents: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    return pipe(
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        latents=latents,
        output_type="latent",
        **{**sd3_prompts(1), **kwargs},
    ).images


def halve_latents(pipe: Any, step: int, timestep: Any, tensors: dict[str, torch.Tensor]) -> dict:
    return {"latents": tensors["latents"] * 0.5} if step == START + 1 else {}


def test_a_callback_that_changes_the_latents_works() -> None:
    pipe = sd3_pipeline_with_vae()
    reference = text_to_image(pipe, seeded_latents(1), callback_on_step_end=halve_latents)
    state = apply_cat_pruning(pipe, CATPruningConfig(keep_ratio=1.0, start_step=START))
    changed = text_to_image(pipe, seeded_latents(1), callback_on_step_end=halve_latents)
    torch.testing.assert_close(changed, reference, atol=1e-5, rtol=0)
    assert state.stats.pruned_steps == STEPS - START
    assert not torch.allclose(changed, text_to_image(pipe, seeded_latents(1)), atol=1e-3)


class Stop(Exception):
    pass


def interrupt_at(step: int) -> Any:
    def callback(pipe: Any, index: int, timestep: Any, tensors: dict[str, torch.Tensor]) -> dict:
        if index == step:
            pipe._interrupt = True
        return {}

    return callback


def raise_at(step: int) -> Any:
    def callback(pipe: Any, index: int, timestep: Any, tensors: dict[str, torch.Tensor]) -> dict:
        if index == step:
            raise Stop
        return {}

    return callback


def test_after_an_interrupted_or_failed_generation_the_next_one_is_exact() -> None:
    config = CATPruningConfig(keep_ratio=0.3, start_step=START)
    fresh = sd3_pipeline_with_vae()
    apply_cat_pruning(fresh, config)
    expected = text_to_image(fresh, seeded_latents(1, seed=4))

    pipe = sd3_pipeline_with_vae()
    state = apply_cat_pruning(pipe, config)
    text_to_image(pipe, seeded_latents(1), callback_on_step_end=interrupt_at(START + 1))
    assert state.stats.pruned_steps == 2  # steps START and START + 1 ran, then the loop was interrupted
    torch.testing.assert_close(text_to_image(pipe, seeded_latents(1, seed=4)), expected, atol=0, rtol=0)
    with pytest.raises(Stop):
        text_to_image(pipe, seeded_latents(1), callback_on_step_end=raise_at(START + 1))
    torch.testing.assert_close(text_to_image(pipe, seeded_latents(1, seed=4)), expected, atol=0, rtol=0)
    assert (state.stats.steps, state.stats.pruned_steps) == (STEPS, STEPS - START)


@pytest.mark.slow
def test_several_images_per_prompt_each_get_their_own_selection() -> None:
    """num_images_per_prompt = 2 (a complete tiny SD3 pipeline with text encoders): rows [uncond, uncond,
    cond, cond]; each image is the one it would be alone (batch invariance), so each has its own selection."""
    pipe = tiny_sd3_pipeline()
    apply_cat_pruning(pipe, CATPruningConfig(keep_ratio=0.3, start_step=START))
    latents = torch.cat([seeded_latents(1, seed=7), seeded_latents(1, seed=8)])

    def run(latents: torch.Tensor, images: int) -> torch.Tensor:
        return pipe(
            "a teddy bear",
            num_images_per_prompt=images,
            num_inference_steps=STEPS,
            latents=latents,
            output_type="latent",
        ).images

    both = run(latents, 2)
    for row in range(2):
        torch.testing.assert_close(both[row : row + 1], run(latents[row : row + 1], 1), atol=1e-5, rtol=0)


def test_inpainting_from_pipe_counts_the_steps_it_runs() -> None:
    """strength 0.7 of 12 steps runs 9: start_step counts from the first step that runs."""
    pipe = sd3_pipeline_with_vae(latent_channels=16)
    state = apply_cat_pruning(pipe, CATPruningConfig(keep_ratio=0.3, start_step=START))
    generator = torch.Generator().manual_seed(5)
    image, mask = torch.rand(1, 3, 32, 32, generator=generator), torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1.0
    inpaint = StableDiffusion3InpaintPipeline.from_pipe(pipe)
    for _ in range(2):
        inpaint(
            image=image,
            mask_image=mask,
            strength=0.7,
            num_inference_steps=12,
            guidance_scale=5.0,
            generator=torch.Generator().manual_seed(6),
            output_type="latent",
            **sd3_prompts(1),
        )
        assert (state.stats.steps, state.stats.pruned_steps) == (9, 9 - START)


def test_pixart_pipelines_sharing_the_transformer_start_fresh_generations() -> None:
    pipe = pixart_pipeline(tiny_pixart())
    state = apply_cat_pruning(pipe, CATPruningConfig(keep_ratio=0.3, start_step=START))
    other = PixArtSigmaPipeline.from_pipe(pipe)

    def run(pipeline: Any, steps: int) -> torch.Tensor:
        return pipeline(
            num_inference_steps=steps,
            guidance_scale=4.5,
            latents=seeded_latents(1),
            output_type="latent",
            use_resolution_binning=False,
            **pixart_prompts(1),
        ).images

    first = run(pipe, STEPS)
    run(other, STEPS + 2)
    assert (state.stats.steps, state.stats.pruned_steps) == (STEPS + 2, STEPS + 2 - START)
    torch.testing.assert_close(run(pipe, STEPS), first, atol=0, rtol=0)
