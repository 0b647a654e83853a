"""The step engine on the ways 2026's pipelines call a transformer (tiny real diffusers classes, CPU).

CFG rows in either order, true CFG as two unnamed calls per step, increasing timesteps, a scheduler
swapped on the pipeline, CFG truncation, reference-image tokens that are never pruned (Flux.1 Kontext),
video-shaped token grids in selection, and processors that read only the step context.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import (
    POOLED_DIM,
    TEXT_DIM,
    TEXT_TOKENS,
    flux_pipeline,
    sd3_pipeline,
    sd3_prompts,
    seeded_latents,
    tiny_flux,
    tiny_sd3,
    tiny_vae,
)
from diffusers import (
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxKontextPipeline,
    FluxPipeline,
    SD3Transformer2DModel,
)

from catprune import CATPruningConfig, apply_cat_pruning, remove_cat_pruning
from catprune.adapters import ADAPTERS, SD3Adapter, register_adapter
from catprune.engine import StepMode, StepSlot
from catprune.selection import Grid, cluster_adjacency, positional_encoding
from catprune.strategies import STRATEGIES, TokenSelector

STEPS = 6
START = 3
CONFIG = CATPruningConfig(keep_ratio=0.3, start_step=START)


class GuidedPipeline(DiffusionPipeline):
    """A minimal flow-matching pipeline around an SD3 transformer that calls it the ways current pipelines
    do: CFG as one batch in either row order, or as two calls per step without naming them (Flux3's
    guider), optionally dropping the unconditional rows partway (Z-Image's ``cfg_truncation``)."""

    def __init__(self, transformer: SD3Transformer2DModel, scheduler: Any) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        latents: torch.Tensor,
        prompts: dict[str, torch.Tensor],
        cond_first: bool = False,
        separate_calls: bool = False,
        truncate_at: int | None = None,
        guidance: float = 4.0,
    ) -> torch.Tensor:
        cond = (prompts["prompt_embeds"], prompts["pooled_prompt_embeds"])
        uncond = (prompts["negative_prompt_embeds"], prompts["negative_pooled_prompt_embeds"])
        self.scheduler.set_timesteps(STEPS)
        for step, timestep in enumerate(self.scheduler.timesteps):
            if truncate_at is not None and step >= truncate_at:
                noise = self._predict(latents, cond, timestep)
            elif separate_calls:
                conditional = self._predict(latents, cond, timestep)
                unconditional = self._predict(latents, uncond, timestep)
                noise = unconditional + guidance * (conditional - unconditional)
            else:
                order = (cond, uncond) if cond_first else (uncond, cond)
                texts = tuple(torch.cat(parts) for parts in zip(*order, strict=True))
                first, second = self._predict(torch.cat([latents, latents]), texts, timestep).chunk(2)
                conditional, unconditional = (first, second) if cond_first else (second, first)
                noise = unconditional + guidance * (conditional - unconditional)
            latents = self.scheduler.step(noise, timestep, latents).prev_sample
        return latents

    def _predict(self, latents: torch.Tensor, text: tuple[torch.Tensor, ...], timestep: Any) -> torch.Tensor:
        return self.transformer(
            latents,
            encoder_hidden_states=text[0],
            pooled_projections=text[1],
            timestep=timestep.expand(latents.shape[0]),
        ).sample


class CondFirstSD3(SD3Transformer2DModel):
    """SD3's transformer for a family whose pipelines put CFG's conditional rows first (as Z-Image's)."""


class CondFirstSD3Adapter(SD3Adapter):
    family = "test-cond-first"
    model_class = CondFirstSD3
    cond_first = True


@pytest.fixture
def cond_first_adapter() -> Iterator[None]:
    register_adapter(CondFirstSD3Adapter)
    yield
    del ADAPTERS[CondFirstSD3Adapter.family]


def guided(transformer: SD3Transformer2DModel | None = None) -> GuidedPipeline:
    return GuidedPipeline(transformer or tiny_sd3(), FlowMatchEulerDiscreteScheduler(shift=3.0))


def pruned_indices(state: Any, pipe: Any) -> list[torch.Tensor]:
    """The indices of every pruned call, in order."""
    seen: list[torch.Tensor] = []

    def record(module: torch.nn.Module, args: Any, output: Any) -> None:
        if state.mode is StepMode.PRUNED:
            seen.append(state.context.indices.clone())

    pipe.transformer.register_forward_hook(record)
    return seen


def test_cfg_rows_conditional_first_share_the_conditional_rows_selection(cond_first_adapter: None) -> None:
    """A pipeline that batches [cond, uncond] and declares it (through its adapter) prunes exactly as one
    that batches [uncond, cond]: the same selections, each shared by a prompt's pair, and the same images;
    and each prompt selects alone as in the batch."""
    prompts, latents = sd3_prompts(2), seeded_latents(2)
    usual = guided()
    usual_state = apply_cat_pruning(usual, CONFIG)
    usual_indices = pruned_indices(usual_state, usual)
    usual_images = usual(latents, prompts)

    transformer = CondFirstSD3.from_config(usual.transformer.config).eval()
    transformer.load_state_dict(usual.transformer.state_dict())
    swapped = guided(transformer)
    state = apply_cat_pruning(swapped, CONFIG)
    indices = pruned_indices(state, swapped)
    images = swapped(latents, prompts, cond_first=True)

    assert state.stats.pruned_steps == STEPS - START and len(indices) == STEPS - START
    torch.testing.assert_close(images, usual_images, atol=1e-5, rtol=0)
    for rows, usual_rows in zip(indices, usual_indices, strict=True):
        assert torch.equal(rows[:2], rows[2:])  # [cond, uncond]: a prompt's two rows share one selection
        assert torch.equal(rows[:2], usual_rows[2:])  # the conditional rows select, in either order
    batched = list(indices)
    alone = pruned_indices(state, swapped)
    swapped(latents[1:], {name: value[1:] for name, value in prompts.items()}, cond_first=True)
    for rows, single in zip(batched, alone, strict=True):
        assert torch.equal(single, rows[[1, 3]])


def test_a_bare_transformer_pairs_rows_conditional_first_when_told() -> None:
    transformer = tiny_sd3()
    prompts = sd3_prompts(2)
    selections = {}
    for pairing, order in (("cfg", ("negative_", "")), ("cfg-cond-first", ("", "negative_"))):
        state = apply_cat_pruning(transformer, CATPruningConfig(start_step=2, row_pairing=pairing))
        text = torch.cat([prompts[f"{prefix}prompt_embeds"] for prefix in order])
        pooled = torch.cat([prompts[f"{prefix}pooled_prompt_embeds"] for prefix in order])
        latents = seeded_latents(2).repeat(2, 1, 1, 1)
        with torch.no_grad():
            for timestep in (900.0, 700.0, 500.0):
                output = transformer(
                    latents,
                    encoder_hidden_states=text,
                    pooled_projections=pooled,
                    timestep=torch.tensor([timestep] * 4),
                ).sample
                latents = latents - 0.2 * output
        assert state.mode is StepMode.PRUNED
        selections[pairing] = state.context.indices.clone()
        remove_cat_pruning(transformer)
    assert torch.equal(selections["cfg-cond-first"][:2], selections["cfg-cond-first"][2:])
    assert torch.equal(selections["cfg-cond-first"], selections["cfg"])


def test_two_unnamed_calls_per_step_are_passes_of_one_step() -> None:
    """Flux3's guider calls the transformer twice per step without ``cache_context``: one step each, both
    calls recompute the tokens the first selected, and keep 1.0 equals the unpatched pipeline."""
    pipe = guided()
    prompts, latents = sd3_prompts(2), seeded_latents(2)
    reference = pipe(latents, prompts, separate_calls=True)
    state = apply_cat_pruning(pipe, CATPruningConfig(keep_ratio=1.0, start_step=START))
    torch.testing.assert_close(pipe(latents, prompts, separate_calls=True), reference, atol=1e-5, rtol=0)
    assert (state.stats.steps, state.stats.pruned_steps) == (STEPS, STEPS - START)
    remove_cat_pruning(pipe)

    state = apply_cat_pruning(pipe, CONFIG)
    calls: list[tuple[int, Any, torch.Tensor | None]] = []

    def record(module: torch.nn.Module, args: Any, output: Any) -> None:
        context = state.context
        pruned = context.mode is StepMode.PRUNED
        calls.append((context.step, context.pass_key, context.indices.clone() if pruned else None))

    pipe.transformer.register_forward_hook(record)
    output = pipe(latents, prompts, separate_calls=True)
    assert torch.isfinite(output).all()
    assert [(step, key) for step, key, _ in calls] == [
        (step, (None, index)) for step in range(STEPS) for index in (0, 1)
    ]
    for first, second in zip(calls[::2], calls[1::2], strict=True):
        assert (first[2] is None) == (second[2] is None)
        assert first[2] is None or torch.equal(first[2], second[2])
    assert (state.stats.steps, state.stats.pruned_steps) == (STEPS, STEPS - START)
    assert {key for processor in state.processors for key in processor.caches} == {(None, 0), (None, 1)}


def bare_loop(transformer: SD3Transformer2DModel, timesteps: list[float], calls_per_step: int = 1) -> None:
    prompts, latents = sd3_prompts(1), seeded_latents(1)
    with torch.no_grad():
        for timestep in timesteps:
            for _ in range(calls_per_step):
                output = transformer(
                    latents,
                    encoder_hidden_states=prompts["prompt_embeds"],
                    pooled_projections=prompts["pooled_prompt_embeds"],
                    timestep=torch.tensor([timestep]),
                ).sample
            latents = latents - 0.1 * output


def test_increasing_timesteps_in_a_bare_loop_are_one_generation() -> None:
    transformer = tiny_sd3()
    state = apply_cat_pruning(transformer, CONFIG)
    increasing = [100.0 * step for step in range(1, STEPS + 1)]  # Z-Image counts its timesteps up
    bare_loop(transformer, increasing)
    assert (state.stats.steps, state.stats.pruned_steps) == (STEPS, STEPS - START)
    bare_loop(transformer, increasing)  # starting over: a new generation
    assert (state.stats.steps, state.stats.pruned_steps) == (STEPS, STEPS - START)
    bare_loop(transformer, increasing, calls_per_step=2)  # two passes per step (same timestep)
    assert (state.stats.steps, state.stats.pruned_steps) == (STEPS, STEPS - START)


def test_a_scheduler_swapped_after_apply_starts_a_fresh_generation_on_it() -> None:
    prompts, latents = sd3_prompts(1), seeded_latents(1)

    def dpm() -> DPMSolverMultistepScheduler:
        return DPMSolverMultistepScheduler(
            use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0
        )

    def run(pipe: Any) -> torch.Tensor:
        return pipe(
            num_inference_steps=STEPS, latents=latents, output_type="latent", height=128, width=128, **prompts
        ).images

    fresh = sd3_pipeline(tiny_sd3())
    fresh.scheduler = dpm()
    apply_cat_pruning(fresh, CONFIG)
    expected = run(fresh)

    pipe = sd3_pipeline(tiny_sd3())
    state = apply_cat_pruning(pipe, CONFIG)
    run(pipe)
    pipe.scheduler = dpm()  # a habit of diffusers users
    torch.testing.assert_close(run(pipe), expected, atol=1e-6, rtol=0)
    assert (state.stats.steps, state.stats.pruned_steps) == (STEPS, STEPS - START)


@pytest.mark.parametrize("truncate_at", [2, 4])
def test_cfg_truncation_keeps_the_conditional_rows_selection_and_caches(truncate_at: int) -> None:
    """The pipeline stops guiding at step ``truncate_at`` (before or after pruning starts) and passes the
    conditional rows only: the same generation goes on, keep 1.0 equals the unpatched pipeline, and MACs
    count the rows each call had."""
    pipe = guided()
    prompts, latents = sd3_prompts(2), seeded_latents(2)
    reference = pipe(latents, prompts, truncate_at=truncate_at)
    state = apply_cat_pruning(pipe, CATPruningConfig(keep_ratio=1.0, start_step=START))
    torch.testing.assert_close(pipe(latents, prompts, truncate_at=truncate_at), reference, atol=1e-5, rtol=0)
    remove_cat_pruning(pipe)

    state = apply_cat_pruning(pipe, CONFIG)
    indices = pruned_indices(state, pipe)
    output = pipe(latents, prompts, truncate_at=truncate_at)
    assert torch.isfinite(output).all()
    assert (state.stats.steps, state.stats.pruned_steps) == (STEPS, STEPS - START)
    guided_rows = [4 if step < truncate_at else 2 for step in range(STEPS)]
    assert [tuple(rows.shape) for rows in indices] == [
        (rows, round(0.3 * 64)) for rows in guided_rows[START:]
    ]
    adapter, model = ADAPTERS["sd3"], pipe.transformer
    full = adapter.step_macs(model, 64, 64, TEXT_TOKENS, pruned=False)
    assert state.stats.full_macs == sum(guided_rows) * full
    kept = round(0.3 * 64)
    pruned = adapter.step_macs(model, kept, 64, TEXT_TOKENS, pruned=True)
    assert state.stats.macs == sum(guided_rows[:START]) * full + sum(guided_rows[START:]) * pruned


def kontext_pipeline() -> FluxKontextPipeline:
    return flux_pipeline(tiny_flux(), vae=tiny_vae(), pipeline_class=FluxKontextPipeline)


def kontext(pipe: FluxKontextPipeline) -> torch.Tensor:
    """Packed latents of a 32x32 generation (an 8x8 token grid) guided by a reference image's latents
    (a 4x4 token grid appended to the sequence)."""
    generator = torch.Generator().manual_seed(5)
    return pipe(
        image=torch.randn(1, 4, 8, 8, generator=generator),
        prompt_embeds=torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=generator),
        pooled_prompt_embeds=torch.randn(1, POOLED_DIM, generator=generator),
        latents=torch.randn(1, 64, 16, generator=generator),
        height=32,
        width=32,
        num_inference_steps=STEPS,
        guidance_scale=3.5,
        max_area=32 * 32,
        _auto_resize=False,
        output_type="latent",
    ).images


def test_flux_kontext_prunes_the_image_and_recomputes_the_reference_tokens() -> None:
    pipe = kontext_pipeline()
    reference = kontext(pipe)
    state = apply_cat_pruning(pipe, CATPruningConfig(keep_ratio=1.0, start_step=START))
    torch.testing.assert_close(kontext(pipe), reference, atol=1e-5, rtol=0)
    assert (state.stats.steps, state.stats.pruned_steps) == (STEPS, STEPS - START)
    assert state.context.fixed_tokens == 16 and state.context.num_tokens == 64
    remove_cat_pruning(pipe)

    state = apply_cat_pruning(pipe, CONFIG)
    indices = pruned_indices(state, pipe)
    pruned = kontext(pipe)
    assert torch.isfinite(pruned).all() and not torch.equal(pruned, reference)
    assert len(indices) == STEPS - START  # the reference tokens (64..79) are never selected
    assert all(int(rows.max()) < 64 and len(rows.unique()) == rows.numel() for rows in indices)
    assert (state.stats.steps, state.stats.pruned_steps) == (STEPS, STEPS - START)
    assert state.context.indices.shape == (1, round(0.3 * 64))
    assert 0 < state.stats.macs < state.stats.full_macs


def test_a_kontext_pruned_step_fed_the_fill_steps_inputs_returns_its_output() -> None:
    """Fill-step exactness with a reference segment: the caches, the gathered rotary rows and the
    scattered output are exact for the image tokens and the reference tokens alike."""
    transformer = tiny_flux()
    state = apply_cat_pruning(transformer, CATPruningConfig(keep_ratio=0.3, start_step=2))
    state.begin_generation()
    image_ids = FluxPipeline._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float32)
    reference_ids = FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32)
    reference_ids[:, 0] = 1
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "encoder_hidden_states": torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=generator),
        "pooled_projections": torch.randn(1, POOLED_DIM, generator=generator),
        "img_ids": torch.cat([image_ids, reference_ids]),
        "txt_ids": torch.zeros(TEXT_TOKENS, 3),
        "guidance": torch.tensor([3.5]),
    }
    tokens = torch.randn(1, 64 + 16, 16, generator=generator)
    outputs, modes = [], []
    with torch.no_grad():
        for timestep in (0.9, 0.8, 0.8):
            outputs.append(transformer(tokens, timestep=torch.tensor([timestep]), **inputs).sample)
            modes.append(state.mode)
            tokens = tokens if timestep == 0.8 else tokens - 0.1 * outputs[-1]
    assert modes == [StepMode.FULL, StepMode.FILL, StepMode.PRUNED]
    assert outputs[2].shape == (1, 80, 16)
    torch.testing.assert_close(outputs[2], outputs[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("strategy", sorted(set(STRATEGIES) - {"at-edm"}))
def test_selection_on_a_video_grid_keeps_exactly_k_per_prompt(strategy: str) -> None:
    grid = Grid(height=4, width=5, frames=3)
    config = CATPruningConfig(strategy=strategy, num_clusters=6)
    generator = torch.Generator().manual_seed(0)
    selector = TokenSelector(config)
    selector.set_reference(torch.randn(2, grid.num_tokens, 8, generator=generator))
    kept = config.num_kept(grid.num_tokens)
    for _ in range(3):
        indices = selector.select(torch.randn(2, grid.num_tokens, 8, generator=generator), grid, kept)
        assert indices.shape == (2, kept) and indices.dtype == torch.int64
        for row in indices:
            assert len(set(row.tolist())) == kept and torch.equal(row, row.sort().values)
            assert int(row.min()) >= 0 and int(row.max()) < grid.num_tokens


def test_selection_on_a_video_grid_runs_on_the_meta_device() -> None:
    """Static shapes and no host reads: the whole CAT selection runs on tensors without data."""
    grid = Grid(height=4, width=5, frames=3)
    config = CATPruningConfig(num_clusters=6)
    selector = TokenSelector(config)
    with torch.device("meta"):
        selector.set_reference(torch.empty(2, grid.num_tokens, 8))
        for _ in range(3):
            indices = selector.select(torch.empty(2, grid.num_tokens, 8), grid, 18)
            assert indices.shape == (2, 18) and indices.device.type == "meta"


def test_a_video_grid_encodes_and_joins_frames_and_an_image_grid_is_unchanged() -> None:
    video = positional_encoding(Grid(2, 2, frames=2), 6).view(2, 2, 2, 6)  # (frames, h, w, channels)
    assert torch.equal(video[1, :, :, :2], torch.full((2, 2, 2), 0.5))  # frame f: f / F in the first part
    assert torch.equal(video[0, 1, 0, 2:4], torch.full((2,), 0.5))  # row i: i / h in the second
    image = positional_encoding(Grid(2, 3), 4)  # frames = 1: the paper's two halves, rows then columns
    assert torch.equal(image[:, :2].unique(), torch.tensor([0.0, 0.5]))
    torch.testing.assert_close(image[:, 2:].unique(), torch.tensor([0.0, 1 / 3, 2 / 3]))
    # Two clusters that meet only across frames are adjacent on a video grid.
    labels = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])  # frame 0: cluster 0, frame 1: cluster 1
    assert cluster_adjacency(labels, Grid(2, 2, frames=2), 2)[0, 0, 1]
    assert not cluster_adjacency(labels.view(1, 2, 4)[:, :1].reshape(1, 4), Grid(2, 2), 2)[0, 0, 1]


class ContextOnly:
    """A slot that lets a processor read the step context and write its capture, and nothing else."""

    def __init__(self, slot: StepSlot) -> None:
        object.__setattr__(self, "_slot", slot)

    def __getattr__(self, name: str) -> Any:
        if name not in ("context", "capture", "mode"):
            raise AssertionError(f"a processor read {name!r} beside the step context")
        return getattr(object.__getattribute__(self, "_slot"), name)


@pytest.mark.parametrize("strategy", ["cat", "at-edm"])
def test_processors_read_nothing_but_the_step_context(strategy: str) -> None:
    pipe = sd3_pipeline(tiny_sd3(sd35=True))
    state = apply_cat_pruning(pipe, CATPruningConfig(keep_ratio=0.3, start_step=START, strategy=strategy))
    for processor in state.processors:
        assert not any(value is state for value in vars(processor).values())
        processor.slot = ContextOnly(processor.slot)
    prompts, latents = sd3_prompts(1), seeded_latents(1)
    output = pipe(
        num_inference_steps=STEPS, latents=latents, output_type="latent", height=128, width=128, **prompts
    )
    assert torch.isfinite(output.images).all() and state.stats.pruned_steps == STEPS - START
