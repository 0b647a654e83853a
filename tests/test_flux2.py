"""CAT pruning on FLUX.2: the real ``Flux2Transformer2DModel``, ``Flux2Pipeline`` (dev: guidance-distilled)
and ``Flux2KleinPipeline`` (base: true CFG as named passes) at toy size with random weights (CPU), driven
with prompt embeddings.

What FLUX.2 adds to FLUX.1's mechanism and these tests aim at: a rotary table the model concatenates from
two ``pos_embed`` calls (gathered per row in front of every block), single-stream blocks whose fused
projection runs the MLP inside the attention processor, 4-axis ids with reference images appended (a fixed
segment), and Klein's true CFG.
"""

from __future__ import annotations

import warnings
from typing import Any

import PIL.Image
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
    flux2_pipeline,
    one_prompt,
    record_calls,
    seeded_latents,
    tiny_flux2,
)
from diffusers import Flux2KleinPipeline, Flux2Pipeline

from catprune import CATPruningConfig, apply_cat_pruning, remove_cat_pruning
from catprune.architectures import Architecture
from catprune.engine import StepMode
from catprune.measure import count_macs, count_selection
from catprune.tools.macs import report_fields, report_lines

STEPS = 6
START = 3
CONFIG = CATPruningConfig(keep_ratio=0.3, start_step=START)
SIZE = 32
"""Pixels per side (the toy VAE's scale factor 2, then 2x2 packing): an 8x8 token grid."""


def prompts_for(num_prompts: int, klein: bool) -> dict[str, Any]:
    """Prompt embeddings for ``num_prompts`` prompts: dev's distilled guidance, or Klein's true CFG with
    negative embeddings (two calls per step)."""
    generator = torch.Generator().manual_seed(1)
    prompts: dict[str, Any] = {
        "prompt_embeds": torch.randn(num_prompts, TEXT_TOKENS, TEXT_DIM, generator=generator),
        "guidance_scale": 4.0,
    }
    if klein:
        negative = torch.randn(num_prompts, TEXT_TOKENS, TEXT_DIM, generator=generator)
        prompts["negative_prompt_embeds"] = negative
    return prompts


def latents(num_prompts: int) -> torch.Tensor:
    """One latent per prompt from its own seed, as the pipelines take them: (B, 16, 8, 8), packed inside."""
    return seeded_latents(num_prompts, size=8, channels=16)


def generate(pipe: Any, prompts: dict[str, Any], start: torch.Tensor) -> torch.Tensor:
    """Final packed latents of a ``STEPS``-step generation."""
    return pipe(
        height=SIZE, width=SIZE, num_inference_steps=STEPS, latents=start, output_type="latent", **prompts
    ).images


def pipe_of(kind: str) -> Any:
    """``Flux2Pipeline`` around a guidance-distilled transformer (dev), or ``Flux2KleinPipeline`` around
    one without guidance embedding (Klein base, true CFG)."""
    if kind == "dev":
        return flux2_pipeline(tiny_flux2())
    return flux2_pipeline(tiny_flux2(guidance=False), Flux2KleinPipeline)


@pytest.fixture
def dev() -> Flux2Pipeline:
    return pipe_of("dev")


@pytest.fixture
def klein() -> Flux2KleinPipeline:
    return pipe_of("klein")


@pytest.mark.parametrize("kind", ["dev", "klein"])
def test_keep_ratio_one_equals_the_unpatched_pipeline(kind: str) -> None:
    prompts = prompts_for(2, kind == "klein")
    assert_keep_ratio_one_is_unpatched(
        pipe_of(kind), lambda pipe: generate(pipe, prompts, latents(2)), STEPS, START
    )


def test_a_skipped_step_returns_the_last_outputs() -> None:
    prompts = prompts_for(2, False)
    run = lambda pipe: generate(pipe, prompts, latents(2))  # noqa: E731
    assert_skipped_steps_return_the_last_outputs(pipe_of("dev"), run, STEPS, START)


def test_steps_before_start_step_are_identical_and_remove_restores_bit_for_bit(
    klein: Flux2KleinPipeline,
) -> None:
    prompts = prompts_for(2, klein=True)
    run = lambda pipe: generate(pipe, prompts, latents(2))  # noqa: E731
    assert_unpatched_until_start_and_removed(klein, run, CONFIG, STEPS, passes=2)


def image_ids(height: int, width: int, t: int = 0) -> torch.Tensor:
    """(h * w, 4) ids (t, row, column, 0) in raster order, as the pipelines make them (a reference image's
    ``t`` is 10, 20...)."""
    rows, columns = torch.arange(height), torch.arange(width)
    return torch.cartesian_prod(torch.tensor([t]), rows, columns, torch.tensor([0]))


def bare_inputs(reference: bool) -> tuple[torch.Tensor, dict[str, Any]]:
    """Packed latents (2, 64 (+ 16), 16) and the transformer's other inputs: two prompts, an 8x8 image, and
    with ``reference`` a 4x4 reference image's tokens appended (ids with t = 10), as the pipelines append
    them."""
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randn(2, 64 + (16 if reference else 0), 16, generator=generator)
    ids = torch.cat([image_ids(8, 8), image_ids(4, 4, t=10)]) if reference else image_ids(8, 8)
    text_ids = torch.cartesian_prod(*(torch.arange(1),) * 3, torch.arange(TEXT_TOKENS))
    return tokens, {
        "encoder_hidden_states": torch.randn(2, TEXT_TOKENS, TEXT_DIM, generator=generator),
        "txt_ids": text_ids,
        "img_ids": ids,
        "guidance": torch.full((2,), 4.0),
    }


@pytest.mark.parametrize("reference", [False, True], ids=["text-to-image", "reference-image"])
def test_pruned_step_fed_the_fill_steps_inputs_returns_its_output(reference: bool) -> None:
    """Both block kinds (two of each): the caches are exact after the fill step, so this checks the
    pruned attention of both kinds with the fused MLP, the per-row rotary gather, the gather and the
    scatter; with a reference image its tokens are never selected and are recomputed at every step."""
    transformer = tiny_flux2(num_layers=2, num_single_layers=2)
    tokens, inputs = bare_inputs(reference)
    state = apply_cat_pruning(transformer, CATPruningConfig(keep_ratio=0.3, start_step=2))
    state.begin_generation()
    modes, outputs = [], []
    with torch.no_grad():
        for timestep in (0.9, 0.8, 0.8):
            outputs.append(transformer(tokens, timestep=torch.tensor([timestep] * 2), **inputs).sample)
            modes.append(state.mode)
            tokens = tokens if timestep == 0.8 else tokens - 0.1 * outputs[-1]
    assert modes == [StepMode.FULL, StepMode.FILL, StepMode.PRUNED]
    assert state.context.layout.fixed_tokens == (16 if reference else 0)
    assert state.indices.shape == (2, round(0.3 * 64))
    assert int(state.indices.max()) < 64  # only the generated image's tokens are ever selected
    assert not torch.equal(state.indices[0], state.indices[1])  # the rows' rotary gathers differ
    assert outputs[2].shape == tokens.shape
    torch.testing.assert_close(outputs[2], outputs[1], atol=1e-5, rtol=0)


def reference_image() -> PIL.Image.Image:
    """A 64x64 reference image (the pipelines' smallest): 16x16 tokens appended after the 8x8 image's."""
    pixels = torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(5))
    return PIL.Image.fromarray((pixels * 255).to(torch.uint8).numpy())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dev", "klein"])
def test_a_reference_image_is_never_selected_and_keep_ratio_one_equals_the_unpatched_pipeline(
    kind: str,
) -> None:
    """The pipelines append a reference image's tokens (ids with t = 10) after the generated image's: a
    fixed segment of the layout, never in a pruned step's indices, recomputed at every step."""
    pipe, prompts = pipe_of(kind), {**prompts_for(2, kind == "klein"), "image": reference_image()}
    reference = generate(pipe, prompts, latents(2))
    state = apply_cat_pruning(pipe, CATPruningConfig(keep_ratio=1.0, start_step=START))
    torch.testing.assert_close(generate(pipe, prompts, latents(2)), reference, atol=1e-5, rtol=0)
    remove_cat_pruning(pipe)
    state = apply_cat_pruning(pipe, CONFIG)
    calls = record_calls(state, pipe.transformer)
    generate(pipe, prompts, latents(2))
    assert state.context.layout.fixed_tokens == 256 and state.context.num_tokens == 64
    pruned = [indices for _, _, indices in calls if indices is not None]
    assert len(pruned) == (STEPS - START) * (2 if kind == "klein" else 1)
    assert all(int(indices.max()) < 64 for indices in pruned)


@pytest.mark.parametrize("kind", ["dev", "klein"])
def test_batched_prompts_equal_each_prompt_alone(kind: str) -> None:
    """Each prompt selects its own tokens: a batch is right only if every row gets its own rotary rows in
    every block (and, under Klein's true CFG, both passes their own caches)."""
    pipe, prompts = pipe_of(kind), prompts_for(2, kind == "klein")
    apply_cat_pruning(pipe, CONFIG)
    batched = generate(pipe, prompts, latents(2))
    for index in range(2):
        alone = generate(pipe, one_prompt(prompts, index), latents(2)[index : index + 1])
        torch.testing.assert_close(batched[index : index + 1], alone, atol=1e-5, rtol=0)


def test_dev_is_one_call_per_step(dev: Flux2Pipeline) -> None:
    state = apply_cat_pruning(dev, CONFIG)
    calls = record_calls(state, dev.transformer)
    generate(dev, prompts_for(2, klein=False), latents(2))
    assert [(step, key) for step, key, _ in calls] == [(step, (None, 0)) for step in range(STEPS)]
    assert (state.stats.steps, state.stats.pruned_steps) == (STEPS, STEPS - START)


def test_klein_true_cfg_passes_share_one_selection_per_step(klein: Flux2KleinPipeline) -> None:
    """``Flux2KleinPipeline`` (base) calls the transformer under ``cache_context("cond")`` and
    ``("uncond")``: one step, two passes with their own caches, the second recomputing the first's tokens."""
    state = apply_cat_pruning(klein, CONFIG)
    calls = record_calls(state, klein.transformer)
    generate(klein, prompts_for(2, klein=True), latents(2))
    assert [(step, key) for step, key, _ in calls] == [
        (step, (name, 0)) for step in range(STEPS) for name in ("cond", "uncond")
    ]
    assert_passes_share_selections(calls)
    assert (state.stats.steps, state.stats.pruned_steps) == (STEPS, STEPS - START)


def test_the_reference_kv_cache_mode_is_refused() -> None:
    transformer = tiny_flux2()
    tokens, inputs = bare_inputs(reference=False)
    apply_cat_pruning(transformer, CONFIG).begin_generation()
    with pytest.raises(ValueError, match="kv_cache_mode"), torch.no_grad():
        transformer(tokens, timestep=torch.tensor([0.9] * 2), kv_cache_mode="cached", **inputs)


def test_pruned_steps_run_on_the_meta_device() -> None:
    """No host reads or data-dependent shapes in selection, rotary gather, fused MLP, caches or scatter."""
    with torch.device("meta"):
        transformer = tiny_flux2()
    state = apply_cat_pruning(transformer, CATPruningConfig(start_step=2))
    state.begin_generation()
    with torch.device("meta"):
        inputs = {
            "encoder_hidden_states": torch.empty(2, TEXT_TOKENS, TEXT_DIM),
            "txt_ids": torch.zeros(TEXT_TOKENS, 4),
            "img_ids": torch.zeros(64, 4),
            "guidance": torch.empty(2),
        }
        tokens = torch.empty(2, 64, 16)
    modes = []
    with torch.no_grad():
        for step in range(4):
            output = transformer(tokens, timestep=torch.full((2,), 0.9 - step / 10, device="meta"), **inputs)
            modes.append(state.mode)
    assert modes == [StepMode.FULL, StepMode.FILL, StepMode.PRUNED, StepMode.PRUNED]
    assert output.sample.shape == (2, 64, 16) and state.indices.shape == (2, round(0.3 * 64))


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "klein"])
def test_counted_macs_of_a_pruned_step_agree_with_the_adapter_formula(guidance: bool) -> None:
    """FlopCounterMode on the real forward (meta) against ``Flux2Adapter.step_macs`` within 5%."""
    model = tiny_flux2(guidance=guidance, num_layers=2, num_single_layers=3)
    architecture = Architecture(
        "tiny-flux2", "flux2", dict(model.config), text_tokens=TEXT_TOKENS, default_steps=4
    )
    assert_formula_agrees_with_counted_macs(architecture, rows=1, image_tokens=256)


def test_a_few_step_schedule_shows_the_saving_at_each_start_step_and_is_warned_about_once() -> None:
    """FLUX.2-klein's 4 distilled steps never reach the default t0 = 8: ``catprune macs`` gives the ratio
    at each start_step that prunes (2: two pruned steps, 3: one) and its advice, and a pipeline that runs
    such a schedule warns once, however many generations it runs."""
    model = tiny_flux2(guidance=False, num_layers=1, num_single_layers=1)
    architecture = Architecture("tiny-klein", "flux2", dict(model.config), TEXT_TOKENS, default_steps=4)
    report = count_macs(architecture, resolution=256, steps=4)
    assert report.step_counts == (4, 0, 0) and report.ratio == 1.0
    (two, pruned_two, ratio_two), (three, pruned_three, ratio_three) = report.by_start_step()
    assert (two, pruned_two, three, pruned_three) == (2, 2, 3, 1)
    pruned_share = report.pruned_step.macs / report.full_step.macs
    assert ratio_two == pytest.approx((2 + 2 * pruned_share) / 4)
    assert ratio_two < ratio_three < 1.0
    selection = count_selection(architecture, 256, 1, CATPruningConfig())
    fields = report_fields(report, selection)
    assert "start_step 2 prunes 2 of them" in fields["few_steps"]
    assert [row["start_step"] for row in fields["by_start_step"]] == [2, 3]
    assert "start_step 2: 2 pruned" in "\n".join(report_lines(report, fields))

    pipe = pipe_of("klein")
    apply_cat_pruning(pipe, CATPruningConfig())
    prompts = {"prompt_embeds": prompts_for(1, klein=False)["prompt_embeds"], "guidance_scale": 1.0}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            pipe(
                height=SIZE,
                width=SIZE,
                num_inference_steps=4,
                latents=latents(1),
                output_type="latent",
                **prompts,
            )
    messages = [str(w.message) for w in caught if "never reaches start_step" in str(w.message)]
    assert len(messages) == 1 and "catprune macs" in messages[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "parameters", "billions", "steps"),
    [("flux2-dev", 32_223_281_152, 32.2, 50), ("flux2-klein", 3_875_544_576, 3.9, 4)],
)
def test_the_flux2_architectures_have_the_published_size_and_macs_cli_ratio(
    name: str, parameters: int, billions: float, steps: int
) -> None:
    """FLUX.2-dev: 32B parameters, 50 steps; FLUX.2-klein-4B: 4B (3.9B), 4 distilled steps; both 512 text
    tokens."""
    assert round(parameters / 1e9, 1) == billions
    assert_published_architecture(
        name, "Flux2Transformer2DModel", parameters, 512, steps, cli_steps=28, rows=1, image_tokens=4096,
        ratio=(0.5, 0.6),
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("how", ["whole", "blocks"])
def test_compiled_pruning_has_no_graph_breaks_and_a_second_generation_compiles_nothing(
    klein: Flux2KleinPipeline, how: str
) -> None:
    """``transformer.compile(fullgraph=True)`` or its repeated blocks compiled, after pruning is applied:
    any graph break raises; whole, one graph per kind of step (full, fill, pruned) for both passes."""
    torch._dynamo.reset()
    prompts = prompts_for(2, klein=True)
    apply_cat_pruning(klein, CONFIG)
    assert_compiles_once(klein, lambda pipe: generate(pipe, prompts, latents(2)), how)
