"""One process of ``tests/test_context_parallel.py``: run under ``torchrun --nproc_per_node 2`` on the CPU
(gloo), it measures CAT pruning under diffusers' context parallelism (Ulysses) on a tiny Wan and a tiny
Flux transformer against the same models in one process, and saves what it measured to
``OUT/rank{rank}.pt`` for the test to check.

Each process first runs the single-process references itself (the same weights, inputs and steps), then the
same generations with parallelism enabled: unpatched, pruned with keep 1.0 and pruned with keep 0.3.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from conftest import POOLED_DIM, TEXT_DIM, tiny_flux, tiny_wan
from diffusers import ContextParallelConfig

from catprune import CATPruningConfig, apply_cat_pruning, remove_cat_pruning
from catprune.engine import StepMode

# diffusers places each process on device ``rank % torch.accelerator.device_count()``: 0 on a CPU-only host.
torch.accelerator.device_count = lambda: 1

STEPS = 5
START = 2
"""Step 0 full, step 1 the fill step, steps 2-4 pruned."""
KEEP = 0.3
WAN_LATENTS = (2, 4, 3, 8, 8)
"""Two prompts, three latent frames of 8x8: a 3 x 4 x 4 grid of 48 tokens, K = 14."""
FLUX_SIDE = 6
"""A 6 x 6 grid of 36 tokens: K = round(0.3 * 36) = 11, rounded up to 12 for two processes."""
FLUX_TEXT = 8
"""Text tokens, split between the processes by Flux's plan."""

Run = Callable[[torch.nn.Module, Any], list[torch.Tensor]]


def wan_run(model: torch.nn.Module, state: Any, per_token: bool = False) -> list[torch.Tensor]:
    """A 5-step loop of two calls per step (cond, uncond) as ``WanPipeline`` makes them; ``per_token``: a
    timestep per token, 0 on the first latent frame, as Wan 2.2 TI2V's pipeline gives it."""
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(WAN_LATENTS, generator=generator)
    cond, uncond = (torch.randn(2, 7, TEXT_DIM, generator=generator) for _ in range(2))
    frame_tokens = WAN_LATENTS[3] * WAN_LATENTS[4] // 4
    outputs = []
    if state is not None:
        state.begin_generation(cfg=False, steps=STEPS)
    for step in range(STEPS):
        timestep = torch.full((2,), 1000.0 - 150 * step)
        if per_token:  # (B, N)
            timestep = timestep[:, None].repeat(1, WAN_LATENTS[2] * frame_tokens)
            timestep[:, :frame_tokens] = 0.0
        with model.cache_context("cond"):
            out_cond = model(latents, timestep, cond, return_dict=False)[0]
        with model.cache_context("uncond"):
            out_uncond = model(latents, timestep, uncond, return_dict=False)[0]
        outputs += [out_cond, out_uncond]
        latents = latents - 0.1 * (out_uncond + 5.0 * (out_cond - out_uncond))
    return outputs


def flux_run(model: torch.nn.Module, state: Any) -> list[torch.Tensor]:
    """A 5-step loop of one call per step, two prompts."""
    generator = torch.Generator().manual_seed(2)
    tokens = FLUX_SIDE * FLUX_SIDE
    latents = torch.randn(2, tokens, 16, generator=generator)
    text = torch.randn(2, FLUX_TEXT, TEXT_DIM, generator=generator)
    pooled = torch.randn(2, POOLED_DIM, generator=generator)
    image_ids = torch.zeros(tokens, 3)
    image_ids[:, 1] = torch.arange(FLUX_SIDE).repeat_interleave(FLUX_SIDE)
    image_ids[:, 2] = torch.arange(FLUX_SIDE).repeat(FLUX_SIDE)
    outputs = []
    if state is not None:
        state.begin_generation(cfg=False, steps=STEPS)
    for step in range(STEPS):
        out = model(
            hidden_states=latents,
            encoder_hidden_states=text,
            pooled_projections=pooled,
            timestep=torch.full((2,), 1.0 - 0.15 * step),
            img_ids=image_ids,
            txt_ids=torch.zeros(FLUX_TEXT, 3),
            guidance=torch.full((2,), 3.5),
            return_dict=False,
        )[0]
        outputs.append(out)
        latents = latents - 0.1 * out
    return outputs


def max_difference(outputs: list[torch.Tensor], references: list[torch.Tensor]) -> float:
    return max((out - ref).abs().max().item() for out, ref in zip(outputs, references, strict=True))


def pruned(model: torch.nn.Module, run: Run, config: CATPruningConfig) -> dict[str, Any]:
    """A pruned generation: its outputs, the mode of every call, K, and the K/V caches' bytes and shapes."""
    state = apply_cat_pruning(model, config)
    modes: list[StepMode] = []
    model.register_forward_hook(lambda module, args, output: modes.append(state.mode))
    outputs = run(model, state)
    caches = [cache for processor in state.processors for cache in processor.caches.values()]
    measured = {
        "outputs": outputs,
        "modes": [mode.value for mode in modes],
        "kept": state.context.num_kept,
        "local_kept": state.context.local_indices.shape[1],
        "cache_bytes": sum(processor.cache_bytes() for processor in state.processors),
        "cache_shapes": sorted({tuple(cache.key.shape) for cache in caches}),
        "stats": (state.stats.steps, state.stats.pruned_steps, state.stats.macs),
    }
    remove_cat_pruning(model)
    model._forward_hooks.clear()
    return measured


def measure(
    build: Callable[[], torch.nn.Module], run: Run, world: int, cache_dtype: str | None = None
) -> dict[str, Any]:
    """The model in one process (unpatched; pruned, K a multiple of P as under parallelism), then under
    Ulysses (unpatched; keep 1.0; pruned), with the K/V caches stored in ``cache_dtype``."""
    config = CATPruningConfig(keep_ratio=KEEP, start_step=START, cache_dtype=cache_dtype)
    with torch.no_grad():
        single = build()
        unpatched = run(single, None)
        single_pruned = pruned(single, run, dataclasses.replace(config, kept_multiple=world))
        parallel = build()
        parallel.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        parallel_unpatched = run(parallel, None)
        keep_all = pruned(parallel, run, dataclasses.replace(config, keep_ratio=1.0))
        parallel_pruned = pruned(parallel, run, config)
    return {
        "diffusers_vs_single": max_difference(parallel_unpatched, unpatched),
        "keep_all_vs_unpatched": max_difference(keep_all["outputs"], unpatched),
        "pruned_vs_single_pruned": max_difference(parallel_pruned["outputs"], single_pruned["outputs"]),
        "pruned_vs_unpatched": max_difference(parallel_pruned["outputs"], unpatched),
        **{f"single_{key}": value for key, value in single_pruned.items() if key != "outputs"},
        **{f"parallel_{key}": value for key, value in parallel_pruned.items() if key != "outputs"},
        "keep_all_modes": keep_all["modes"],
    }


def refusal(action: Callable[[], Any]) -> str:
    try:
        action()
    except RuntimeError as error:
        return str(error)
    return ""


def ring_refusal(world: int) -> str:
    model = tiny_flux()
    model.enable_parallelism(config=ContextParallelConfig(ring_degree=world))
    return refusal(lambda: apply_cat_pruning(model, CATPruningConfig(start_step=START)))


def enabled_after_pruning_refusal(world: int) -> str:
    model = tiny_wan()
    apply_cat_pruning(model, CATPruningConfig(keep_ratio=KEEP, start_step=START))
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    with torch.no_grad():
        return refusal(lambda: wan_run(model, None))


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {
        "wan": measure(lambda: tiny_wan(), wan_run, world),
        "wan-ti2v": measure(lambda: tiny_wan(), lambda model, state: wan_run(model, state, True), world),
        "flux": measure(lambda: tiny_flux(), flux_run, world),
        "wan-bfloat16-cache": measure(lambda: tiny_wan(), wan_run, world, "bfloat16"),
        "ring": ring_refusal(world),
        "enabled_after": enabled_after_pruning_refusal(world),
    }
    torch.save(results, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
