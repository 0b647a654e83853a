"""CAT pruning on Wan 2.1 image-to-video: the real ``WanImageToVideoPipeline`` at toy size with random
weights (CPU), a toy ``CLIPVisionModel`` encoding the condition image, driven with prompt embeddings.

What I2V adds to text-to-video and these tests aim at: the transformer's input is the noisy latents
concatenated on channels with the mask and the condition image's latents (12 channels in, 4 out), and its
cross-attention ``attn2`` also attends to the condition image's CLIP tokens (``encoder_hidden_states_image``
through the model's image embedder, with their own K/V projections), which the MAC formula counts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import (
    TEXT_DIM,
    assert_formula_agrees_with_counted_macs,
    assert_keep_ratio_one_is_unpatched,
    assert_passes_share_selections,
    one_prompt,
    record_calls,
    tiny_wan,
    wan_pipeline,
)
from diffusers import WanImageToVideoPipeline
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

from catprune import CATPruningConfig, apply_cat_pruning
from catprune.adapters.wan import TEXT_TOKENS
from catprune.architectures import Architecture
from catprune.engine import StepMode
from catprune.selection import Grid

STEPS = 5
START = 3
CONFIG = CATPruningConfig(keep_ratio=0.3, start_step=START)
FRAMES = 5
"""Video frames: 2 latent frames (the first alone, then 4 in one)."""
SIZE = 64
"""Pixels per side: 8x8 latents, a 4x4 token grid per latent frame: 32 tokens."""
IMAGE_DIM = 16
"""The toy CLIP's width: the transformer's ``image_dim``."""
CLIP_TOKENS = 17
"""The toy CLIP's tokens: 32 px in 8 px patches (4 x 4) and the class token."""


def clip_components() -> dict[str, Any]:
    """A toy CLIP vision tower and its image processor (32 px crops), as the pipeline's ``image_encoder``
    and ``image_processor``: the pipeline takes its second-to-last hidden states as the image tokens."""
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=IMAGE_DIM, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8,
    )  # fmt: skip
    processor = CLIPImageProcessorPil(crop_size=32, size={"shortest_edge": 32})
    return {"image_encoder": CLIPVisionModel(config).eval(), "image_processor": processor}


@pytest.fixture
def pipe() -> WanImageToVideoPipeline:
    return wan_pipeline(tiny_wan(image_dim=IMAGE_DIM), WanImageToVideoPipeline, **clip_components())


def condition_image() -> PIL.Image.Image:
    pixels = torch.rand(SIZE, SIZE, 3, generator=torch.Generator().manual_seed(5))
    return PIL.Image.fromarray((pixels.numpy() * 255).astype(np.uint8))


def i2v_prompts(num_prompts: int) -> dict[str, Any]:
    """Prompt embeddings of the 512 tokens the model's cross-attention expects (it takes the last 512 of
    its context as the text, the rest as the image's), with a negative prompt: CFG as two calls."""
    generator = torch.Generator().manual_seed(1)
    embeddings = {
        name: torch.randn(num_prompts, TEXT_TOKENS, TEXT_DIM, generator=generator)
        for name in ("prompt_embeds", "negative_prompt_embeds")
    }
    return {**embeddings, "guidance_scale": 5.0}


def latents(num_prompts: int) -> torch.Tensor:
    """One latent video per prompt, each from its own seed (the same alone or batched)."""
    return torch.cat(
        [torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(num_prompts)]
    )


def generate(pipe: WanImageToVideoPipeline, prompts: dict[str, Any], start: torch.Tensor) -> torch.Tensor:
    return pipe(
        image=condition_image(),
        height=SIZE,
        width=SIZE,
        num_frames=FRAMES,
        num_inference_steps=STEPS,
        latents=start,
        output_type="latent",
        **prompts,
    ).frames


def test_keep_ratio_one_equals_the_unpatched_pipeline(pipe: WanImageToVideoPipeline) -> None:
    prompts = i2v_prompts(2)
    run = lambda pipe: generate(pipe, prompts, latents(2))  # noqa: E731
    assert_keep_ratio_one_is_unpatched(pipe, run, STEPS, START)


def test_cfg_is_two_calls_per_step_sharing_the_selection(pipe: WanImageToVideoPipeline) -> None:
    """Each step calls the transformer under ``cache_context("cond")`` then ``("uncond")``, both with the
    image's CLIP tokens and 12 input channels; the second pass recomputes the first's tokens."""
    state = apply_cat_pruning(pipe, CONFIG)
    inputs: list[tuple[int, tuple[int, ...]]] = []
    pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: inputs.append(
            (kwargs["hidden_states"].shape[1], tuple(kwargs["encoder_hidden_states_image"].shape))
        ),
        with_kwargs=True,
    )
    calls = record_calls(state, pipe.transformer)
    generate(pipe, i2v_prompts(2), latents(2))
    expected = [(step, (name, 0)) for step in range(STEPS) for name in ("cond", "uncond")]
    assert [(step, key) for step, key, _ in calls] == expected
    assert inputs == [(12, (2, CLIP_TOKENS, IMAGE_DIM))] * 2 * STEPS
    assert_passes_share_selections(calls)
    assert (state.stats.steps, state.stats.pruned_steps) == (STEPS, STEPS - START)
    assert all(indices.shape == (2, round(0.3 * 32)) for _, _, indices in calls[2 * START :])


def test_pruned_step_fed_the_fill_steps_inputs_returns_its_output() -> None:
    """Two rows, three latent frames, 12 input channels, the CLIP tokens in the cross-attention: exact
    caches after the fill step, so the pruned step's output is the fill step's; the image tokens change
    the output (the CLIP path is live)."""
    transformer = tiny_wan(image_dim=IMAGE_DIM)
    generator = torch.Generator().manual_seed(3)
    start = torch.randn(2, 12, 3, 8, 8, generator=generator)
    text = torch.randn(2, TEXT_TOKENS, TEXT_DIM, generator=generator)
    clip = torch.randn(2, CLIP_TOKENS, IMAGE_DIM, generator=generator)
    with torch.no_grad():
        other_image = transformer(start, torch.tensor([200.0] * 2), text, torch.zeros_like(clip)).sample
    state = apply_cat_pruning(transformer, CATPruningConfig(keep_ratio=0.3, start_step=2))
    state.begin_generation()
    modes, outputs = [], []
    with torch.no_grad():
        for timestep in (100.0, 200.0, 200.0):
            out = transformer(start, torch.tensor([timestep] * 2), text, clip).sample  # (2, 4, 3, 8, 8)
            outputs.append(out)
            modes.append(state.mode)
            if timestep == 100.0:
                start = torch.cat([start[:, :4] - 0.1 * out, start[:, 4:]], dim=1)  # the noisy latents move
    assert modes == [StepMode.FULL, StepMode.FILL, StepMode.PRUNED]
    assert state.context.grid == Grid(4, 4, 3)
    assert state.indices.shape == (2, round(0.3 * 48)) and not torch.equal(state.indices[0], state.indices[1])
    torch.testing.assert_close(outputs[2], outputs[1], atol=1e-5, rtol=0)
    assert (outputs[1] - other_image).abs().max() > 1e-3


def test_batched_prompts_equal_each_prompt_alone(pipe: WanImageToVideoPipeline) -> None:
    prompts = i2v_prompts(2)
    apply_cat_pruning(pipe, CONFIG)
    batched = generate(pipe, prompts, latents(2))
    for index in range(2):
        alone = generate(pipe, one_prompt(prompts, index), latents(2)[index : index + 1])
        torch.testing.assert_close(batched[index : index + 1], alone, atol=1e-5, rtol=0)


def test_counted_macs_of_a_pruned_step_agree_with_the_adapter_formula() -> None:
    """FlopCounterMode on the real forward (meta) against ``WanAdapter.step_macs`` within 5%: the 512 text
    and 257 CLIP tokens of Wan 2.1 I2V (their K/V and the queries' products over them, the image
    embedder), 81 frames (21 latent frames) at 32x32 pixels, one row per call."""
    model = tiny_wan(num_layers=3, image_dim=IMAGE_DIM)
    architecture = Architecture("tiny-wan-i2v", "wan", dict(model.config), text_tokens=512, default_steps=50)
    assert_formula_agrees_with_counted_macs(
        architecture, rows=1, image_tokens=21 * 2 * 2, resolution=32, steps=50, start_step=8
    )
