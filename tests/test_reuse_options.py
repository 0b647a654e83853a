"""Options beyond the paper for what pruned steps reuse: K/V and output extrapolation, refresh steps.

At keep 1.0 every option is the identity; a refresh step is the unpatched step; the extrapolation is exact
for values linear in time; none of them reads the host inside a pruned step (meta device).
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from conftest import (
    TEXT_DIM,
    TEXT_TOKENS,
    pixart_pipeline,
    pixart_prompts,
    sd3_pipeline,
    sd3_prompts,
    seeded_latents,
    tiny_pixart,
    tiny_sd3,
)

from catprune import CATPruningConfig, apply_cat_pruning, remove_cat_pruning
from catprune.engine import KVCache, StepMode, TokenHistory

STEPS = 8
START = 3
OPTIONS = {
    "kv-extrapolation": {"kv_extrapolation": "linear"},
    "output-extrapolation": {"output_extrapolation": "linear"},
    "refresh-last": {"refresh_steps": (-1,)},
    "all": {"kv_extrapolation": "linear", "output_extrapolation": "linear", "refresh_steps": (5, -1)},
    "kv-quadratic": {"kv_extrapolation": "quadratic"},
    "output-quadratic": {"output_extrapolation": "quadratic"},
    "rows-extrapolated": {"strategy": "rows", "kv_extrapolation": "linear", "refresh_steps": (-1,)},
}
CASES = {
    "sd3": (lambda: sd3_pipeline(tiny_sd3()), sd3_prompts, {}),
    "pixart": (lambda: pixart_pipeline(tiny_pixart()), pixart_prompts, {"use_resolution_binning": False}),
}


def generate(case: str, pipe: Any = None) -> tuple[Any, torch.Tensor]:
    make, prompts, extra = CASES[case]
    pipe = pipe or make()
    latents = pipe(
        height=128,
        width=128,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        latents=seeded_latents(2),
        output_type="latent",
        **prompts(2),
        **extra,
    ).images
    return pipe, latents


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("option", list(OPTIONS))
def test_each_option_at_keep_ratio_one_is_the_identity(case: str, option: str) -> None:
    pipe, reference = generate(case)
    state = apply_cat_pruning(pipe, CATPruningConfig(keep_ratio=1.0, start_step=START, **OPTIONS[option]))
    torch.testing.assert_close(generate(case, pipe)[1], reference, atol=1e-5, rtol=0)
    assert state.stats.pruned_steps == STEPS - START - len(OPTIONS[option].get("refresh_steps", ()))


@pytest.mark.parametrize("option", list(OPTIONS))
def test_each_option_changes_a_pruned_generation(option: str) -> None:
    pipe = sd3_pipeline(tiny_sd3())
    apply_cat_pruning(pipe, CATPruningConfig(keep_ratio=0.3, start_step=START))
    plain = generate("sd3", pipe)[1]
    remove_cat_pruning(pipe)
    apply_cat_pruning(pipe, CATPruningConfig(keep_ratio=0.3, start_step=START, **OPTIONS[option]))
    assert not torch.allclose(generate("sd3", pipe)[1], plain, atol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_a_refresh_step_is_the_unpruned_step_bit_for_bit(case: str) -> None:
    """Step 5 of a pruned generation (pruned steps before and after it) computes exactly what the unpatched
    transformer computes from the same inputs, and refreshes every cache."""
    make = CASES[case][0]
    pipe = make()
    state = apply_cat_pruning(pipe, CATPruningConfig(keep_ratio=0.3, start_step=START, refresh_steps=(5,)))
    seen: dict[str, Any] = {}
    modes: list[StepMode] = []

    def before(module: torch.nn.Module, args: Any, kwargs: Any) -> None:
        if state.context.step == 5:
            seen["inputs"] = (args, {k: v for k, v in kwargs.items()})

    def after(module: torch.nn.Module, args: Any, output: Any) -> None:
        modes.append(state.context.mode)
        if state.context.step == 5:
            seen["output"] = output[0].clone()

    handles = [
        pipe.transformer.register_forward_pre_hook(before, with_kwargs=True),
        pipe.transformer.register_forward_hook(after),
    ]
    generate(case, pipe)
    for handle in handles:
        handle.remove()
    assert modes[START - 1 :] == [StepMode.FILL, StepMode.PRUNED, StepMode.PRUNED, StepMode.FILL] + [
        StepMode.PRUNED
    ] * (STEPS - 6)
    remove_cat_pruning(pipe)
    args, kwargs = seen["inputs"]
    with torch.no_grad():
        unpruned = pipe.transformer(*args, **kwargs)[0]
    assert torch.equal(unpruned, seen["output"])


def linear_in_time(time: float, shape: tuple[int, ...]) -> torch.Tensor:
    """Values A + t B, the same A and B at every call."""
    generator = torch.Generator().manual_seed(3)
    start, slope = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    return start + time * slope


def test_kv_extrapolation_is_exact_for_keys_and_values_linear_in_time() -> None:
    """Tokens computed at different times (each at least twice) are moved to the current time exactly;
    the text rows and the stored cache are untouched."""
    rows, tokens, text, heads, dim = 2, 12, 3, 2, 4
    cache = KVCache(extrapolate=True)

    def at(time: float) -> torch.Tensor:
        return linear_in_time(time, (rows, tokens, heads, dim))

    def times(value: float) -> torch.Tensor:
        return torch.full((rows,), value)

    text_key = torch.randn(rows, text, heads, dim)
    sequence = torch.cat([torch.randn(rows, text, heads, dim), at(1.0)], dim=1)  # [text, image]
    cache.fill(sequence, sequence + 1, image_start=text, num_image=tokens, time=times(1.0))
    cache.write(0, text_key, text_key)
    first = torch.stack([torch.randperm(tokens)[:6] for _ in range(rows)])  # (B, 6) each row its own
    second = torch.stack([torch.tensor([t for t in range(tokens) if t not in row]) for row in first])
    for indices, time in ((first, 0.8), (second, 0.6)):
        index = indices[:, :, None, None].expand(-1, -1, heads, dim)
        cache.update(indices, at(time).gather(1, index), (at(time) + 1).gather(1, index), times(time))
    key, value = cache.attention_inputs(times(0.3))
    torch.testing.assert_close(key[:, text:], at(0.3), atol=1e-5, rtol=0)
    torch.testing.assert_close(value[:, text:], at(0.3) + 1, atol=1e-5, rtol=0)
    assert torch.equal(key[:, :text], text_key)
    stored = cache.image_rows(cache.key)
    assert not torch.allclose(stored, at(0.3))  # the cache keeps the values as computed


def test_a_token_computed_once_is_not_extrapolated_and_a_recomputed_one_is_exact() -> None:
    history = TokenHistory()
    values = linear_in_time(1.0, (1, 4, 3))
    history.record_all(None, torch.tensor([1.0]), values)
    later = values.clone()
    history.record(later, torch.tensor([[0, 1]]), torch.tensor([0.5]))
    later[:, :2] = linear_in_time(0.5, (1, 4, 3))[:, :2]
    moved = history.extrapolate(later, torch.tensor([0.5]))
    assert torch.equal(moved, later)  # tokens 0, 1 computed now; 2, 3 computed once: as they are
    moved = history.extrapolate(later, torch.tensor([0.2]))
    torch.testing.assert_close(moved[:, :2], linear_in_time(0.2, (1, 4, 3))[:, :2], atol=1e-6, rtol=0)
    assert torch.equal(moved[:, 2:], later[:, 2:])


def quadratic_in_time(time: float, shape: tuple[int, ...]) -> torch.Tensor:
    """Values A + t B + t^2 C, the same A, B and C at every call."""
    generator = torch.Generator().manual_seed(4)
    a, b, c = (torch.randn(shape, generator=generator) for _ in range(3))
    return a + time * b + time**2 * c


def test_quadratic_kv_extrapolation_is_exact_for_values_quadratic_in_time() -> None:
    """Tokens computed three times, each at its own times (unequal spans), are moved exactly; tokens
    computed twice only are moved along their line, and the linear option misses the curvature."""
    rows, tokens, heads, dim = 2, 8, 2, 4

    def at(time: float) -> torch.Tensor:
        return quadratic_in_time(time, (rows, tokens, heads, dim))

    def times(value: float) -> torch.Tensor:
        return torch.full((rows,), value)

    caches = {order: KVCache(extrapolate=order) for order in (1, 2)}
    first = torch.stack([torch.randperm(tokens)[:4] for _ in range(rows)])  # (B, 4)
    rest = torch.stack([torch.tensor([t for t in range(tokens) if t not in row]) for row in first])
    everyone = torch.arange(tokens).expand(rows, -1)
    for cache in caches.values():
        cache.fill(at(1.0), at(1.0) + 1, image_start=0, num_image=tokens, time=times(1.0))
        for indices, time in ((everyone, 0.9), (first, 0.75), (rest, 0.6), (first, 0.5)):
            index = indices[:, :, None, None].expand(-1, -1, heads, dim)
            cache.update(indices, at(time).gather(1, index), (at(time) + 1).gather(1, index), times(time))
    key, value = caches[2].attention_inputs(times(0.3))
    index = first[:, :, None, None].expand(-1, -1, heads, dim)
    torch.testing.assert_close(key.gather(1, index), at(0.3).gather(1, index), atol=1e-5, rtol=0)
    torch.testing.assert_close(value, at(0.3) + 1, atol=1e-5, rtol=0)
    linear_key = caches[1].attention_inputs(times(0.3))[0]
    assert not torch.allclose(linear_key, at(0.3), atol=1e-3)


def test_quadratic_history_with_two_computations_is_the_line_and_with_one_the_value() -> None:
    quadratic, linear = TokenHistory(order=2), TokenHistory()
    values = linear_in_time(1.0, (1, 4, 3))
    for history in (quadratic, linear):
        history.record_all(None, torch.tensor([1.0]), values)
    later = values.clone()
    for history in (quadratic, linear):
        history.record(later, torch.tensor([[0, 1]]), torch.tensor([0.5]))
    later[:, :2] = linear_in_time(0.5, (1, 4, 3))[:, :2]
    time = torch.tensor([0.2])
    assert torch.equal(quadratic.extrapolate(later, time), linear.extrapolate(later, time))


def test_the_options_run_on_the_meta_device() -> None:
    """No host reads or data-dependent shapes in pruned steps with every option on."""
    with torch.device("meta"):
        transformer = tiny_sd3()
    config = CATPruningConfig(
        start_step=2,
        kv_extrapolation="linear",
        output_extrapolation="quadratic",
        refresh_steps=(4, -1),
        skip_every=2,
    )
    state = apply_cat_pruning(transformer, config)
    state.begin_generation(steps=6)
    with torch.device("meta"):
        inputs = {
            "encoder_hidden_states": torch.empty(2, TEXT_TOKENS, TEXT_DIM),
            "pooled_projections": torch.empty(2, 16),
        }
        latents = torch.empty(2, 4, 16, 16)
    modes = []
    with torch.no_grad():
        for step in range(6):
            transformer(latents, timestep=torch.full((2,), 900.0 - step, device="meta"), **inputs)
            modes.append(state.mode)
    assert modes == [
        StepMode.FULL,
        StepMode.FILL,
        StepMode.PRUNED,
        StepMode.PRUNED,
        StepMode.FILL,
        StepMode.FILL,
    ]
    assert (
        state.processors[0].cache_bytes()
        == 4 * 2 * (64 + TEXT_TOKENS) * 32 * 4 - 2 * 2 * TEXT_TOKENS * 32 * 4
    )


def test_refresh_steps_from_the_end_need_the_number_of_steps_and_say_so_once() -> None:
    transformer = tiny_sd3()
    state = apply_cat_pruning(transformer, CATPruningConfig(start_step=2, refresh_steps=(-1,)))
    inputs = {
        "encoder_hidden_states": torch.randn(1, TEXT_TOKENS, TEXT_DIM),
        "pooled_projections": torch.randn(1, 16),
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            state.begin_generation()
            with torch.no_grad():
                for step in range(4):
                    transformer(seeded_latents(1), timestep=torch.tensor([900.0 - step]), **inputs)
    assert len([w for w in caught if "refresh_steps" in str(w.message)]) == 1
    assert state.stats.pruned_steps == 2


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("kv_extrapolation", "cubic"),
        ("output_extrapolation", "yes"),
        ("refresh_steps", (1.5,)),
        ("skip_every", 1),
    ],
)
def test_bad_option_values_are_refused_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        CATPruningConfig(**{field: value})


def test_refresh_steps_given_as_a_list_become_a_tuple() -> None:
    assert CATPruningConfig(refresh_steps=[4, -1]).refresh_steps == (4, -1)


def test_the_extrapolated_preset_is_the_frontier_s_winning_setting() -> None:
    config = CATPruningConfig.extrapolated()
    assert (config.keep_ratio, config.start_step, config.kv_extrapolation, config.refresh_steps) == (
        0.5,
        5,
        "linear",
        (-1,),
    )
    assert (config.output_extrapolation, config.strategy) == ("none", "cat")


def test_the_multistep_preset_is_the_frontier_s_winning_setting_on_a_second_order_solver() -> None:
    config = CATPruningConfig.multistep()
    assert (config.keep_ratio, config.start_step, config.strategy) == (0.7, 4, "rows")
    assert (config.kv_extrapolation, config.output_extrapolation, config.refresh_steps) == (
        "linear",
        "none",
        (-1,),
    )


@pytest.mark.parametrize("case", list(CASES))
def test_a_skipped_step_recomputes_no_image_token_and_returns_the_last_outputs(case: str) -> None:
    """``skip_every=2``: pruned steps 4 and 6 (t0 = 3) run the blocks on no image token and return the
    previous step's outputs bit for bit (no output extrapolation); they cost less than a pruned step."""
    make = CASES[case][0]
    pipe = make()
    config = CATPruningConfig(keep_ratio=0.3, start_step=START, skip_every=2)
    state = apply_cat_pruning(pipe, config)
    outputs: dict[int, torch.Tensor] = {}
    image_tokens: dict[int, int] = {}

    addresses: set[int] = set()

    def after(module: torch.nn.Module, args: Any, output: Any) -> None:
        outputs[state.context.step] = output[0].clone()
        if state.context.mode is StepMode.PRUNED and state.context.num_kept:
            addresses.add(state.context.indices.data_ptr())  # the pruned steps' one index buffer

    def block(module: torch.nn.Module, args: Any, kwargs: Any) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        image_tokens[state.context.step] = hidden.shape[1]

    first_block = pipe.transformer.transformer_blocks[0]
    handles = [
        pipe.transformer.register_forward_hook(after),
        first_block.register_forward_pre_hook(block, with_kwargs=True),
    ]
    generate(case, pipe)
    for handle in handles:
        handle.remove()
    kept = config.num_kept(64)
    assert [image_tokens[step] for step in range(START, STEPS)] == [kept, 0, kept, 0, kept]
    for step in (4, 6):
        assert torch.equal(outputs[step], outputs[step - 1])
    assert not torch.equal(outputs[5], outputs[4])
    assert (state.stats.pruned_steps, state.stats.skipped_steps, state.stats.kept_tokens) == (5, 2, kept)
    assert len(addresses) == 1, "a skipped step moved the pruned steps' index buffer"
    skipping = state.stats.macs
    remove_cat_pruning(pipe)
    state = apply_cat_pruning(pipe, CATPruningConfig(keep_ratio=0.3, start_step=START))
    generate(case, pipe)
    assert skipping < state.stats.macs


def test_skip_every_counts_pruned_steps_and_never_skips_a_refresh_step() -> None:
    config = CATPruningConfig(start_step=4, skip_every=3, refresh_steps=(9,))
    assert [step for step in range(12) if config.skips(step)] == [6, 9]  # 9 is a refresh step: full
    pipe = sd3_pipeline(tiny_sd3())
    config = CATPruningConfig(keep_ratio=0.3, start_step=START, skip_every=2, refresh_steps=(4,))
    state = apply_cat_pruning(pipe, config)
    generate("sd3", pipe)
    assert (state.stats.pruned_steps, state.stats.skipped_steps) == (
        4,
        1,
    )  # 3, 5, 6, 7 pruned; 4 refreshes, 6 skipped
