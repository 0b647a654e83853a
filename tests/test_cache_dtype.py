"""``cache_dtype``: the K/V caches kept in bfloat16, float16 or float8 while the model computes in its own
dtype. The default keeps today's caches bit for bit; a recomputed token attends with its exact K/V, so keep
1.0 is exact in any storage dtype; the stale tokens' rounding costs a small share of pruning's own error.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from conftest import sd3_pipeline, sd3_prompts, seeded_latents, tiny_sd3, tiny_wan, wan_pipeline

from catprune import CATPruningConfig, apply_cat_pruning, remove_cat_pruning
from catprune.config import CACHE_DTYPES
from catprune.formatting import format_count

STEPS = 8
START = 3
PRUNED = CATPruningConfig(keep_ratio=0.3, start_step=START)
STORED = ("bfloat16", "float16", "float8_e4m3fn")


def generate(pipe: Any) -> torch.Tensor:
    """Two prompts under CFG as one batch (SD3: the text rows trail the image rows in every cache)."""
    return pipe(
        height=128,
        width=128,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        latents=seeded_latents(2),
        output_type="latent",
        **sd3_prompts(2),
    ).images


def pruned(pipe: Any, **options: Any) -> torch.Tensor:
    """A pruned generation under ``PRUNED`` with ``options``; pruning removed after it."""
    apply_cat_pruning(pipe, CATPruningConfig(keep_ratio=0.3, start_step=START, **options))
    try:
        return generate(pipe)
    finally:
        remove_cat_pruning(pipe)


@pytest.fixture(scope="module")
def pipe() -> Any:
    return sd3_pipeline(tiny_sd3())


def test_the_default_keeps_the_computed_kv_bit_for_bit(pipe: Any) -> None:
    """No cache dtype (and the model's own, float32) keep the K/V as computed, in the cache's tensors
    themselves: the same generation bit for bit."""
    default = pruned(pipe)
    assert torch.equal(pruned(pipe, cache_dtype="float32"), default)
    state = apply_cat_pruning(pipe, PRUNED)
    generate(pipe)
    cache = state.processors[0].caches[(None, 0)]
    assert cache.key.dtype == torch.float32 and cache.scales is None
    assert cache.attention_inputs(None) == (cache.key, cache.value)
    remove_cat_pruning(pipe)


@pytest.mark.parametrize(("dtype", "size"), [("bfloat16", 2), ("float16", 2), ("float8_e4m3fn", 1)])
def test_the_caches_are_kept_in_the_chosen_dtype_at_its_size(pipe: Any, dtype: str, size: int) -> None:
    """bfloat16 and float16 halve a float32 model's K/V caches, float8 quarters them (plus one float32
    scale per token and layer: 1 / (heads x head_dim) of the float32 size)."""
    caches = []
    for name in (None, dtype):
        state = apply_cat_pruning(pipe, CATPruningConfig(keep_ratio=0.3, start_step=START, cache_dtype=name))
        generate(pipe)
        caches.append(state.processors[0].caches[(None, 0)])
        remove_cat_pruning(pipe)
    full, stored = caches
    assert stored.key.dtype == stored.value.dtype == getattr(torch, dtype)
    assert stored.key.shape == full.key.shape
    kv_bytes = full.key.numel() * 4 * 2
    scales = 2 * full.key.shape[0] * full.key.shape[1] * 4 if size == 1 else 0
    assert (full.nbytes(), stored.nbytes()) == (kv_bytes, kv_bytes * size // 4 + scales)


@pytest.mark.parametrize("dtype", STORED)
def test_keep_ratio_one_is_exact_with_any_cache_dtype(pipe: Any, dtype: str) -> None:
    """Every token recomputed: each attends over this step's K/V as computed, none read back rounded."""
    reference = generate(pipe)
    state = apply_cat_pruning(pipe, CATPruningConfig(keep_ratio=1.0, start_step=START, cache_dtype=dtype))
    torch.testing.assert_close(generate(pipe), reference, atol=1e-5, rtol=0)
    assert state.stats.pruned_steps == STEPS - START
    remove_cat_pruning(pipe)


def test_a_bfloat16_cache_costs_a_small_share_of_prunings_own_error(pipe: Any) -> None:
    """bfloat16 rounds each stale K/V value by at most 2^-9 (0.2%) of it, where pruning itself reuses
    values a few steps old; so the bfloat16 cache's distance from the float32 cache is under 1% of
    pruning's distance from the unpruned generation (measured: 0.06%). float16 (2^-12) lies closer, float8
    (2^-4, scaled per token) further (measured: 0.8%), under 10%. A cache read back unscaled or in the
    wrong rows lands at pruning's own error or beyond."""
    unpruned = generate(pipe)
    exact = pruned(pipe)
    pruning = (exact - unpruned).norm()
    distance = {dtype: (pruned(pipe, cache_dtype=dtype) - exact).norm() / pruning for dtype in STORED}
    assert 0 < distance["float16"] < distance["bfloat16"] < 0.01
    assert distance["bfloat16"] < distance["float8_e4m3fn"] < 0.1


def test_the_cache_size_is_logged_in_the_chosen_dtype(caplog: pytest.LogCaptureFixture) -> None:
    pipe = wan_pipeline(tiny_wan())
    apply_cat_pruning(pipe, CATPruningConfig(keep_ratio=0.3, start_step=3, cache_dtype="bfloat16"))
    with caplog.at_level(logging.INFO, logger="catprune"):
        pipe(
            prompt_embeds=torch.randn(1, 8, 32),
            guidance_scale=1.0,
            height=64,
            width=64,
            num_frames=5,
            num_inference_steps=4,
            output_type="latent",
        )
    size = 2 * 1 * 32 * 24 * 2 * 2  # (K, V) x rows x tokens x width x layers x bfloat16
    assert [r.getMessage() for r in caplog.records if "K/V caches" in r.getMessage()] == [
        f"CAT pruning: the K/V caches take about {format_count(size, 'B')} per pass (2 layers)"
    ]


def test_an_unknown_cache_dtype_is_refused_naming_the_choices() -> None:
    with pytest.raises(
        ValueError, match=r"cache_dtype must be None \(the model's dtype\) or one of 'float32'"
    ):
        CATPruningConfig(cache_dtype="fp8")
    with pytest.raises(ValueError, match="cannot be combined with kv_extrapolation 'linear'"):
        CATPruningConfig(cache_dtype="bfloat16", kv_extrapolation="linear")
    assert all(getattr(torch, name).is_floating_point for name in CACHE_DTYPES)
