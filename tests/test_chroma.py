"""CAT pruning on Chroma: the real ``ChromaTransformer2DModel`` and ``ChromaPipeline`` at toy size with
random weights (CPU), driven with prompt embeddings and text masks.

What Chroma adds to FLUX.1's mechanism and these tests aim at: a text mask that every block turns into a
mask over its whole sequence (its rows must follow each row's selected queries), true CFG as two unnamed
calls per step (the negative prompt with its own mask), and a modulation approximator in the cost.
"""

from __future__ import annotations

from typing import Any

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
    chroma_pipeline,
    one_prompt,
    record_calls,
    seeded_latents,
    tiny_chroma,
)
from diffusers import ChromaPipeline

from catprune import CATPruningConfig, apply_cat_pruning
from catprune.architectures import Architecture
from catprune.engine import StepMode

STEPS = 6
START = 3
CONFIG = CATPruningConfig(keep_ratio=0.3, start_step=START)
SIZE = 128
"""Pixels per side without a VAE (scale factor 8, then 2x2 packing): an 8x8 token grid."""


def text_mask(num_prompts: int, first_pad: int) -> torch.Tensor:
    """``ChromaPipeline``'s text mask: prompt ``i`` has ``first_pad - i`` tokens, then its first padding
    token is kept and the rest masked (as floats, the pipeline's dtype)."""
    positions = torch.arange(TEXT_TOKENS)[None]
    lengths = torch.tensor([first_pad - i for i in range(num_prompts)])[:, None]
    return (positions <= lengths).float()  # (P, T)


def chroma_prompts(num_prompts: int, true_cfg: bool = False) -> dict[str, Any]:
    """Prompt embeddings and masks for ``num_prompts`` prompts (each prompt its own mask); with
    ``true_cfg`` negative ones too and a guidance scale above 1 (two calls per step), else scale 1."""
    generator = torch.Generator().manual_seed(1)
    prompts: dict[str, Any] = {
        "prompt_embeds": torch.randn(num_prompts, TEXT_TOKENS, TEXT_DIM, generator=generator),
        "prompt_attention_mask": text_mask(num_prompts, first_pad=4),
        "guidance_scale": 1.0,
    }
    if true_cfg:
        negative = torch.randn(num_prompts, TEXT_TOKENS, TEXT_DIM, generator=generator)
        prompts["negative_prompt_embeds"] = negative
        prompts["negative_prompt_attention_mask"] = text_mask(num_prompts, first_pad=2)
        prompts["guidance_scale"] = 4.0
    return prompts


def packed_latents(num_prompts: int) -> torch.Tensor:
    """One latent per prompt from its own seed, packed as the pipeline packs them: (B, 64, 16)."""
    return ChromaPipeline._pack_latents(seeded_latents(num_prompts), num_prompts, 4, 16, 16)


def generate(pipe: ChromaPipeline, prompts: dict[str, Any], latents: torch.Tensor) -> torch.Tensor:
    """Final packed latents of a ``STEPS``-step generation."""
    return pipe(
        height=SIZE, width=SIZE, num_inference_steps=STEPS, latents=latents, output_type="latent", **prompts
    ).images


@pytest.fixture
def pipe() -> ChromaPipeline:
    return chroma_pipeline(tiny_chroma())


@pytest.mark.slow
@pytest.mark.parametrize("true_cfg", [False, True], ids=["no-cfg", "true-cfg"])
def test_keep_ratio_one_equals_the_unpatched_pipeline(pipe: ChromaPipeline, true_cfg: bool) -> None:
    prompts = chroma_prompts(2, true_cfg)
    assert_keep_ratio_one_is_unpatched(
        pipe, lambda pipe: generate(pipe, prompts, packed_latents(2)), STEPS, START
    )


def test_a_skipped_step_returns_the_last_outputs(pipe: ChromaPipeline) -> None:
    prompts = chroma_prompts(2, True)
    run = lambda pipe: generate(pipe, prompts, packed_latents(2))  # noqa: E731
    assert_skipped_steps_return_the_last_outputs(pipe, run, STEPS, START)


def test_steps_before_start_step_are_identical_and_remove_restores_bit_for_bit(pipe: ChromaPipeline) -> None:
    prompts = chroma_prompts(2, true_cfg=True)
    run = lambda pipe: generate(pipe, prompts, packed_latents(2))  # noqa: E731
    assert_unpatched_until_start_and_removed(pipe, run, CONFIG, STEPS, passes=2)


def test_pruned_step_fed_the_fill_steps_inputs_returns_its_output() -> None:
    """Both block kinds, a text mask that differs between the rows: the caches are exact after the fill
    step, so this checks the pruned attention with the mask's query rows, the per-row rotary gather, the
    gather and the scatter."""
    transformer = tiny_chroma(num_layers=2, num_single_layers=2)
    prompts = chroma_prompts(2)
    mask = torch.cat([prompts["prompt_attention_mask"], torch.ones(2, 64)], dim=1)  # (B, T + N)
    inputs = {
        "encoder_hidden_states": prompts["prompt_embeds"],
        "txt_ids": torch.zeros(TEXT_TOKENS, 3),
        "img_ids": ChromaPipeline._prepare_latent_image_ids(2, 8, 8, "cpu", torch.float32),
        "attention_mask": mask,
    }
    latents = packed_latents(2)
    with torch.no_grad():
        masked = transformer(latents, timestep=torch.tensor([0.9] * 2), **inputs).sample
        inputs_unmasked = {**inputs, "attention_mask": None}
        unmasked = transformer(latents, timestep=torch.tensor([0.9] * 2), **inputs_unmasked).sample
    assert not torch.equal(unmasked, masked)  # the mask matters
    state = apply_cat_pruning(transformer, CATPruningConfig(keep_ratio=0.3, start_step=2))
    state.begin_generation()
    modes, outputs = [], []
    with torch.no_grad():
        for timestep in (0.9, 0.8, 0.8):
            outputs.append(transformer(latents, timestep=torch.tensor([timestep] * 2), **inputs).sample)
            modes.append(state.mode)
            latents = latents if timestep == 0.8 else latents - 0.1 * outputs[-1]
    assert modes == [StepMode.FULL, StepMode.FILL, StepMode.PRUNED]
    assert state.indices.shape == (2, round(0.3 * 64))
    assert not torch.equal(state.indices[0], state.indices[1])  # the rows' gathers differ
    torch.testing.assert_close(outputs[2], outputs[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("true_cfg", [False, True], ids=["no-cfg", "true-cfg"])
def test_batched_prompts_equal_each_prompt_alone(pipe: ChromaPipeline, true_cfg: bool) -> None:
    """Each prompt selects its own tokens and has its own mask: a batch is right only if every row gets
    its own rotary positions and mask rows (and, under true CFG, both passes their own caches)."""
    prompts = chroma_prompts(2, true_cfg)
    apply_cat_pruning(pipe, CONFIG)
    batched = generate(pipe, prompts, packed_latents(2))
    for index in range(2):
        alone = generate(pipe, one_prompt(prompts, index), packed_latents(2)[index : index + 1])
        torch.testing.assert_close(batched[index : index + 1], alone, atol=1e-5, rtol=0)


def test_true_cfg_calls_are_two_passes_of_each_step_sharing_one_selection(pipe: ChromaPipeline) -> None:
    """``ChromaPipeline`` calls the transformer twice per step without ``cache_context``: one step, two
    unnamed passes with their own caches, the second recomputing the tokens the first selected."""
    state = apply_cat_pruning(pipe, CONFIG)
    calls = record_calls(state, pipe.transformer)
    generate(pipe, chroma_prompts(2, true_cfg=True), packed_latents(2))
    assert [(step, key) for step, key, _ in calls] == [
        (step, (None, index)) for step in range(STEPS) for index in (0, 1)
    ]
    assert_passes_share_selections(calls)
    assert (state.stats.steps, state.stats.pruned_steps) == (STEPS, STEPS - START)
    assert {key for processor in state.processors for key in processor.caches} == {(None, 0), (None, 1)}
    # MACs count both passes of every step: 2 calls x 2 rows.
    assert state.stats.full_macs == STEPS * 4 * state.adapter.step_macs(pipe.transformer, 64, 64, 7, False)


def test_pruned_steps_run_on_the_meta_device() -> None:
    """No host reads or data-dependent shapes in selection, mask rows, rotary gather, caches or scatter."""
    with torch.device("meta"):
        transformer = tiny_chroma()
    state = apply_cat_pruning(transformer, CATPruningConfig(start_step=2))
    state.begin_generation()
    with torch.device("meta"):
        inputs = {
            "encoder_hidden_states": torch.empty(2, TEXT_TOKENS, TEXT_DIM),
            "txt_ids": torch.zeros(TEXT_TOKENS, 3),
            "img_ids": torch.zeros(64, 3),
            "attention_mask": torch.empty(2, TEXT_TOKENS + 64),
        }
        latents = torch.empty(2, 64, 16)
    modes = []
    with torch.no_grad():
        for step in range(4):
            output = transformer(latents, timestep=torch.full((2,), 0.9 - step / 10, device="meta"), **inputs)
            modes.append(state.mode)
    assert modes == [StepMode.FULL, StepMode.FILL, StepMode.PRUNED, StepMode.PRUNED]
    assert output.sample.shape == (2, 64, 16) and state.indices.shape == (2, round(0.3 * 64))


def test_counted_macs_of_a_pruned_step_agree_with_the_adapter_formula() -> None:
    """FlopCounterMode on the real forward (meta) against ``ChromaAdapter.step_macs`` (Flux's blocks plus
    the approximator) within 5%."""
    model = tiny_chroma(num_layers=2, num_single_layers=3)
    architecture = Architecture(
        "tiny-chroma", "chroma", dict(model.config), text_tokens=TEXT_TOKENS, default_steps=4
    )
    assert_formula_agrees_with_counted_macs(architecture, rows=1, image_tokens=256)  # true CFG: a second call


@pytest.mark.slow
def test_the_chroma_architecture_has_the_published_size_and_macs_cli_ratio() -> None:
    """Chroma1-HD: 8.9B parameters (FLUX.1-dev's 11.9B less the per-block modulation layers, plus the
    approximator); 512 T5 tokens; 35 steps by default."""
    assert round(8_899_983_424 / 1e9, 1) == 8.9
    assert_published_architecture(
        "chroma", "ChromaTransformer2DModel", 8_899_983_424, 512, 35, cli_steps=28, rows=1,
        image_tokens=4096, ratio=(0.5, 0.6),
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("how", ["whole", "blocks"])
def test_compiled_pruning_has_no_graph_breaks_and_a_second_generation_compiles_nothing(
    pipe: ChromaPipeline, how: str
) -> None:
    """``transformer.compile(fullgraph=True)`` or its repeated blocks compiled, after pruning is applied:
    any graph break raises; whole, one graph per kind of step (full, fill, pruned) for both passes."""
    torch._dynamo.reset()
    prompts = chroma_prompts(2, true_cfg=True)
    apply_cat_pruning(pipe, CONFIG)
    assert_compiles_once(pipe, lambda pipe: generate(pipe, prompts, packed_latents(2)), how)
