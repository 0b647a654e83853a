"""CAT pruning on FLUX.1: real diffusers Flux classes at toy size with random weights (CPU).

Flux differs from SD3 and PixArt in what these tests aim at: packed (B, N, C) latents whose grid comes
from the image ids, a rotary embedding that must follow each row's selected tokens, single-stream blocks,
guidance as an input (one row per prompt) and true CFG as two calls per step under cache contexts.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch
from conftest import (
    POOLED_DIM,
    TEXT_DIM,
    TEXT_TOKENS,
    assert_skipped_steps_return_the_last_outputs,
    flux_pipeline,
    seeded_latents,
    tiny_flux,
    tiny_vae,
)
from diffusers import (
    FluxControlNetModel,
    FluxControlNetPipeline,
    FluxImg2ImgPipeline,
    FluxPipeline,
)
from PIL import Image

from catprune import CATPruningConfig, apply_cat_pruning, remove_cat_pruning
from catprune.architectures import Architecture
from catprune.engine import StepMode
from catprune.measure import count_macs

STEPS = 6
START = 3
CONFIG = CATPruningConfig(keep_ratio=0.3, start_step=START)
SIZE = 128
"""Pixels per side without a VAE (the pipeline's scale factor 8, then 2x2 packing): an 8x8 token grid."""


def flux_prompts(num_prompts: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """Prompt embeddings (T5's sequence and CLIP's pooled vector) for ``num_prompts`` different prompts."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "prompt_embeds": torch.randn(num_prompts, TEXT_TOKENS, TEXT_DIM, generator=generator),
        "pooled_prompt_embeds": torch.randn(num_prompts, POOLED_DIM, generator=generator),
    }


def negative_prompts(num_prompts: int) -> dict[str, Any]:
    """Negative embeddings and a true-CFG scale: the pipeline then calls the transformer twice per step."""
    negative = flux_prompts(num_prompts, seed=2)
    return {
        "negative_prompt_embeds": negative["prompt_embeds"],
        "negative_pooled_prompt_embeds": negative["pooled_prompt_embeds"],
        "true_cfg_scale": 3.0,
    }


def packed_latents(num_prompts: int) -> torch.Tensor:
    """One latent per prompt from its own seed, packed as the pipeline packs them: (B, 64, 16)."""
    latents = seeded_latents(num_prompts)  # (B, 4, 16, 16)
    return FluxPipeline._pack_latents(latents, num_prompts, 4, 16, 16)


def generate(pipe: Any, prompts: dict[str, Any], latents: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """Final packed latents of a ``STEPS``-step generation."""
    return pipe(
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=3.5,
        latents=latents,
        output_type="latent",
        **prompts,
        **kwargs,
    ).images


def slice_prompts(prompts: dict[str, Any], index: int) -> dict[str, Any]:
    return {k: v[index : index + 1] if isinstance(v, torch.Tensor) else v for k, v in prompts.items()}


@pytest.fixture
def pipe() -> FluxPipeline:
    return flux_pipeline(tiny_flux())


@pytest.mark.parametrize("true_cfg", [False, True], ids=["guidance-distilled", "true-cfg"])
def test_keep_ratio_one_equals_the_unpatched_pipeline(pipe: FluxPipeline, true_cfg: bool) -> None:
    prompts = {**flux_prompts(2), **(negative_prompts(2) if true_cfg else {})}
    reference = generate(pipe, prompts, packed_latents(2))
    apply_cat_pruning(pipe, CATPruningConfig(keep_ratio=1.0, start_step=START))
    torch.testing.assert_close(generate(pipe, prompts, packed_latents(2)), reference, atol=1e-5, rtol=0)


def test_a_skipped_step_returns_the_last_outputs(pipe: FluxPipeline) -> None:
    prompts = {**flux_prompts(2), **negative_prompts(2)}
    run = lambda pipe: generate(pipe, prompts, packed_latents(2))  # noqa: E731
    assert_skipped_steps_return_the_last_outputs(pipe, run, STEPS, START)


def test_steps_before_start_step_are_identical_and_remove_restores_bit_for_bit(pipe: FluxPipeline) -> None:
    prompts = flux_prompts(2)
    outputs: list[torch.Tensor] = []
    pipe.transformer.register_forward_hook(lambda module, args, output: outputs.append(output[0].clone()))
    reference = generate(pipe, prompts, packed_latents(2))
    unpatched, outputs[:] = list(outputs), []
    state = apply_cat_pruning(pipe, CONFIG)
    pruned = generate(pipe, prompts, packed_latents(2))
    for step in range(START):  # full steps, then the fill step: the unpatched computation
        assert torch.equal(outputs[step], unpatched[step]), step
    assert not torch.equal(pruned, reference)
    assert (state.stats.steps, state.stats.pruned_steps) == (STEPS, STEPS - START)
    remove_cat_pruning(pipe)
    assert "cache_context" not in vars(pipe.transformer)
    assert torch.equal(generate(pipe, prompts, packed_latents(2)), reference)


def test_pruned_step_fed_the_fill_steps_inputs_returns_its_output() -> None:
    """Both block kinds (double- and single-stream): the caches are exact after the fill step, so this
    checks the pruned attention, the per-row rotary gather, the gather and the scatter."""
    transformer = tiny_flux(num_layers=2, num_single_layers=2)
    prompts = flux_prompts(2)
    inputs = {
        "encoder_hidden_states": prompts["prompt_embeds"],
        "pooled_projections": prompts["pooled_prompt_embeds"],
        "txt_ids": torch.zeros(TEXT_TOKENS, 3),
        "img_ids": FluxPipeline._prepare_latent_image_ids(2, 8, 8, "cpu", torch.float32),
        "guidance": torch.full((2,), 3.5),
    }
    state = apply_cat_pruning(transformer, CATPruningConfig(keep_ratio=0.3, start_step=2))
    state.begin_generation()
    latents = packed_latents(2)
    modes, outputs = [], []
    with torch.no_grad():
        for timestep in (0.9, 0.8, 0.8):
            outputs.append(transformer(latents, timestep=torch.tensor([timestep] * 2), **inputs).sample)
            modes.append(state.mode)
            latents = latents if timestep == 0.8 else latents - 0.1 * outputs[-1]
    assert modes == [StepMode.FULL, StepMode.FILL, StepMode.PRUNED]
    assert state.indices.shape == (2, round(0.3 * 64))
    assert not torch.equal(state.indices[0], state.indices[1])  # the rows' rotary gathers differ
    torch.testing.assert_close(outputs[2], outputs[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("true_cfg", [False, True], ids=["guidance-distilled", "true-cfg"])
def test_batched_prompts_equal_each_prompt_alone(pipe: FluxPipeline, true_cfg: bool) -> None:
    """Each prompt selects its own tokens, so a batch is right only if every row gets its own rotary
    positions (and, under true CFG, both passes their own caches)."""
    prompts = {**flux_prompts(2), **(negative_prompts(2) if true_cfg else {})}
    apply_cat_pruning(pipe, CONFIG)
    batched = generate(pipe, prompts, packed_latents(2))
    for index in range(2):
        alone = generate(pipe, slice_prompts(prompts, index), packed_latents(2)[index : index + 1])
        torch.testing.assert_close(batched[index : index + 1], alone, atol=1e-5, rtol=0)


def test_true_cfg_passes_share_one_selection_per_step_and_count_as_one_step(pipe: FluxPipeline) -> None:
    state = apply_cat_pruning(pipe, CONFIG)
    calls: list[tuple[int, str | None, torch.Tensor | None]] = []

    def record(module: torch.nn.Module, args: Any, output: Any) -> None:
        pruned = state.mode is StepMode.PRUNED
        calls.append(
            (state.context.step, state.context.pass_key[0], state.indices.clone() if pruned else None)
        )

    pipe.transformer.register_forward_hook(record)
    generate(pipe, {**flux_prompts(2), **negative_prompts(2)}, packed_latents(2))
    assert [(step, key) for step, key, _ in calls] == [
        (step, key) for step in range(STEPS) for key in ("cond", "uncond")
    ]
    for cond, uncond in zip(calls[::2], calls[1::2], strict=True):
        assert (cond[2] is None) == (uncond[2] is None)
        if cond[2] is not None:
            assert torch.equal(cond[2], uncond[2])
    assert (state.stats.steps, state.stats.pruned_steps) == (STEPS, STEPS - START)
    pruned_indices = [indices for _, _, indices in calls[::2] if indices is not None]
    assert len(pruned_indices) == STEPS - START
    assert any(not torch.equal(a, b) for a, b in itertools.pairwise(pruned_indices))
    assert {key for processor in state.processors for key in processor.caches} == {("cond", 0), ("uncond", 0)}


def test_a_non_square_grid_is_read_from_the_image_ids(pipe: FluxPipeline) -> None:
    state = apply_cat_pruning(pipe, CONFIG)
    pipe(height=64, width=192, num_inference_steps=STEPS, output_type="latent", **flux_prompts(1))
    assert (state.context.grid.height, state.context.grid.width) == (4, 12)
    assert state.stats.pruned_steps == STEPS - START


def test_img2img_prunes_the_steps_it_runs() -> None:
    pipe = flux_pipeline(tiny_flux(), vae=tiny_vae(), pipeline_class=FluxImg2ImgPipeline)
    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))

    def run() -> torch.Tensor:
        return pipe(
            image=image,
            strength=0.8,
            height=32,
            width=32,
            num_inference_steps=10,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            **flux_prompts(1),
        ).images

    reference = run()
    state = apply_cat_pruning(pipe, CATPruningConfig(keep_ratio=1.0, start_step=START))
    torch.testing.assert_close(run(), reference, atol=1e-5, rtol=0)
    assert (state.stats.steps, state.stats.pruned_steps) == (8, 8 - START)


def test_a_controlnet_drives_a_pruned_generation_and_equals_the_unpatched_one_at_keep_one() -> None:
    """The ControlNet's residuals (one per image token, for double- and single-stream blocks) are gathered
    at the selected tokens at a pruned step."""
    transformer = tiny_flux()
    shared = ("in_channels", "attention_head_dim", "num_attention_heads", "joint_attention_dim")
    shared += ("pooled_projection_dim", "guidance_embeds", "axes_dims_rope")
    torch.manual_seed(1)
    controlnet = FluxControlNetModel(
        **{key: transformer.config[key] for key in shared}, num_layers=1, num_single_layers=1
    ).eval()
    for parameter in controlnet.parameters():  # diffusers zero-initialises the residual projections
        torch.nn.init.normal_(parameter, std=0.05)
    pipe = flux_pipeline(
        transformer, vae=tiny_vae(), pipeline_class=FluxControlNetPipeline, controlnet=controlnet
    )
    control = Image.fromarray((np.random.default_rng(1).random((32, 32, 3)) * 255).astype(np.uint8))

    def run(scale: float = 1.0) -> torch.Tensor:
        return pipe(
            control_image=control,
            controlnet_conditioning_scale=scale,
            height=32,
            width=32,
            num_inference_steps=STEPS,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            **flux_prompts(2),
        ).images

    reference = run()
    assert not torch.equal(run(scale=0.0), reference)  # the residuals matter
    apply_cat_pruning(pipe, CATPruningConfig(keep_ratio=1.0, start_step=START))
    torch.testing.assert_close(run(), reference, atol=1e-5, rtol=0)
    remove_cat_pruning(pipe)
    state = apply_cat_pruning(pipe, CONFIG)
    pruned = run()
    assert torch.isfinite(pruned).all() and state.stats.pruned_steps == STEPS - START


def test_pruned_steps_run_on_the_meta_device() -> None:
    """No host reads or data-dependent shapes in selection, rotary gather, caches or scatter."""
    with torch.device("meta"):
        transformer = tiny_flux()
    state = apply_cat_pruning(transformer, CATPruningConfig(start_step=2))
    state.begin_generation()
    with torch.device("meta"):
        inputs = {
            "encoder_hidden_states": torch.empty(4, TEXT_TOKENS, TEXT_DIM),
            "pooled_projections": torch.empty(4, POOLED_DIM),
            "txt_ids": torch.zeros(TEXT_TOKENS, 3),
            "img_ids": torch.zeros(64, 3),
            "guidance": torch.empty(4),
        }
        latents = torch.empty(4, 64, 16)
    modes = []
    with torch.no_grad():
        for step in range(4):
            output = transformer(latents, timestep=torch.full((4,), 0.9 - step / 10, device="meta"), **inputs)
            modes.append(state.mode)
    assert modes == [StepMode.FULL, StepMode.FILL, StepMode.PRUNED, StepMode.PRUNED]
    assert output.sample.shape == (4, 64, 16) and state.indices.shape == (4, round(0.3 * 64))


def test_counted_macs_of_a_pruned_step_agree_with_the_adapter_formula() -> None:
    """FlopCounterMode on the real forward (meta) against ``FluxAdapter.step_macs`` from the layer shapes;
    the formula leaves out adaLN and the timestep/guidance embeddings (per sample, not per token)."""
    model = tiny_flux(num_layers=2, num_single_layers=3)
    architecture = Architecture(
        "tiny-flux", "flux", dict(model.config), text_tokens=TEXT_TOKENS, default_steps=4
    )
    report = count_macs(architecture, resolution=256, steps=10, start_step=4)
    assert report.rows == 1  # guidance is an input: one row per prompt
    assert report.image_tokens == 256 and report.kept_tokens == round(0.3 * 256)
    assert report.pruned_step.macs == pytest.approx(report.analytic_pruned_step, rel=0.05)
    assert report.full_step.macs == pytest.approx(report.analytic_full_step, rel=0.05)
    n, k, t = report.image_tokens, report.kept_tokens, report.text_tokens
    assert report.pruned_step.macs / report.full_step.macs == pytest.approx((k + t) / (n + t), rel=0.05)


@pytest.mark.slow
def test_macs_cli_gives_the_flux_dev_ratio() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "catprune", "macs", "--model", "flux-dev", "--steps", "28", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    report = json.loads(result.stdout)
    assert report["class"] == "FluxTransformer2DModel" and report["rows"] == 1
    assert (report["image_tokens"], report["text_tokens"]) == (4096, 512)
    assert 0.5 < report["ratio"] < 0.6
