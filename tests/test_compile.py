"""Pruning under regional compilation (each transformer block compiled with ``fullgraph=True``).

The pruning state machine runs in the model's hooks, outside the compiled blocks; inside them the caching
processors must trace without graph breaks, and a second generation of the same batch and resolution
must find every graph already compiled. ``backend="eager"`` checks what dynamo traces (fast); the
inductor test checks the compiled numbers (slow).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import (
    flux_pipeline,
    pixart_pipeline,
    pixart_prompts,
    sd3_pipeline,
    sd3_prompts,
    seeded_latents,
    tiny_flux,
    tiny_pixart,
    tiny_sd3,
)
from torch._dynamo.utils import counters

from catprune import CATPruningConfig, apply_cat_pruning, remove_cat_pruning

CONFIG = CATPruningConfig(keep_ratio=0.3, start_step=3)


def compile_blocks(pipe: Any, backend: str) -> None:
    """diffusers users' regional compilation: the class's repeated blocks where it declares them (Flux),
    else every block (SD3 and PixArt declare none in diffusers 0.42)."""
    transformer = pipe.transformer
    if getattr(transformer, "_repeated_blocks", None):
        transformer.compile_repeated_blocks(fullgraph=True, backend=backend)
        return
    for block in transformer.transformer_blocks:
        block.compile(fullgraph=True, backend=backend)


def latent_case(pipe: Any, **inputs: Any) -> tuple[Any, Callable[[Any], torch.Tensor]]:
    """A pipeline and a 6-step generation of two prompts from fixed latents with ``inputs``."""

    def generate(pipe: Any) -> torch.Tensor:
        return pipe(
            height=128,
            width=128,
            num_inference_steps=6,
            latents=seeded_latents(2),
            output_type="latent",
            **inputs,
        ).images

    return pipe, generate


def sd3_case() -> tuple[Any, Callable[[Any], torch.Tensor]]:
    return latent_case(sd3_pipeline(tiny_sd3()), guidance_scale=5.0, **sd3_prompts(2))


def pixart_case() -> tuple[Any, Callable[[Any], torch.Tensor]]:
    return latent_case(
        pixart_pipeline(tiny_pixart()), guidance_scale=4.5, use_resolution_binning=False, **pixart_prompts(2)
    )


def flux_case() -> tuple[Any, Callable[[Any], torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    embeds, pooled = torch.randn(2, 7, 32, generator=generator), torch.randn(2, 16, generator=generator)

    def generate(pipe: Any) -> torch.Tensor:
        return pipe(
            height=128,
            width=128,
            num_inference_steps=6,
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            negative_prompt_embeds=-embeds,
            negative_pooled_prompt_embeds=-pooled,
            true_cfg_scale=2.0,  # two passes per step, each with its own caches
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        ).images

    return flux_pipeline(tiny_flux()), generate


CASES = {"sd3": sd3_case, "pixart": pixart_case, "flux": flux_case}


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_blocks_trace_without_breaks_and_later_generations_do_not_recompile(case: str) -> None:
    torch._dynamo.reset()
    pipe, generate = CASES[case]()
    apply_cat_pruning(pipe, CONFIG)
    eager = generate(pipe)
    compile_blocks(pipe, backend="eager")
    counters.clear()
    first = generate(pipe)  # fullgraph=True: any graph break raises here
    assert counters["stats"]["unique_graphs"] > 0
    for _ in range(2):
        counters.clear()
        assert torch.equal(generate(pipe), first)
        assert counters["stats"]["unique_graphs"] == 0, "a later generation recompiled"
    torch.testing.assert_close(first, eager, atol=1e-6, rtol=0)


def test_blocks_compiled_before_pruning_is_applied_and_after_it_is_removed() -> None:
    """Compiled first, then pruned: the first pruned generation compiles the pruned paths, later ones
    nothing; removing pruning gives the compiled full model's output back, bit for bit."""
    torch._dynamo.reset()
    pipe, generate = sd3_case()
    compile_blocks(pipe, backend="eager")
    full = generate(pipe)
    apply_cat_pruning(pipe, CONFIG)
    first = generate(pipe)
    counters.clear()
    assert torch.equal(generate(pipe), first) and counters["stats"]["unique_graphs"] == 0
    remove_cat_pruning(pipe)
    assert torch.equal(generate(pipe), full)


@pytest.mark.slow
def test_inductor_compiled_pruned_generation_equals_eager_within_tolerance() -> None:
    """What a user gets from ``block.compile(fullgraph=True)`` (inductor): pruned outputs as eager ones
    within 1e-4 (fused kernels reorder sums), and no recompilation in the second generation."""
    torch._dynamo.reset()
    pipe, generate = sd3_case()
    apply_cat_pruning(pipe, CONFIG)
    eager = generate(pipe)
    compile_blocks(pipe, backend="inductor")
    first = generate(pipe)
    counters.clear()
    second = generate(pipe)
    assert counters["stats"]["unique_graphs"] == 0
    torch.testing.assert_close(first, eager, atol=1e-4, rtol=0)
    assert torch.equal(second, first)
