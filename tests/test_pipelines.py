"""CAT pruning on real diffusers pipelines and transformers (tiny random-weight configs, CPU).

Every behaviour is checked on SD3, SD3.5 (dual attention + RMS qk-norm), PixArt-Sigma (learned sigma,
masked cross-attention) and PixArt-alpha (resolution conditioning): they share one mechanism.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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
)

from catprune import CATPruningConfig, apply_cat_pruning, remove_cat_pruning
from catprune.engine import StepMode

STEPS = 6
START = 3
CONFIG = CATPruningConfig(keep_ratio=0.3, start_step=START)


@dataclass
class Case:
    make_pipeline: Callable[[], Any]
    prompts: Callable[..., dict[str, torch.Tensor]]
    extra: dict[str, Any]

    def slice_prompts(self, prompts: dict[str, Any], index: int) -> dict[str, Any]:
        return {k: v[index : index + 1] if isinstance(v, torch.Tensor) else v for k, v in prompts.items()}


CASES = {
    "sd3": Case(lambda: sd3_pipeline(tiny_sd3()), sd3_prompts, {}),
    "sd3.5": Case(lambda: sd3_pipeline(tiny_sd3(sd35=True)), sd3_prompts, {}),
    "pixart-sigma": Case(
        lambda: pixart_pipeline(tiny_pixart()), pixart_prompts, {"use_resolution_binning": False}
    ),
    "pixart-alpha": Case(
        lambda: pixart_pipeline(tiny_pixart(additional_conditions=True), alpha=True),
        pixart_prompts,
        {"use_resolution_binning": False},
    ),
}


@pytest.fixture(params=list(CASES))
def case(request: pytest.FixtureRequest) -> Case:
    return CASES[request.param]


def generate(
    pipe: Any,
    case: Case,
    prompts: dict[str, Any],
    latents: torch.Tensor,
    guidance: float = 5.0,
    size: int = 128,
) -> torch.Tensor:
    """Final latents of a ``STEPS``-step generation."""
    return pipe(
        height=size,
        width=size,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        latents=latents,
        output_type="latent",
        **prompts,
        **case.extra,
    ).images


def record_outputs(pipe: Any) -> list[torch.Tensor]:
    """The transformer's output at every step, in order."""
    seen: list[torch.Tensor] = []
    pipe.transformer.register_forward_hook(lambda module, args, output: seen.append(output[0].clone()))
    return seen


def record_indices(pipe: Any) -> list[torch.Tensor]:
    """The token indices of every pruned transformer call, in order."""
    seen: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        state = module._catprune_engine
        if state.mode is StepMode.PRUNED:
            seen.append(state.indices.clone())

    pipe.transformer.register_forward_hook(hook)
    return seen


def test_keep_ratio_one_equals_the_unpatched_pipeline(case: Case) -> None:
    pipe = case.make_pipeline()
    prompts, latents = case.prompts(2), seeded_latents(2)
    reference = generate(pipe, case, prompts, latents)
    state = apply_cat_pruning(pipe, CATPruningConfig(keep_ratio=1.0, start_step=START))
    pruned = generate(pipe, case, prompts, latents)
    assert state.stats.pruned_steps == STEPS - START
    torch.testing.assert_close(pruned, reference, atol=1e-5, rtol=0)


def test_steps_before_start_step_are_identical_and_later_steps_are_pruned(case: Case) -> None:
    pipe = case.make_pipeline()
    prompts, latents = case.prompts(1), seeded_latents(1)
    reference_steps = record_outputs(pipe)
    generate(pipe, case, prompts, latents)
    pipe = case.make_pipeline()
    pruned_steps = record_outputs(pipe)
    state = apply_cat_pruning(pipe, CONFIG)
    generate(pipe, case, prompts, latents)
    assert len(pruned_steps) == len(reference_steps) == STEPS
    for step in range(START):
        assert torch.equal(pruned_steps[step], reference_steps[step]), f"step {step} differs"
    assert not torch.allclose(pruned_steps[-1], reference_steps[-1], atol=1e-4)
    stats = state.stats
    num_tokens = (128 // 8 // 2) ** 2
    assert (stats.steps, stats.pruned_steps) == (STEPS, STEPS - START)
    assert (stats.image_tokens, stats.kept_tokens) == (num_tokens, round(0.3 * num_tokens))
    assert 0.3 < stats.macs_fraction < 1.0


def test_remove_restores_the_original_bit_for_bit(case: Case) -> None:
    pipe = case.make_pipeline()
    prompts, latents = case.prompts(2), seeded_latents(2)
    processors = {
        name: module.processor
        for name, module in pipe.transformer.named_modules()
        if hasattr(module, "processor")
    }
    reference = generate(pipe, case, prompts, latents)
    apply_cat_pruning(pipe, CONFIG)
    generate(pipe, case, prompts, latents)
    remove_cat_pruning(pipe)
    assert torch.equal(generate(pipe, case, prompts, latents), reference)
    for name, module in pipe.transformer.named_modules():
        if hasattr(module, "processor"):
            assert module.processor is processors[name]
    assert "encode_prompt" not in pipe.__dict__


def test_batched_prompts_equal_each_prompt_alone(case: Case) -> None:
    pipe = case.make_pipeline()
    apply_cat_pruning(pipe, CONFIG)
    prompts = case.prompts(2)
    batched = generate(pipe, case, prompts, seeded_latents(2))
    # float32 rounding between batch sizes grows with the latents' magnitude (the random PixArt weights drive
    # them to ~700; the unpatched pipeline itself then differs by ~4e-4 between batched and alone).
    tolerance = 1e-5 * (1.0 + float(batched.abs().max()))
    for index in range(2):
        alone = generate(pipe, case, case.slice_prompts(prompts, index), seeded_latents(1, seed=index))
        torch.testing.assert_close(batched[index : index + 1], alone, atol=tolerance, rtol=0)


def test_cfg_rows_of_a_prompt_share_indices_and_prompts_get_their_own(case: Case) -> None:
    pipe = case.make_pipeline()
    apply_cat_pruning(pipe, CONFIG)
    seen = record_indices(pipe)
    generate(pipe, case, case.prompts(2), seeded_latents(2))
    num_tokens = 64
    assert len(seen) == STEPS - START
    for indices in seen:
        assert indices.shape == (4, round(0.3 * num_tokens))  # [uncond 0, uncond 1, cond 0, cond 1]
        assert torch.equal(indices[:2], indices[2:])
        assert all(len(set(row.tolist())) == indices.shape[1] for row in indices)
    assert any(not torch.equal(indices[0], indices[1]) for indices in seen)


def test_without_cfg_each_row_is_its_own_prompt(case: Case) -> None:
    pipe = case.make_pipeline()
    apply_cat_pruning(pipe, CONFIG)
    seen = record_indices(pipe)
    generate(pipe, case, case.prompts(2), seeded_latents(2), guidance=1.0)
    assert len(seen) == STEPS - START
    assert all(indices.shape[0] == 2 for indices in seen)


def test_resolution_and_batch_can_change_between_generations(case: Case) -> None:
    pipe = case.make_pipeline()
    apply_cat_pruning(pipe, CONFIG)
    generate(pipe, case, case.prompts(1), seeded_latents(1))
    after_other_run = generate(pipe, case, case.prompts(3, seed=5), seeded_latents(3, size=12), size=96)
    fresh = case.make_pipeline()
    apply_cat_pruning(fresh, CONFIG)
    torch.testing.assert_close(
        after_other_run, generate(fresh, case, case.prompts(3, seed=5), seeded_latents(3, size=12), size=96)
    )


# --- Driving the transformer directly -------------------------------------------------------------------


def transformer_inputs(case_name: str, batch: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(7)
    if case_name.startswith("sd3"):
        prompts = sd3_prompts(batch)
        return {
            "encoder_hidden_states": prompts["prompt_embeds"],
            "pooled_projections": prompts["pooled_prompt_embeds"],
        }
    prompts = pixart_prompts(batch)
    size = torch.tensor([[128.0, 128.0]] * batch)
    return {
        "encoder_hidden_states": prompts["prompt_embeds"],
        "encoder_attention_mask": prompts["prompt_attention_mask"],
        "added_cond_kwargs": {"resolution": size, "aspect_ratio": torch.ones(batch, 1)},
        "generator_unused": generator,
    }


@pytest.mark.parametrize("case_name", list(CASES))
def test_pruned_step_fed_the_last_full_steps_inputs_returns_its_output(case_name: str) -> None:
    """The caches are exact after the fill step, so this checks the pruned attention, gather and scatter."""
    transformer = CASES[case_name].make_pipeline().transformer
    inputs = transformer_inputs(case_name, batch=2)
    inputs.pop("generator_unused", None)
    state = apply_cat_pruning(transformer, CATPruningConfig(keep_ratio=0.3, start_step=2))
    state.begin_generation()
    latents = seeded_latents(2)
    modes = []
    with torch.no_grad():
        outputs = []
        for timestep in (900.0, 800.0, 800.0):
            outputs.append(transformer(latents, timestep=torch.tensor([timestep] * 2), **inputs).sample)
            modes.append(state.mode)
            latents = latents if timestep == 800.0 else latents - 0.1 * outputs[-1][:, :4]
    assert modes == [StepMode.FULL, StepMode.FILL, StepMode.PRUNED]
    assert state.indices.shape == (2, round(0.3 * 64))
    torch.testing.assert_close(outputs[2], outputs[1], atol=1e-5, rtol=0)


def test_bare_transformer_starts_a_new_generation_when_the_timestep_goes_up() -> None:
    transformer = tiny_sd3()
    inputs = transformer_inputs("sd3", batch=1)
    state = apply_cat_pruning(transformer, CATPruningConfig(start_step=2))

    def denoise() -> torch.Tensor:
        latents = seeded_latents(1)
        with torch.no_grad():
            for timestep in (900.0, 700.0, 500.0, 300.0):
                latents = (
                    latents - 0.2 * transformer(latents, timestep=torch.tensor([timestep]), **inputs).sample
                )
        return latents

    first = denoise()
    assert (state.stats.steps, state.stats.pruned_steps) == (4, 2)
    assert torch.equal(denoise(), first)
    assert (state.stats.steps, state.stats.pruned_steps) == (4, 2)


def test_row_pairing_cfg_on_a_bare_transformer_shares_the_selection() -> None:
    transformer = tiny_sd3()
    inputs = transformer_inputs("sd3", batch=4)
    state = apply_cat_pruning(transformer, CATPruningConfig(start_step=2, row_pairing="cfg"))
    latents = seeded_latents(2).repeat(2, 1, 1, 1)
    with torch.no_grad():
        for timestep in (900.0, 700.0, 500.0):
            latents = (
                latents - 0.2 * transformer(latents, timestep=torch.tensor([timestep] * 4), **inputs).sample
            )
    assert state.mode is StepMode.PRUNED
    assert torch.equal(state.indices[:2], state.indices[2:])


def test_skip_layer_guidance_calls_run_unpruned_and_do_not_count_as_steps() -> None:
    pipe = sd3_pipeline(tiny_sd3())
    state = apply_cat_pruning(pipe, CONFIG)
    calls: list[tuple[bool, StepMode]] = []

    def hook(module: torch.nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        calls.append((kwargs.get("skip_layers") is not None, state.mode))

    pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    pipe(
        height=128,
        width=128,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        latents=seeded_latents(1),
        output_type="latent",
        skip_guidance_layers=[0],
        skip_layer_guidance_start=0.0,
        skip_layer_guidance_stop=1.0,
        **sd3_prompts(1),
    )
    skip_calls = [mode for skipped, mode in calls if skipped]
    assert skip_calls and all(mode is StepMode.FULL for mode in skip_calls)
    assert [mode for skipped, mode in calls if not skipped].count(StepMode.PRUNED) == STEPS - START
    assert (state.stats.steps, state.stats.pruned_steps) == (STEPS, STEPS - START)


@pytest.mark.parametrize("case_name", ["sd3", "pixart-sigma"])
def test_pipeline_loaded_from_a_local_checkpoint(case_name: str, tmp_path: Any) -> None:
    """The real ``from_pretrained`` path, on a tiny checkpoint saved here (no hub access)."""
    case = CASES[case_name]
    original = case.make_pipeline()
    original.save_pretrained(tmp_path, safe_serialization=True)
    absent = {name: None for name, component in original.components.items() if component is None}
    loaded = type(original).from_pretrained(tmp_path, **absent)
    loaded.set_progress_bar_config(disable=True)
    prompts, latents = case.prompts(1), seeded_latents(1)
    apply_cat_pruning(original, CONFIG)
    state = apply_cat_pruning(loaded, CONFIG)
    assert torch.equal(generate(loaded, case, prompts, latents), generate(original, case, prompts, latents))
    assert state.stats.pruned_steps == STEPS - START


def test_cache_memory_is_key_and_value_for_every_token() -> None:
    """Per block and attention: K and V for all image tokens plus (joint attention) the text tokens."""
    pipe = sd3_pipeline(tiny_sd3(sd35=True))
    state = apply_cat_pruning(pipe, CONFIG)
    generate(pipe, CASES["sd3.5"], sd3_prompts(1), seeded_latents(1))
    batch, image, text, width, bytes_per_value = 2, 64, 7, 32, 4
    joint = 2 * 2 * batch * (image + text) * width * bytes_per_value  # two blocks
    dual = 1 * 2 * batch * image * width * bytes_per_value  # SD3.5's image-only attention in block 0
    assert sum(processor.cache_bytes() for processor in state.processors) == joint + dual


def test_released_caches_free_memory_and_the_next_generation_is_unchanged() -> None:
    case = CASES["sd3"]
    pipe = case.make_pipeline()
    state = apply_cat_pruning(pipe, CONFIG)
    first = generate(pipe, case, case.prompts(1), seeded_latents(1))
    macs = state.stats.macs
    state.release_caches()
    assert sum(processor.cache_bytes() for processor in state.processors) == 0
    assert state.stats.macs == macs
    torch.testing.assert_close(
        generate(pipe, case, case.prompts(1), seeded_latents(1)), first, rtol=0, atol=0
    )


@pytest.mark.parametrize(
    ("case_name", "make_transformer"), [("sd3.5", lambda: tiny_sd3(sd35=True)), ("pixart-sigma", tiny_pixart)]
)
def test_pruned_steps_run_on_the_meta_device(case_name: str, make_transformer: Callable) -> None:
    """Meta tensors have shapes but no data: any host read (``.item()``, ``.cpu()``) or data-dependent
    shape in selection, gather, caches or scatter would fail here. This is what torch.compile and CUDA
    graphs need."""
    with torch.device("meta"):
        transformer = make_transformer()
    inputs = transformer_inputs(case_name, batch=4)
    inputs.pop("generator_unused", None)
    inputs = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    if "added_cond_kwargs" in inputs:
        inputs["added_cond_kwargs"] = {k: v.to("meta") for k, v in inputs["added_cond_kwargs"].items()}
    state = apply_cat_pruning(transformer, CATPruningConfig(start_step=2, row_pairing="cfg"))
    state.begin_generation()
    latents = torch.empty(4, 4, 16, 16, device="meta")
    modes = []
    with torch.no_grad():
        for step in range(5):
            output = transformer(
                latents, timestep=torch.full((4,), 900.0 - step, device="meta"), **inputs
            ).sample
            modes.append(state.mode)
    assert modes == [StepMode.FULL, StepMode.FILL, StepMode.PRUNED, StepMode.PRUNED, StepMode.PRUNED]
    assert output.shape[0] == 4 and state.indices.shape == (4, round(0.3 * 64))
