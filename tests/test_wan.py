"""CAT pruning on Wan 2.1: the real ``WanTransformer3DModel`` and ``WanPipeline`` at toy size with random
weights (CPU), driven with prompt embeddings.

What Wan adds and these tests aim at: video latents (B, C, F, H, W) cut by a ``Conv3d`` and flattened
inside ``forward`` (the gather in front of the first block), a 3-D token grid (frames x rows x columns),
a rotary table (1, N, 1, d) gathered per row, self-attention with q/k normalised across heads, the model's
own cross-attention to the text on the selected tokens, and CFG as two calls per step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
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
    one_prompt,
    record_calls,
    tiny_wan,
    wan_pipeline,
)
from diffusers import WanPipeline

from catprune import CATPruningConfig, apply_cat_pruning, remove_cat_pruning
from catprune.architectures import ARCHITECTURES, Architecture
from catprune.engine import StepMode, caches
from catprune.errors import CacheMemoryError
from catprune.formatting import format_count
from catprune.measure import count_macs
from catprune.selection import Grid

STEPS = 5
START = 3
CONFIG = CATPruningConfig(keep_ratio=0.3, start_step=START)
FRAMES = 5
"""Video frames: 2 latent frames (the first alone, then 4 in one)."""
SIZE = 64
"""Pixels per side: 8x8 latents, a 4x4 token grid per latent frame: 32 tokens."""


def wan_prompts(num_prompts: int, cfg: bool = True) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(1)
    prompts: dict[str, Any] = {
        "prompt_embeds": torch.randn(num_prompts, TEXT_TOKENS, TEXT_DIM, generator=generator),
        "guidance_scale": 5.0 if cfg else 1.0,
    }
    if cfg:
        prompts["negative_prompt_embeds"] = torch.randn(
            num_prompts, TEXT_TOKENS, TEXT_DIM, generator=generator
        )
    return prompts


def latents(num_prompts: int) -> torch.Tensor:
    """One latent video per prompt, each from its own seed (the same alone or batched)."""
    return torch.cat(
        [torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(num_prompts)]
    )


def generate(pipe: WanPipeline, prompts: dict[str, Any], start: torch.Tensor) -> torch.Tensor:
    return pipe(
        height=SIZE,
        width=SIZE,
        num_frames=FRAMES,
        num_inference_steps=STEPS,
        latents=start,
        output_type="latent",
        **prompts,
    ).frames


@pytest.fixture
def pipe() -> WanPipeline:
    return wan_pipeline(tiny_wan())


@pytest.mark.parametrize("cfg", [False, True], ids=["no-cfg", "cfg"])
def test_keep_ratio_one_equals_the_unpatched_pipeline(pipe: WanPipeline, cfg: bool) -> None:
    prompts = wan_prompts(2, cfg)
    run = lambda pipe: generate(pipe, prompts, latents(2))  # noqa: E731
    assert_keep_ratio_one_is_unpatched(pipe, run, STEPS, START)


def test_a_skipped_step_returns_the_last_outputs(pipe: WanPipeline) -> None:
    prompts = wan_prompts(2, True)
    run = lambda pipe: generate(pipe, prompts, latents(2))  # noqa: E731
    assert_skipped_steps_return_the_last_outputs(pipe, run, STEPS, START)


@pytest.mark.slow
def test_steps_before_start_step_are_identical_and_remove_restores_bit_for_bit(pipe: WanPipeline) -> None:
    prompts = wan_prompts(2)
    run = lambda pipe: generate(pipe, prompts, latents(2))  # noqa: E731
    assert_unpatched_until_start_and_removed(pipe, run, CONFIG, STEPS, passes=2)


def test_pruned_step_fed_the_fill_steps_inputs_returns_its_output() -> None:
    """Two rows, three latent frames, two blocks: exact caches after the fill step, so this checks the
    gather in front of the first block, the per-row rotary rows, the self-attention over the caches, the
    cross-attention on the selected tokens and the scatter."""
    transformer = tiny_wan()
    start = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    text = torch.randn(2, TEXT_TOKENS, TEXT_DIM, generator=torch.Generator().manual_seed(4))
    state = apply_cat_pruning(transformer, CATPruningConfig(keep_ratio=0.3, start_step=2))
    state.begin_generation()
    modes, outputs = [], []
    with torch.no_grad():
        for timestep in (100.0, 200.0, 200.0):
            out = transformer(start, torch.tensor([timestep] * 2), text).sample
            outputs.append(out)
            modes.append(state.mode)
            start = start if timestep == 200.0 else start - 0.1 * out
    assert modes == [StepMode.FULL, StepMode.FILL, StepMode.PRUNED]
    assert state.context.grid == Grid(4, 4, 3)
    assert state.indices.shape == (2, round(0.3 * 48)) and not torch.equal(state.indices[0], state.indices[1])
    torch.testing.assert_close(outputs[2], outputs[1], atol=1e-5, rtol=0)


def test_batched_prompts_equal_each_prompt_alone(pipe: WanPipeline) -> None:
    prompts = wan_prompts(2)
    apply_cat_pruning(pipe, CONFIG)
    batched = generate(pipe, prompts, latents(2))
    for index in range(2):
        alone = generate(pipe, one_prompt(prompts, index), latents(2)[index : index + 1])
        torch.testing.assert_close(batched[index : index + 1], alone, atol=1e-5, rtol=0)


def test_cfg_is_two_calls_per_step_sharing_the_selection(pipe: WanPipeline) -> None:
    """``WanPipeline`` calls the transformer under ``cache_context("cond")`` then ``("uncond")``: one
    step, two passes (each its own caches), the second recomputing the first's tokens."""
    state = apply_cat_pruning(pipe, CONFIG)
    calls = record_calls(state, pipe.transformer)
    generate(pipe, wan_prompts(2), latents(2))
    expected = [(step, (name, 0)) for step in range(STEPS) for name in ("cond", "uncond")]
    assert [(step, key) for step, key, _ in calls] == expected
    assert_passes_share_selections(calls)
    assert (state.stats.steps, state.stats.pruned_steps) == (STEPS, STEPS - START)


def test_3d_selection_keeps_k_tokens_per_prompt_on_the_meta_device() -> None:
    """No host reads or data-dependent shapes: the 3-D grid's selection returns exactly K per row."""
    with torch.device("meta"):
        transformer = tiny_wan()
    state = apply_cat_pruning(transformer, CATPruningConfig(start_step=2))
    state.begin_generation(cfg=False)
    with torch.device("meta"):
        start = torch.empty(2, 4, 3, 8, 8)
        text = torch.empty(2, TEXT_TOKENS, TEXT_DIM)
    modes = []
    with torch.no_grad():
        for step in range(4):
            output = transformer(start, torch.full((2,), 900.0 - step, device="meta"), text)
            modes.append(state.mode)
    assert modes == [StepMode.FULL, StepMode.FILL, StepMode.PRUNED, StepMode.PRUNED]
    assert state.context.grid == Grid(4, 4, 3)
    assert output.sample.shape == (2, 4, 3, 8, 8) and state.indices.shape == (2, round(0.3 * 48))


def test_wan22_ti2v_per_token_timesteps_are_gathered_like_the_tokens() -> None:
    """Wan 2.2 TI2V: a timestep per token (B, N), 0 on the conditioning frame's tokens; the pruned step fed
    the fill step's inputs returns its output only if the per-token modulation follows the selected
    tokens."""
    transformer = tiny_wan()
    start = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    text = torch.randn(2, TEXT_TOKENS, TEXT_DIM, generator=torch.Generator().manual_seed(4))
    state = apply_cat_pruning(transformer, CATPruningConfig(keep_ratio=0.3, start_step=2))
    state.begin_generation()
    outputs = []
    with torch.no_grad():
        for timestep in (100.0, 200.0, 200.0):
            per_token = torch.full((2, 48), timestep)
            per_token[:, :16] = 0.0  # the first latent frame: the conditioning image
            outputs.append(transformer(start, timestep=per_token, encoder_hidden_states=text).sample)
            start = start if timestep == 200.0 else start - 0.1 * outputs[-1]
    assert state.mode is StepMode.PRUNED and state.stats.steps == 3
    torch.testing.assert_close(outputs[2], outputs[1], atol=1e-5, rtol=0)


def test_wan22_ti2v_pipeline_at_keep_ratio_one_equals_the_unpatched_one() -> None:
    """``WanPipeline(expand_timesteps=True)``: the per-token timesteps of Wan 2.2 TI2V's text-to-video."""
    pipe = wan_pipeline(tiny_wan(), expand_timesteps=True)
    prompts = wan_prompts(2)
    run = lambda pipe: generate(pipe, prompts, latents(2))  # noqa: E731
    assert_keep_ratio_one_is_unpatched(pipe, run, STEPS, START)


A14B_STEPS = 8
A14B_SWITCH = 5
"""With 8 flow-matching steps (shift 3) the timesteps are 1000, 948, 883, 801, 694, 548, 338, 9: at
``boundary_ratio`` 0.6 the low-noise expert takes over at step 5, after two pruned steps of the first."""


def a14b_pipeline() -> WanPipeline:
    """Wan 2.2 A14B at toy size: two experts of one class with different weights."""
    experts = {"transformer_2": tiny_wan(seed=1), "boundary_ratio": 0.6}
    return wan_pipeline(tiny_wan(), **experts)


def generate_a14b(pipe: WanPipeline) -> torch.Tensor:
    return pipe(
        height=SIZE,
        width=SIZE,
        num_frames=FRAMES,
        num_inference_steps=A14B_STEPS,
        latents=latents(2),
        output_type="latent",
        **wan_prompts(2),
    ).frames


def test_wan22_a14b_is_one_generation_whose_second_expert_fills_its_caches_at_the_switch() -> None:
    """One engine prunes both experts: one generation of 8 steps (two passes each), one selection history;
    the first expert's caches are freed at the switch, where every pass of the step is a fill step."""
    pipe = a14b_pipeline()
    state = apply_cat_pruning(pipe, CONFIG)
    calls: list[tuple[str, int, StepMode]] = []
    for name in ("transformer", "transformer_2"):
        hook = lambda module, args, output, name=name: calls.append(  # noqa: E731
            (name, state.context.step, state.context.mode)
        )
        getattr(pipe, name).register_forward_hook(hook)
    generate_a14b(pipe)
    experts = ["transformer"] * 2 * A14B_SWITCH + ["transformer_2"] * 2 * (A14B_STEPS - A14B_SWITCH)
    modes = [StepMode.FULL] * 2 * (START - 1) + [StepMode.FILL] * 2 + [StepMode.PRUNED] * 4
    modes += [StepMode.FILL] * 2 + [StepMode.PRUNED] * 4
    assert calls == [
        (name, call // 2, mode) for call, (name, mode) in enumerate(zip(experts, modes, strict=True))
    ]
    assert (state.stats.steps, state.stats.pruned_steps) == (A14B_STEPS, A14B_STEPS - START - 1)
    assert state.model is pipe.transformer_2
    first, second = (state.experts[expert] for expert in (pipe.transformer, pipe.transformer_2))
    assert all(not processor.caches for processor in first)
    assert all(processor.cache is not None and not processor.cache.empty for processor in second)


def test_wan22_a14b_at_keep_ratio_one_equals_the_unpatched_pipeline() -> None:
    pipe = a14b_pipeline()
    reference = generate_a14b(pipe)
    state = apply_cat_pruning(pipe, CATPruningConfig(keep_ratio=1.0, start_step=START))
    torch.testing.assert_close(generate_a14b(pipe), reference, atol=1e-5, rtol=0)
    assert (state.stats.steps, state.stats.pruned_steps) == (A14B_STEPS, A14B_STEPS - START - 1)


def test_wan22_a14b_remove_restores_both_experts_bit_for_bit() -> None:
    pipe = a14b_pipeline()
    reference = generate_a14b(pipe)
    state = apply_cat_pruning(pipe, CONFIG)
    assert not torch.equal(generate_a14b(pipe), reference)
    remove_cat_pruning(pipe)
    assert torch.equal(generate_a14b(pipe), reference)
    for expert in (pipe.transformer, pipe.transformer_2):
        assert all(type(p).__name__ == "WanAttnProcessor" for p in expert.attn_processors.values())
        assert not hasattr(expert, "_catprune_engine") and "cache_context" not in vars(expert)
    assert state.stats.steps == A14B_STEPS
    apply_cat_pruning(pipe, CONFIG)  # and can be applied again


def test_counted_macs_of_a_pruned_step_agree_with_the_adapter_formula() -> None:
    """FlopCounterMode on the real forward (meta) against ``WanAdapter.step_macs`` within 5%: 81 frames
    (21 latent frames) at 32x32 pixels, CFG as two calls (one row per call)."""
    model = tiny_wan(num_layers=3)
    architecture = Architecture("tiny-wan", "wan", dict(model.config), text_tokens=512, default_steps=50)
    assert_formula_agrees_with_counted_macs(
        architecture, rows=1, image_tokens=21 * 2 * 2, resolution=32, steps=50, start_step=8
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "parameters"),
    [
        ("wan2.1-t2v-1.3b", 1_418_996_800),
        ("wan2.1-t2v-14b", 14_288_491_584),
        ("wan2.1-i2v-14b", 16_394_878_784),
        ("wan2.2-a14b", 14_288_491_584),
    ],
)
def test_the_wan_architectures_have_the_published_size_and_macs_cli_ratio(name: str, parameters: int) -> None:
    """Wan 2.1 T2V 1.3B and 14B, I2V 14B (+257 CLIP tokens in its cross-attention), at 480p (480x832) and
    81 frames: 32,760 image tokens, 512 text tokens, 50 steps, CFG as two calls."""
    report = assert_published_architecture(
        name, "WanTransformer3DModel", parameters, 512, 50, cli_steps=50, rows=1, image_tokens=32760,
        ratio=(0.3, 0.5),
    )  # fmt: skip
    config = ARCHITECTURES[name].config
    width = config["num_attention_heads"] * config["attention_head_dim"]
    per_pass = config["num_layers"] * 2 * 32760 * width + 32760 * 64  # K/V of every layer, output tokens
    assert report["cache_passes"] == 2 and report["frames"] == 81
    assert report["cache_bytes"]["bfloat16"] == 2 * 2 * per_pass  # 1.3B: 12.1 GB; 14B: 53.7 GB


@pytest.mark.slow
def test_compiled_pruning_has_no_graph_breaks_and_a_second_generation_compiles_nothing(
    pipe: WanPipeline,
) -> None:
    torch._dynamo.reset()
    prompts = wan_prompts(2)
    apply_cat_pruning(pipe, CONFIG)
    assert_compiles_once(pipe, lambda pipe: generate(pipe, prompts, latents(2)), "whole")


def test_macs_report_the_caches_of_both_cfg_passes_by_dtype() -> None:
    """The caches a generation keeps: each pass (CFG as two calls: two) holds every layer's K/V of every
    image token and the output tokens."""
    model = tiny_wan(num_layers=3)
    architecture = Architecture("tiny-wan", "wan", dict(model.config), text_tokens=512, default_steps=50)
    report = count_macs(architecture.with_video(frames=9), resolution=32, steps=50, start_step=8)
    tokens = 3 * 2 * 2  # 9 frames: 3 latent frames of 2x2 tokens
    per_pass = 3 * 2 * tokens * 24 + tokens * 16  # layers x (K, V) x tokens x width, then 1x2x2x4 outputs
    assert report.passes == 2 and report.image_tokens == tokens
    assert report.cache_bytes() == {"float32": 8 * per_pass, "bfloat16": 4 * per_pass, "float8": 2 * per_pass}
    assert count_macs(architecture, resolution=32, steps=50, cfg=False).passes == 1


@pytest.mark.slow
def test_macs_cli_sizes_a_video_by_height_width_and_frames() -> None:
    """``--height --width --frames`` (here a square 480x480 video of 17 frames: 5 latent frames of 30x30
    tokens) size what is counted, and the report says the size."""
    command = ["macs", "--model", "wan2.1-t2v-1.3b", "--height", "480", "--width", "480", "--frames", "17"]
    result = subprocess.run(
        [sys.executable, "-m", "catprune", *command, "--json"], capture_output=True, text=True, check=True
    )
    report = json.loads(result.stdout)
    assert (report["frames"], report["height"], report["width"]) == (17, 480, 480)
    assert report["image_tokens"] == 5 * 30 * 30


def test_macs_of_wan22_a14b_count_a_fill_step_where_the_second_expert_takes_over() -> None:
    """Flow shift 12, boundary 0.875, 50 UniPC steps: the low-noise expert takes over at step 32, whose
    fill step of its caches replaces a pruned step; one expert's caches at a time (the first's are freed)."""
    model = tiny_wan(num_layers=3)
    one = Architecture("tiny-wan", "wan", dict(model.config), text_tokens=512, default_steps=50)
    two = dataclasses.replace(one, scheduler_config={"flow_shift": 12.0}, boundary_ratio=0.875)
    single, experts = (count_macs(a, resolution=32, steps=50, start_step=8) for a in (one, two))
    assert (single.switch_step, experts.switch_step) == (None, 32)
    assert (single.step_counts, experts.step_counts) == ((7, 1, 42), (7, 2, 41))
    extra = 2 * (experts.fill_step.macs - experts.pruned_step.macs)  # one more fill step, two passes
    assert experts.cat_macs == single.cat_macs + extra
    assert experts.cache_bytes() == single.cache_bytes()
    late = count_macs(two, resolution=32, steps=50, start_step=40)
    assert late.step_counts == (39, 1, 10)  # the switch at step 32 is a full step anyway


def test_the_cache_size_is_logged_once_before_the_first_fill_step(
    pipe: WanPipeline, caplog: pytest.LogCaptureFixture
) -> None:
    apply_cat_pruning(pipe, CONFIG)
    with caplog.at_level(logging.INFO, logger="catprune"):
        generate(pipe, wan_prompts(2), latents(2))
        generate(pipe, wan_prompts(2), latents(2))
    messages = [record.getMessage() for record in caplog.records if "K/V caches" in record.getMessage()]
    size = 2 * 2 * 32 * 24 * 2 * 4  # (K, V) x rows x tokens x width x layers x float32
    assert messages == [
        f"CAT pruning: the K/V caches take about {format_count(size, 'B')} per pass (2 layers)"
    ]


def test_a_cache_that_cannot_be_allocated_is_refused_in_one_line_naming_its_size(
    pipe: WanPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The out-of-memory error of the fill step's allocation becomes one line with the size it needs."""
    apply_cat_pruning(pipe, CONFIG)

    def out_of_memory(*args: Any, **kwargs: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(caches.KVCache, "fill", out_of_memory)
    with pytest.raises(CacheMemoryError) as error:
        generate(pipe, wan_prompts(2), latents(2))
    size = format_count(2 * 2 * 32 * 24 * 2 * 4, "B")
    assert f"need about {size} per pass" in str(error.value) and "\n" not in str(error.value)
