"""CAT pruning on Qwen-Image: the real ``QwenImageTransformer2DModel``, ``QwenImagePipeline`` and
``QwenImageEditPipeline`` at toy size with random weights (CPU), driven with prompt embeddings and masks.

What Qwen-Image adds and these tests aim at: the grid from ``img_shapes``, complex rotary tables turned
into per-row (cos, sin) rows, a text key mask the attention receives by keyword, per-token modulation of
reference tokens (``zero_cond_t``) gathered per block, true CFG as two named passes, and the Edit
pipelines' reference latents: a segment never pruned.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from conftest import (
    TEXT_DIM,
    TEXT_TOKENS,
    assert_compiles_once,
    assert_formula_agrees_with_counted_macs,
    assert_keep_ratio_one_is_unpatched,
    assert_passes_share_selections,
    assert_published_architecture,
    assert_skipped_steps_return_the_last_outputs,
    assert_unpatched_until_start_and_removed,
    one_prompt,
    qwen_pipeline,
    record_calls,
    seeded_latents,
    tiny_qwen,
)
from diffusers import AutoencoderKLQwenImage, QwenImageEditPipeline, QwenImagePipeline
from PIL import Image

from catprune import CATPruningConfig, apply_cat_pruning, remove_cat_pruning
from catprune.architectures import Architecture
from catprune.engine import StepMode

STEPS = 6
START = 3
CONFIG = CATPruningConfig(keep_ratio=0.3, start_step=START)
SIZE = 128
"""Pixels per side without a VAE (scale factor 8, then 2x2 packing): an 8x8 token grid."""


def text_mask(num_prompts: int, length: int) -> torch.Tensor:
    """Prompt ``i`` has ``length - i`` valid tokens, then padding (the pipelines pad to the longest)."""
    return (
        torch.arange(TEXT_TOKENS)[None] < torch.tensor([length - i for i in range(num_prompts)])[:, None]
    ).long()


def qwen_prompts(num_prompts: int, true_cfg: bool = False) -> dict[str, Any]:
    """Prompt embeddings and masks (each prompt its own); with ``true_cfg`` negative ones and a scale
    above 1 (two calls per step)."""
    generator = torch.Generator().manual_seed(1)
    prompts: dict[str, Any] = {
        "prompt_embeds": torch.randn(num_prompts, TEXT_TOKENS, TEXT_DIM, generator=generator),
        "prompt_embeds_mask": text_mask(num_prompts, 6),
        "true_cfg_scale": 1.0,
    }
    if true_cfg:
        negative = torch.randn(num_prompts, TEXT_TOKENS, TEXT_DIM, generator=generator)
        prompts.update(negative_prompt_embeds=negative, negative_prompt_embeds_mask=text_mask(num_prompts, 4))
        prompts["true_cfg_scale"] = 4.0
    return prompts


def packed_latents(num_prompts: int) -> torch.Tensor:
    """One latent per prompt from its own seed, packed as the pipeline packs them: (B, 64, 16)."""
    return QwenImagePipeline._pack_latents(seeded_latents(num_prompts), num_prompts, 4, 16, 16)


def generate(pipe: Any, prompts: dict[str, Any], latents: torch.Tensor) -> torch.Tensor:
    return pipe(
        height=SIZE, width=SIZE, num_inference_steps=STEPS, latents=latents, output_type="latent", **prompts
    ).images


@pytest.fixture
def pipe() -> QwenImagePipeline:
    return qwen_pipeline(tiny_qwen())


@pytest.mark.parametrize("true_cfg", [False, True], ids=["no-cfg", "true-cfg"])
def test_keep_ratio_one_equals_the_unpatched_pipeline(pipe: QwenImagePipeline, true_cfg: bool) -> None:
    prompts = qwen_prompts(2, true_cfg)
    assert_keep_ratio_one_is_unpatched(
        pipe, lambda pipe: generate(pipe, prompts, packed_latents(2)), STEPS, START
    )


def test_a_skipped_step_returns_the_last_outputs(pipe: QwenImagePipeline) -> None:
    prompts = qwen_prompts(2, True)
    run = lambda pipe: generate(pipe, prompts, packed_latents(2))  # noqa: E731
    assert_skipped_steps_return_the_last_outputs(pipe, run, STEPS, START)


def test_steps_before_start_step_are_identical_and_remove_restores_bit_for_bit(
    pipe: QwenImagePipeline,
) -> None:
    prompts = qwen_prompts(2, true_cfg=True)
    run = lambda pipe: generate(pipe, prompts, packed_latents(2))  # noqa: E731
    assert_unpatched_until_start_and_removed(pipe, run, CONFIG, STEPS, passes=2)


@pytest.mark.parametrize(
    ("zero_cond_t", "controlnet"),
    [(False, False), (True, False), (False, True)],
    ids=["qwen-image", "zero-cond-t", "controlnet"],
)
def test_pruned_step_fed_the_fill_steps_inputs_returns_its_output(
    zero_cond_t: bool, controlnet: bool
) -> None:
    """Two blocks, a text mask per row, a reference image's tokens after the grid (modulated at timestep 0
    with ``zero_cond_t``): the caches are exact after the fill step, so this checks the pruned attention
    with the key mask, the per-row rotary rows, the gathered ``modulate_index``, gather and scatter; with
    ControlNet residuals (one (B, L, D) per block, as ``QwenImageControlNetModel`` returns), their gather."""
    transformer = tiny_qwen(num_layers=2, zero_cond_t=zero_cond_t)
    prompts = qwen_prompts(2)
    inputs = {
        "encoder_hidden_states": prompts["prompt_embeds"],
        "encoder_hidden_states_mask": prompts["prompt_embeds_mask"],
        "img_shapes": [[(1, 8, 8), (1, 4, 4)]] * 2,
    }
    if controlnet:
        generator = torch.Generator().manual_seed(5)
        inputs["controlnet_block_samples"] = [torch.randn(2, 80, 32, generator=generator) for _ in range(2)]
    tokens = torch.cat(
        [packed_latents(2), torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(3))], 1
    )
    with torch.no_grad():
        unpatched = transformer(tokens, timestep=torch.tensor([0.8] * 2), **inputs).sample
    state = apply_cat_pruning(transformer, CATPruningConfig(keep_ratio=0.3, start_step=2))
    state.begin_generation()
    modes, outputs = [], []
    with torch.no_grad():
        for timestep in (0.9, 0.8, 0.8):
            step_tokens = tokens if timestep == 0.8 else tokens + 0.1
            outputs.append(transformer(step_tokens, timestep=torch.tensor([timestep] * 2), **inputs).sample)
            modes.append(state.mode)
    assert modes == [StepMode.FULL, StepMode.FILL, StepMode.PRUNED]
    assert (state.context.num_tokens, state.context.fixed_tokens) == (64, 16)
    assert state.indices.shape == (2, round(0.3 * 64)) and int(state.indices.max()) < 64
    assert not torch.equal(state.indices[0], state.indices[1])
    torch.testing.assert_close(outputs[1], unpatched, atol=1e-5, rtol=0)
    torch.testing.assert_close(outputs[2], outputs[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("true_cfg", [False, True], ids=["no-cfg", "true-cfg"])
def test_batched_prompts_equal_each_prompt_alone(pipe: QwenImagePipeline, true_cfg: bool) -> None:
    prompts = qwen_prompts(2, true_cfg)
    apply_cat_pruning(pipe, CONFIG)
    batched = generate(pipe, prompts, packed_latents(2))
    for index in range(2):
        alone = generate(pipe, one_prompt(prompts, index), packed_latents(2)[index : index + 1])
        torch.testing.assert_close(batched[index : index + 1], alone, atol=1e-5, rtol=0)


def test_true_cfg_passes_share_one_selection_per_step_and_count_as_one_step(pipe: QwenImagePipeline) -> None:
    state = apply_cat_pruning(pipe, CONFIG)
    calls = record_calls(state, pipe.transformer)
    generate(pipe, qwen_prompts(2, true_cfg=True), packed_latents(2))
    assert [(step, key) for step, key, _ in calls] == [
        (step, (name, 0)) for step in range(STEPS) for name in ("cond", "uncond")
    ]
    assert_passes_share_selections(calls)
    assert (state.stats.steps, state.stats.pruned_steps) == (STEPS, STEPS - START)


def test_pruned_steps_run_on_the_meta_device() -> None:
    with torch.device("meta"):
        transformer = tiny_qwen(zero_cond_t=True)
    state = apply_cat_pruning(transformer, CATPruningConfig(start_step=2))
    state.begin_generation()
    with torch.device("meta"):
        inputs = {
            "encoder_hidden_states": torch.empty(2, TEXT_TOKENS, TEXT_DIM),
            "encoder_hidden_states_mask": torch.ones(2, TEXT_TOKENS, dtype=torch.bool),
            "img_shapes": [[(1, 8, 8), (1, 4, 4)]] * 2,
        }
        latents = torch.empty(2, 80, 16)
    modes = []
    with torch.no_grad():
        for step in range(4):
            output = transformer(latents, timestep=torch.full((2,), 0.9 - step / 10, device="meta"), **inputs)
            modes.append(state.mode)
    assert modes == [StepMode.FULL, StepMode.FILL, StepMode.PRUNED, StepMode.PRUNED]
    assert output.sample.shape == (2, 80, 16) and state.indices.shape == (2, round(0.3 * 64))


def test_counted_macs_of_a_pruned_step_agree_with_the_adapter_formula() -> None:
    model = tiny_qwen(num_layers=3)
    architecture = Architecture(
        "tiny-qwen", "qwen-image", dict(model.config), text_tokens=TEXT_TOKENS, default_steps=4
    )
    assert_formula_agrees_with_counted_macs(architecture, rows=1, image_tokens=256)


@pytest.mark.slow
def test_the_qwen_image_architecture_has_the_published_size_and_macs_cli_ratio() -> None:
    """Qwen-Image's transformer: 20.43B parameters (the model card's "20B MMDiT"), 60 blocks."""
    assert_published_architecture(
        "qwen-image", "QwenImageTransformer2DModel", 20_430_401_088, 128, 50, cli_steps=50, rows=1,
        image_tokens=4096, ratio=(0.4, 0.5),
    )  # fmt: skip


def tiny_qwen_vae() -> AutoencoderKLQwenImage:
    torch.manual_seed(0)
    return AutoencoderKLQwenImage(
        base_dim=4,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    ).eval()


def edit(pipe: QwenImageEditPipeline) -> torch.Tensor:
    """A 128x128 edit (an 8x8 grid) of a reference image, which the pipeline resizes to about 1024x1024
    pixels: a 64x64 grid of reference tokens appended to the sequence."""
    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    return pipe(
        image=image,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        latents=packed_latents(1),
        output_type="latent",
        **qwen_prompts(1),
    ).images


@pytest.mark.slow
@pytest.mark.parametrize("zero_cond_t", [False, True], ids=["edit", "edit-2511"])
def test_edit_prunes_the_image_and_never_selects_the_reference_tokens(zero_cond_t: bool) -> None:
    pipe = qwen_pipeline(
        tiny_qwen(zero_cond_t=zero_cond_t), QwenImageEditPipeline, vae=tiny_qwen_vae(), processor=None
    )
    reference = edit(pipe)
    state = apply_cat_pruning(pipe, CATPruningConfig(keep_ratio=1.0, start_step=START))
    torch.testing.assert_close(edit(pipe), reference, atol=1e-5, rtol=0)
    remove_cat_pruning(pipe)
    state = apply_cat_pruning(pipe, CONFIG)
    selected: list[torch.Tensor] = []
    pipe.transformer.register_forward_hook(
        lambda module, args, output: (
            selected.append(state.indices.clone()) if state.mode is StepMode.PRUNED else None
        )
    )
    pruned = edit(pipe)
    assert (state.context.num_tokens, state.context.fixed_tokens) == (64, 64 * 64)
    assert len(selected) == STEPS - START
    assert all(int(indices.max()) < 64 for indices in selected)  # reference tokens are never selected
    assert torch.isfinite(pruned).all() and not torch.equal(pruned, reference)
    assert 0 < state.stats.macs < state.stats.full_macs


@pytest.mark.slow
@pytest.mark.parametrize("how", ["whole", "blocks"])
def test_compiled_pruning_has_no_graph_breaks_and_a_second_generation_compiles_nothing(
    pipe: QwenImagePipeline, how: str
) -> None:
    torch._dynamo.reset()
    prompts = qwen_prompts(2, true_cfg=True)
    apply_cat_pruning(pipe, CONFIG)
    assert_compiles_once(pipe, lambda pipe: generate(pipe, prompts, packed_latents(2)), how)
