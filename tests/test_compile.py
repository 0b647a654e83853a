"""Pruning under ``torch.compile(fullgraph=True)``: regional (every transformer block) and whole-model.

The pruning state machine runs in the model's own hooks, outside the compiled graphs (``torch.compiler``
skips them); inside, the gather after the embedder, the scatter after the output projection and the
caching processors must trace without graph breaks, reading only the step's mode and flags, and a second
generation of the same batch and resolution must find every graph already compiled. ``backend="eager"``
checks what dynamo traces (fast); the inductor tests check the compiled numbers (slow).
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
from catprune.engine import StepMode

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


def compile_whole(pipe: Any, backend: str, way: str) -> None:
    """The two whole-model ways: ``torch.compile(module)`` (a wrapper module put in the pipeline) and
    ``module.compile()`` (in place)."""
    if way == "torch.compile":
        pipe.transformer = torch.compile(pipe.transformer, fullgraph=True, backend=backend)
    else:
        pipe.transformer.compile(fullgraph=True, backend=backend)


COMPILATIONS = ("blocks", "torch.compile", "module.compile")
"""Regional compilation, and the two whole-model ways."""


def compile_as(pipe: Any, how: str, backend: str) -> None:
    if how == "blocks":
        compile_blocks(pipe, backend)
    else:
        compile_whole(pipe, backend, how)


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


@pytest.mark.slow
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
@pytest.mark.parametrize("how", ["blocks", "module.compile"])
def test_inductor_compiled_pruned_generation_equals_eager_within_tolerance(how: str) -> None:
    """What a user gets from ``block.compile(fullgraph=True)`` or ``transformer.compile(fullgraph=True)``
    (inductor): pruned outputs as eager ones within 1e-4 (fused kernels reorder sums), and no
    recompilation in the second generation."""
    torch._dynamo.reset()
    pipe, generate = sd3_case()
    apply_cat_pruning(pipe, CONFIG)
    eager = generate(pipe)
    compile_as(pipe, how, "inductor")
    first = generate(pipe)
    counters.clear()
    second = generate(pipe)
    assert counters["stats"]["unique_graphs"] == 0
    torch.testing.assert_close(first, eager, atol=1e-4, rtol=0)
    assert torch.equal(second, first)


@pytest.mark.parametrize("how", COMPILATIONS)
@pytest.mark.parametrize(
    "case",
    # Flux compiles two kinds of blocks, each three ways: 20-40 s a case on two cores.
    [pytest.param(case, marks=pytest.mark.slow) if case == "flux" else case for case in CASES],
)
def test_compiled_pruning_has_no_graph_breaks_and_later_generations_do_not_recompile(
    case: str, how: str
) -> None:
    """Compiled after ``apply_cat_pruning``: the plan is made in the model's own hooks, outside the graphs;
    what is traced (the blocks' caching processors; whole, also the gather after the embedder and the
    scatter after the output projection) gives one graph per step kind, and removing pruning gives the
    unpatched outputs back."""
    torch._dynamo.reset()
    pipe, generate = CASES[case]()
    unpatched = generate(pipe)
    apply_cat_pruning(pipe, CONFIG)
    eager = generate(pipe)
    compile_as(pipe, how, "eager")
    counters.clear()
    first = generate(pipe)  # fullgraph=True: any graph break raises here
    graphs = counters["stats"]["unique_graphs"]
    # Whole: one graph per kind of step (full, fill, pruned), whatever the passes (Flux's true CFG).
    assert graphs == 3 if how != "blocks" else graphs > 0
    for _ in range(2):
        counters.clear()
        assert torch.equal(generate(pipe), first)
        assert counters["stats"]["unique_graphs"] == 0, "a later generation recompiled"
    torch.testing.assert_close(first, eager, atol=1e-6, rtol=0)
    remove_cat_pruning(pipe)
    torch.testing.assert_close(generate(pipe), unpatched, atol=1e-6, rtol=0)


@pytest.mark.parametrize("way", ["torch.compile", "module.compile"])
def test_pruning_refuses_a_model_compiled_whole_before_it(way: str) -> None:
    """Dynamo does not guard on module hooks: graphs compiled before pruning would ignore it. Refused with
    the order to use; nothing is changed."""
    torch._dynamo.reset()
    pipe, generate = sd3_case()
    compile_whole(pipe, "eager", way)
    reference = generate(pipe)
    with pytest.raises(RuntimeError, match="compiled whole before apply_cat_pruning"):
        apply_cat_pruning(pipe, CONFIG)
    assert torch.equal(generate(pipe), reference)


@pytest.mark.parametrize("case", list(CASES))
def test_pruned_steps_use_buffers_at_fixed_addresses(case: str) -> None:
    """What a captured CUDA graph needs: at every pruned step (every pass) of a generation, the selected
    indices, the kept outputs and every K/V cache are the same tensors, updated in place."""
    pipe, generate = CASES[case]()
    state = apply_cat_pruning(pipe, CONFIG)
    addresses: list[tuple[int, ...]] = []

    def after(module: torch.nn.Module, args: Any, output: Any) -> None:
        if state.mode is StepMode.PRUNED:
            caches = [cache for processor in state.processors for cache in processor.caches.values()]
            buffers = [
                state.indices,
                *(output.tokens for output in state.outputs.values()),
                *(c.key for c in caches),
                *(c.value for c in caches),
            ]
            addresses.append(tuple(buffer.data_ptr() for buffer in buffers))

    handle = pipe.transformer.register_forward_hook(after)
    generate(pipe)
    handle.remove()
    assert len(addresses) >= 3 and len(set(addresses)) == 1


@pytest.mark.parametrize("case", list(CASES))
def test_fused_qkv_projections_are_used_at_pruned_steps(case: str) -> None:
    """After diffusers' ``fuse_qkv_projections()`` the pruned steps project Q, K, V with the fused layers
    (one matrix product), and the generation equals the unfused one."""
    pipe, generate = CASES[case]()
    apply_cat_pruning(pipe, CONFIG)
    unfused = generate(pipe)
    remove_cat_pruning(pipe)
    pipe.transformer.fuse_qkv_projections()
    state = apply_cat_pruning(pipe, CONFIG)
    calls = {"fused": 0, "query": 0}

    def count(kind: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            calls[kind] += state.mode is StepMode.PRUNED

        return hook

    block = pipe.transformer.transformer_blocks[0]
    attention = block.attn1 if case == "pixart" else block.attn
    attention.to_qkv.register_forward_hook(count("fused"))
    attention.to_q.register_forward_hook(count("query"))
    fused = generate(pipe)
    assert calls["fused"] >= 3 and calls["query"] == 0
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=0)
