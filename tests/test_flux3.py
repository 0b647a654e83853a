"""CAT pruning on FLUX.3: the real ``Flux3Transformer2DModel`` at toy size with random weights (CPU), in
the real modular pipelines (``Flux3ModularPipeline``: the guider's classifier-free guidance as two calls per
step without ``cache_context``; ``Flux3DistilledModularPipeline``: the step-distilled flow map, one call per
step with ``target_timestep``), built from their denoise blocks and driven with prompt embeddings (no
Qwen3-VL, no VAE: reference images enter as packed latents, ``image_cond_latents``).

What FLUX.3 adds and these tests aim at: per-mode blocks (the image's pruned, the reference's and the
text's untouched), per-token modulation gathered like the tokens, rotary tables concatenated inside
``forward`` and gathered per row, a reference image as a separate input that joins the single blocks as a
fixed segment, the output layer on the image rows only, and the guider's unnamed second pass.
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
    fill_and_pruned_outputs,
    last_meta_output,
    one_prompt,
    record_calls,
    seeded_latents,
)
from diffusers import FlowMatchEulerDiscreteScheduler, Flux3Transformer2DModel
from diffusers.guiders import ClassifierFreeGuidance, SkipLayerGuidance
from diffusers.modular_pipelines.flux3.modular_blocks_flux3 import Flux3AutoCoreDenoiseStep
from diffusers.modular_pipelines.flux3.modular_blocks_flux3_distilled import Flux3DistilledAutoCoreDenoiseStep
from diffusers.modular_pipelines.flux3.modular_pipeline import (
    Flux3DistilledModularPipeline,
    Flux3ModularPipeline,
)

from catprune import CATPruningConfig, apply_cat_pruning, remove_cat_pruning
from catprune.architectures import Architecture
from catprune.engine import StepMode
from catprune.measure import count_macs

STEPS = 6
START = 3
CONFIG = CATPruningConfig(keep_ratio=0.3, start_step=START)
SIZE = 128
"""Pixels per side: the pipelines' 16 pixels per token without a VAE (8x8 tokens)."""
REFERENCE = 4
"""A reference image's tokens per side (16 tokens after the 64 image tokens in the single blocks)."""


def tiny_flux3(
    flow_map: bool = False, num_layers: int = 1, num_single_layers: int = 2
) -> Flux3Transformer2DModel:
    """FLUX.3's structure at toy width: per-mode blocks for image, reference and text, then single blocks,
    2 heads of 16, four rotary axes of 4, 16 channels per packed token; ``flow_map`` adds the
    target-timestep embedder (the step-distilled model)."""
    torch.manual_seed(0)
    return Flux3Transformer2DModel(
        in_channels=16,
        cond_in_channels=16,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        timestep_channels=16,
        axes_dims_rope=(4, 4, 4, 4),
        flow_map=flow_map,
    ).eval()


def pipe_of(kind: str) -> Any:
    """The real modular pipeline of its denoise blocks around a toy transformer: the base model's
    (``Flux3ModularPipeline``, CFG by ``ClassifierFreeGuidance``) or the flow map's
    (``Flux3DistilledModularPipeline``), with FLUX.3's shifted flow-matching Euler scheduler."""
    distilled = kind == "distilled"
    blocks = Flux3DistilledAutoCoreDenoiseStep() if distilled else Flux3AutoCoreDenoiseStep()
    pipe = blocks.init_pipeline()
    assert isinstance(pipe, Flux3DistilledModularPipeline if distilled else Flux3ModularPipeline)
    components: dict[str, Any] = {"transformer": tiny_flux3(flow_map=distilled)}
    if not distilled:
        components["guider"] = ClassifierFreeGuidance(guidance_scale=3.5)
    pipe.update_components(scheduler=FlowMatchEulerDiscreteScheduler(shift=6.93), **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompts_for(num_prompts: int, kind: str, reference: bool = False) -> dict[str, Any]:
    """Prompt embeddings (the base model's with negative ones for the guider's second call) and, with
    ``reference``, one reference image's packed latents per prompt."""
    generator = torch.Generator().manual_seed(1)
    prompts: dict[str, Any] = {
        "prompt_embeds": torch.randn(num_prompts, TEXT_TOKENS, TEXT_DIM, generator=generator)
    }
    if kind == "base":
        prompts["negative_prompt_embeds"] = torch.randn(
            num_prompts, TEXT_TOKENS, TEXT_DIM, generator=generator
        )
    if reference:
        prompts["image_cond_latents"] = [
            torch.randn(num_prompts, 16, REFERENCE, REFERENCE, generator=generator)
        ]
    return prompts


def latents(num_prompts: int) -> torch.Tensor:
    """One latent per prompt from its own seed, as the pipelines take them: (B, 16, 8, 8), packed inside."""
    return seeded_latents(num_prompts, size=8, channels=16)


def generate(pipe: Any, prompts: dict[str, Any], start: torch.Tensor) -> torch.Tensor:
    """Final latents (B, 16, 8, 8) of a ``STEPS``-step generation from ``start``."""
    return pipe(
        height=SIZE, width=SIZE, num_inference_steps=STEPS, latents=start, output="latents", **prompts
    )


@pytest.fixture(params=["base", "distilled"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


def test_keep_ratio_one_equals_the_unpatched_pipeline(kind: str) -> None:
    prompts = prompts_for(2, kind)
    assert_keep_ratio_one_is_unpatched(
        pipe_of(kind), lambda pipe: generate(pipe, prompts, latents(2)), STEPS, START
    )


def test_a_skipped_step_returns_the_last_outputs(kind: str) -> None:
    prompts = prompts_for(2, kind)
    run = lambda pipe: generate(pipe, prompts, latents(2))  # noqa: E731
    assert_skipped_steps_return_the_last_outputs(pipe_of(kind), run, STEPS, START)


def test_steps_before_start_step_are_identical_and_remove_restores_bit_for_bit() -> None:
    """Under the guider's two calls per step: both calls of every step before start_step are the unpatched
    ones bit for bit."""
    prompts = prompts_for(2, "base")
    run = lambda pipe: generate(pipe, prompts, latents(2))  # noqa: E731
    assert_unpatched_until_start_and_removed(pipe_of("base"), run, CONFIG, STEPS, passes=2)


def image_ids(height: int, width: int, axis_l: int = 0) -> torch.Tensor:
    """(h * w, 4) ids (0, row / 2, column / 2, l) in raster order, as the pipelines make them (FLUX.3's
    rotary scale 0.5; a reference image's l is -1)."""
    grid = torch.cartesian_prod(
        torch.arange(1), torch.arange(height), torch.arange(width), torch.tensor([axis_l])
    )
    return grid.float() * torch.tensor([1.0, 0.5, 0.5, 1.0])


def bare_inputs(reference: bool, flow_map: bool) -> tuple[torch.Tensor, dict[str, Any]]:
    """Packed latents (2, 64, 16) of two prompts and the transformer's other inputs, with ``reference`` a
    4x4 reference image's tokens and ids, with ``flow_map`` the target timestep."""
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randn(2, 64, 16, generator=generator)
    inputs: dict[str, Any] = {
        "encoder_hidden_states": torch.randn(2, TEXT_TOKENS, TEXT_DIM, generator=generator),
        "img_ids": image_ids(8, 8),
        "txt_ids": torch.cartesian_prod(*(torch.arange(1),) * 3, torch.arange(TEXT_TOKENS)).float(),
    }
    if reference:
        inputs["image_cond_hidden_states"] = torch.randn(2, REFERENCE**2, 16, generator=generator)
        inputs["image_cond_ids"] = image_ids(REFERENCE, REFERENCE, axis_l=-1)
    if flow_map:
        inputs["target_timestep"] = torch.full((2,), 0.7)
    return tokens, inputs


@pytest.mark.parametrize(
    ("reference", "flow_map"),
    [(False, False), (True, False), (False, True)],
    ids=["base", "reference", "flow-map"],
)
def test_pruned_step_fed_the_fill_steps_inputs_returns_its_output(reference: bool, flow_map: bool) -> None:
    """Two blocks of each kind: the caches are exact after the fill step, so this checks the per-mode and
    single attention, the per-row rotary gathers, the gathered per-token modulation, the output layer's
    rows, the gather and the scatter; a reference image's tokens are never selected."""
    tokens, inputs = bare_inputs(reference, flow_map)
    state, fill, pruned = fill_and_pruned_outputs(tiny_flux3(flow_map, num_layers=2), tokens, inputs)
    assert state.context.layout.fixed_tokens == (REFERENCE**2 if reference else 0)
    assert state.indices.shape == (2, round(0.3 * 64)) and int(state.indices.max()) < 64
    assert not torch.equal(state.indices[0], state.indices[1])  # the rows' gathers differ
    assert pruned.shape == tokens.shape
    torch.testing.assert_close(pruned, fill, atol=1e-5, rtol=0)


def test_a_reference_image_is_never_selected_and_keep_ratio_one_equals_the_unpatched_pipeline() -> None:
    """``image_cond_latents`` (image-to-image): the reference tokens join the single blocks after the
    image's, a fixed segment never in a pruned step's indices; every token kept, the pipeline is unchanged."""
    pipe, prompts = pipe_of("base"), prompts_for(2, "base", reference=True)
    reference = generate(pipe, prompts, latents(2))
    apply_cat_pruning(pipe, CATPruningConfig(keep_ratio=1.0, start_step=START))
    torch.testing.assert_close(generate(pipe, prompts, latents(2)), reference, atol=1e-5, rtol=0)
    remove_cat_pruning(pipe)
    state = apply_cat_pruning(pipe, CONFIG)
    calls = record_calls(state, pipe.transformer)
    pruned = generate(pipe, prompts, latents(2))
    assert state.context.layout.fixed_tokens == REFERENCE**2 and state.context.num_tokens == 64
    indices = [selected for _, _, selected in calls if selected is not None]
    assert len(indices) == 2 * (STEPS - START)
    assert all(int(selected.max()) < 64 for selected in indices)
    assert not torch.equal(pruned, reference)


def test_batched_prompts_equal_each_prompt_alone(kind: str) -> None:
    """Each prompt selects its own tokens: a batch is right only if every row gets its own rotary rows and
    modulation (and, under the guider's two calls, both passes their own caches)."""
    pipe, prompts = pipe_of(kind), prompts_for(2, kind)
    apply_cat_pruning(pipe, CONFIG)
    batched = generate(pipe, prompts, latents(2))
    for index in range(2):
        alone = generate(pipe, one_prompt(prompts, index), latents(2)[index : index + 1])
        torch.testing.assert_close(batched[index : index + 1], alone, atol=1e-5, rtol=0)


def test_the_guiders_two_calls_are_two_passes_of_each_step() -> None:
    """``ClassifierFreeGuidance`` calls the transformer for the conditional, then the unconditional
    prediction, without ``cache_context``: the second call at the same timestep is pass ``(None, 1)``, which
    recomputes the first pass's tokens; each step counts once."""
    pipe = pipe_of("base")
    state = apply_cat_pruning(pipe, CONFIG)
    calls = record_calls(state, pipe.transformer)
    generate(pipe, prompts_for(2, "base"), latents(2))
    assert [(step, key) for step, key, _ in calls] == [
        (step, (None, count)) for step in range(STEPS) for count in (0, 1)
    ]
    assert_passes_share_selections(calls)
    assert (state.stats.steps, state.stats.pruned_steps) == (STEPS, STEPS - START)
    assert [len(cache) for cache in (state.outputs, state.processors[0].caches)] == [2, 2]


def test_the_flow_map_is_one_call_per_step() -> None:
    pipe = pipe_of("distilled")
    state = apply_cat_pruning(pipe, CONFIG)
    calls = record_calls(state, pipe.transformer)
    generate(pipe, prompts_for(2, "distilled"), latents(2))
    assert [(step, key) for step, key, _ in calls] == [(step, (None, 0)) for step in range(STEPS)]
    assert (state.stats.steps, state.stats.pruned_steps) == (STEPS, STEPS - START)


def test_a_guider_that_changes_the_model_for_some_calls_is_refused() -> None:
    """Skip-layer guidance (like perturbed-attention guidance) hooks the transformer for its extra call."""
    pipe = pipe_of("base")
    pipe.update_components(guider=SkipLayerGuidance(skip_layer_guidance_layers=[0]))
    with pytest.raises(ValueError, match="SkipLayerGuidance changes the transformer"):
        apply_cat_pruning(pipe, CONFIG)
    assert not hasattr(pipe.transformer, "_catprune_engine")


def test_image_ids_out_of_raster_order_are_refused() -> None:
    transformer = tiny_flux3()
    tokens, inputs = bare_inputs(reference=False, flow_map=False)
    inputs["img_ids"] = inputs["img_ids"].view(8, 8, 4).transpose(0, 1).reshape(64, 4)  # column-major
    apply_cat_pruning(transformer, CONFIG).begin_generation()
    with pytest.raises(ValueError, match="raster grid"), torch.no_grad():
        transformer(tokens, timestep=torch.full((2,), 0.9), **inputs)


def test_pruned_steps_run_on_the_meta_device() -> None:
    """No host reads or data-dependent shapes in selection, gathers, caches, output rows or scatter."""
    with torch.device("meta"):
        transformer = tiny_flux3(flow_map=True)
        tokens, inputs = bare_inputs(reference=True, flow_map=True)
    state, output = last_meta_output(transformer, tokens, inputs)
    assert output.sample.shape == (2, 64, 16) and state.indices.shape == (2, round(0.3 * 64))


def test_bfloat16_with_float32_qk_norms_fills_and_prunes_as_the_model_computes() -> None:
    """As diffusers loads FLUX.3 in bfloat16 (its q/k norms kept in float32): the caching processors
    normalise and rotate q/k in float32 like the model's, so the fill step equals the model's step."""
    transformer = tiny_flux3(num_layers=2).to(torch.bfloat16)
    for name, module in transformer.named_modules():
        if name.endswith(("norm_q", "norm_k")):
            module.float()  # diffusers' _keep_in_fp32_modules
    tokens, inputs = bare_inputs(reference=True, flow_map=False)
    tokens = tokens.to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) if k.endswith("states") else v for k, v in inputs.items()}
    with torch.no_grad():
        reference = [transformer(tokens, timestep=torch.full((2,), t), **inputs).sample for t in (0.9, 0.8)]
    state = apply_cat_pruning(transformer, CATPruningConfig(start_step=2))
    state.begin_generation()
    with torch.no_grad():
        outputs = [
            transformer(tokens, timestep=torch.full((2,), t), **inputs).sample for t in (0.9, 0.8, 0.7)
        ]
    assert state.mode is StepMode.PRUNED and outputs[2].dtype == torch.bfloat16
    assert torch.equal(outputs[0], reference[0])
    torch.testing.assert_close(outputs[1], reference[1], atol=0, rtol=0)


@pytest.mark.parametrize("flow_map", [False, True], ids=["base", "flow-map"])
def test_counted_macs_of_a_pruned_step_agree_with_the_adapter_formula(flow_map: bool) -> None:
    """FlopCounterMode on the real forward (meta) against ``Flux3Adapter.step_macs`` within 5%."""
    model = tiny_flux3(flow_map, num_layers=2, num_single_layers=3)
    architecture = Architecture(
        "tiny-flux3", "flux3", dict(model.config), text_tokens=TEXT_TOKENS, default_steps=16
    )
    assert_formula_agrees_with_counted_macs(architecture, rows=1, image_tokens=256)


def test_the_flow_map_shows_the_saving_at_each_start_step() -> None:
    """The flow map's 16 steps reach the default t0 = 8 (8 pruned); ``by_start_step`` gives the ratio at
    every start_step, each later one saving less."""
    architecture = Architecture(
        "tiny-flux3-distilled", "flux3", dict(tiny_flux3(flow_map=True).config), TEXT_TOKENS, default_steps=16
    )
    report = count_macs(architecture, resolution=256, steps=16)
    assert report.step_counts == (7, 1, 8) and report.ratio < 1.0
    rows = report.by_start_step()
    assert [start for start, _, _ in rows] == list(range(2, 16))
    assert [pruned for _, pruned, _ in rows] == [16 - start for start in range(2, 16)]
    ratios = [ratio for _, _, ratio in rows]
    assert ratios == sorted(ratios) and ratios[8 - 2] == pytest.approx(report.ratio)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "steps", "passes"), [("flux3", 50, 2), ("flux3-distilled", 16, 1)], ids=["base", "distilled"]
)
def test_the_flux3_architectures_have_diffusers_default_size_and_macs_cli_ratio(
    name: str, steps: int, passes: int
) -> None:
    """diffusers' default config (no published config is readable offline): 5.54B parameters, of which
    0.61B are the reference image's per-mode blocks (the flow map adds the target-timestep embedder), 320
    text tokens; the base model's guider calls twice per step, the flow map once."""
    parameters = {"flux3": 5_538_458_368, "flux3-distilled": 5_548_681_984}[name]
    report = assert_published_architecture(
        name, "Flux3Transformer2DModel", parameters, 320, steps, cli_steps=28, rows=1, image_tokens=4096,
        ratio=(0.5, 0.6),
    )  # fmt: skip
    assert report["cache_passes"] == passes


@pytest.mark.slow
@pytest.mark.parametrize("how", ["whole", "blocks"])
def test_compiled_pruning_has_no_graph_breaks_and_a_second_generation_compiles_nothing(how: str) -> None:
    """``transformer.compile(fullgraph=True)`` or its repeated blocks compiled, after pruning is applied:
    any graph break raises; whole, one graph per kind of step (full, fill, pruned) for both of the
    guider's passes, with a reference image."""
    torch._dynamo.reset()
    pipe, prompts = pipe_of("base"), prompts_for(2, "base", reference=True)
    apply_cat_pruning(pipe, CONFIG)
    assert_compiles_once(pipe, lambda pipe: generate(pipe, prompts, latents(2)), how)
