"""The mechanism's public surface: observers, the plain "no pruning" config, and the adapter registry."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from conftest import sd3_pipeline, sd3_prompts, seeded_latents, tiny_sd3
from test_pipelines import CASES, CONFIG, START, STEPS, generate, record_indices

from catprune import CATPruningConfig, apply_cat_pruning
from catprune.adapters import ADAPTERS, ModelAdapter, PruningAdapter, SD3Adapter, register_adapter
from catprune.engine import StepMode, StepRecord
from catprune.strategies import TokenSelector


@pytest.mark.parametrize("case_name", ["sd3", "pixart-sigma"])
def test_observers_get_one_record_per_step_with_what_pruning_did(case_name: str) -> None:
    case = CASES[case_name]
    pipe = case.make_pipeline()
    indices = record_indices(pipe)
    state = apply_cat_pruning(pipe, CONFIG)
    records: list[StepRecord] = []
    remove = state.add_observer(records.append)
    generate(pipe, case, case.prompts(2), seeded_latents(2))

    modes = [StepMode.FULL] * (START - 1) + [StepMode.FILL] + [StepMode.PRUNED] * (STEPS - START)
    assert [record.step for record in records] == list(range(STEPS))
    assert [record.mode for record in records] == modes
    grid = (records[0].height, records[0].width)
    assert grid == (8, 8)
    for record, step_indices in zip(records[START:], indices, strict=True):
        assert torch.equal(record.indices, step_indices[2:])  # the conditional rows, one per prompt
        assert record.noise.shape[:2] == (2, 64)
    assert all(record.indices is None for record in records[:START])
    assert records[START - 2].reference is not None and records[START - 3].reference is None
    assert records[START].cluster_labels.shape == (2, 64) and records[START - 1].cluster_labels is None

    remove()
    generate(pipe, case, case.prompts(1), seeded_latents(1))
    assert len(records) == STEPS


def test_the_unpruned_config_runs_the_unpatched_model_and_counts_macs() -> None:
    case = CASES["sd3"]
    pipe = case.make_pipeline()
    prompts, latents = case.prompts(1), seeded_latents(1)
    reference = generate(pipe, case, prompts, latents)
    state = apply_cat_pruning(pipe, CATPruningConfig.unpruned())
    assert torch.equal(generate(pipe, case, prompts, latents), reference)
    stats = state.stats
    assert (stats.steps, stats.pruned_steps) == (STEPS, 0)
    assert stats.macs == stats.full_macs > 0


def test_an_unknown_strategy_is_refused_where_strategies_are_looked_up_with_the_valid_names() -> None:
    """The config knows no strategies (the core's layers import downward only); applying looks them up."""
    config = CATPruningConfig(strategy="best")
    transformer = tiny_sd3()
    processors = dict(transformer.attn_processors)
    with pytest.raises(ValueError, match=r"unknown token-choice strategy 'best'; known: .*at-edm.*cat"):
        apply_cat_pruning(transformer, config)
    assert not hasattr(transformer, "_catprune_engine") and transformer.attn_processors == processors
    with pytest.raises(ValueError, match=r"unknown token-choice strategy 'best'; known: .*at-edm.*cat"):
        TokenSelector(config)


def test_an_incomplete_adapter_is_refused_at_registration_naming_what_is_missing() -> None:
    class Bare(PruningAdapter):
        family = "bare"
        model_class = torch.nn.Linear
        scatter_point = "proj_out"

    with pytest.raises(TypeError) as error:
        register_adapter(Bare)
    message = str(error.value)
    assert message.startswith(
        "adapter Bare does not define attribute gather_point, attribute token_arguments"
    )
    assert "method token_grid()" in message and "method attention_processors()" in message
    assert "scatter_point" not in message and "bare" not in ADAPTERS
    assert "vae_config" not in message and "block_macs" not in message  # optional parts not declared

    class Declared(ModelAdapter):  # all three parts declared: each is checked
        family = "declared"
        model_class = torch.nn.Linear

    with pytest.raises(TypeError) as error:
        register_adapter(Declared)
    message = str(error.value)
    assert "attribute gather_point" in message and "attribute blocks" in message
    assert "attribute vae_config" in message and "method block_macs()" in message
    assert "method conditioning()" in message and "declared" not in ADAPTERS


def test_a_second_adapter_for_a_family_is_refused() -> None:
    class AnotherSD3(SD3Adapter):
        pass

    with pytest.raises(ValueError, match="family 'sd3' is already registered"):
        register_adapter(AnotherSD3)
    assert isinstance(ADAPTERS["sd3"], SD3Adapter) and type(ADAPTERS["sd3"]) is SD3Adapter


def test_records_are_built_without_host_reads_on_the_meta_device() -> None:
    with torch.device("meta"):
        transformer = tiny_sd3()
    state = apply_cat_pruning(transformer, CATPruningConfig(start_step=2, row_pairing="cfg"))
    records: list[StepRecord] = []
    state.add_observer(records.append)
    state.begin_generation()
    inputs = {
        "encoder_hidden_states": torch.empty(4, 7, 32, device="meta"),
        "pooled_projections": torch.empty(4, 16, device="meta"),
    }
    with torch.no_grad():
        for step in range(4):
            transformer(
                torch.empty(4, 4, 16, 16, device="meta"),
                timestep=torch.full((4,), 900.0 - step, device="meta"),
                **inputs,
            )
    assert [record.mode for record in records] == [
        StepMode.FULL,
        StepMode.FILL,
        StepMode.PRUNED,
        StepMode.PRUNED,
    ]
    assert records[-1].indices.shape == (2, round(0.3 * 64)) and records[-1].noise.device.type == "meta"


def catprune_warnings(run: Callable[[], object]) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    return [str(warning.message) for warning in caught if "CAT pruning" in str(warning.message)]


@pytest.mark.parametrize("case_name", ["sd3", "pixart-sigma"])
def test_a_generation_too_short_to_prune_is_warned_about_once(case_name: str) -> None:
    case = CASES[case_name]
    pipe = case.make_pipeline()
    state = apply_cat_pruning(pipe, CATPruningConfig(start_step=STEPS))
    prompts, latents = case.prompts(1), seeded_latents(1)
    with pytest.warns(UserWarning, match=f"{STEPS} steps never reaches start_step {STEPS}"):
        generate(pipe, case, prompts, latents)
    assert (state.stats.steps, state.stats.pruned_steps) == (STEPS, 0)
    assert not catprune_warnings(lambda: generate(pipe, case, prompts, latents))  # said once


def test_a_generation_that_prunes_is_not_warned_about() -> None:
    case = CASES["sd3"]
    pipe = case.make_pipeline()
    apply_cat_pruning(pipe, CONFIG)
    assert not catprune_warnings(lambda: generate(pipe, case, case.prompts(1), seeded_latents(1)))


def test_kept_tokens_rounded_up_to_a_multiple_for_gpu_kernels() -> None:
    config = CATPruningConfig(kept_multiple=64)
    assert (config.num_kept(4096), config.num_kept(100), config.num_kept(50)) == (1280, 64, 50)
    assert CATPruningConfig().num_kept(4096) == 1229
    with pytest.raises(ValueError, match="kept_multiple"):
        CATPruningConfig(kept_multiple=0)
    pipe = sd3_pipeline(tiny_sd3())
    state = apply_cat_pruning(pipe, CATPruningConfig(start_step=2, kept_multiple=8))
    pipe(height=128, width=128, num_inference_steps=4, output_type="latent", **sd3_prompts(1))
    assert state.indices.shape == (2, 24) and state.stats.kept_tokens == 24  # round(0.3 * 64) = 19 -> 24
