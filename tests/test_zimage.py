"""CAT pruning on Z-Image: the real ``ZImageTransformer2DModel`` and ``ZImagePipeline`` at toy size with
random weights (CPU), driven with caption features.

What Z-Image adds and these tests aim at: a list of latents and captions flattened and padded into
[image, padding, caption] rows with a key mask (captions of different lengths), a per-row complex rotary
table gathered in front of every block, the gather in front of the first main block after the refiners,
CFG as one batch ``[cond, uncond]`` and ``cfg_truncation``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import (
    TEXT_DIM,
    assert_compiles_once,
    assert_formula_agrees_with_counted_macs,
    assert_keep_ratio_one_is_unpatched,
    assert_published_architecture,
    assert_skipped_steps_return_the_last_outputs,
    assert_unpatched_until_start_and_removed,
    record_calls,
    seeded_latents,
    tiny_zimage,
    zimage_pipeline,
)
from diffusers import ZImagePipeline

from catprune import CATPruningConfig, apply_cat_pruning, remove_cat_pruning
from catprune.architectures import Architecture
from catprune.engine import RowLayout, StepMode

STEPS = 6
START = 3
CONFIG = CATPruningConfig(keep_ratio=0.3, start_step=START)
SIZE = 128
"""Pixels per side without a VAE (scale factor 8, then 2x2 patches): an 8x8 token grid."""
CAPTIONS = (7, 40)
"""Caption lengths of the two prompts: padded to 32 and 64 tokens, so the rows differ in length."""


def zimage_prompts(num_prompts: int, cfg: bool) -> dict[str, Any]:
    """Caption features of ``num_prompts`` prompts (lists of (T_i, D), each its own length); with ``cfg``
    negative ones and guidance 4 (CFG as one batch ``[cond, uncond]``), else guidance 0."""
    generator = torch.Generator().manual_seed(1)
    prompts: dict[str, Any] = {
        "prompt_embeds": [
            torch.randn(CAPTIONS[i], TEXT_DIM, generator=generator) for i in range(num_prompts)
        ],
        "guidance_scale": 0.0,
    }
    if cfg:
        prompts["negative_prompt_embeds"] = [
            torch.randn(5, TEXT_DIM, generator=generator) for _ in range(num_prompts)
        ]
        prompts["guidance_scale"] = 4.0
    return prompts


def one(prompts: dict[str, Any], index: int) -> dict[str, Any]:
    """Prompt ``index``'s inputs (lists of caption features sliced, settings kept)."""
    return {k: v[index : index + 1] if isinstance(v, list) else v for k, v in prompts.items()}


def latents(num_prompts: int) -> torch.Tensor:
    return seeded_latents(num_prompts, size=16, channels=4)


def generate(
    pipe: ZImagePipeline, prompts: dict[str, Any], start: torch.Tensor, **options: Any
) -> torch.Tensor:
    return pipe(
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        latents=start,
        output_type="latent",
        **prompts,
        **options,
    ).images


@pytest.fixture
def pipe() -> ZImagePipeline:
    return zimage_pipeline(tiny_zimage())


@pytest.mark.parametrize("cfg", [False, True], ids=["turbo", "cfg"])
def test_keep_ratio_one_equals_the_unpatched_pipeline(pipe: ZImagePipeline, cfg: bool) -> None:
    prompts = zimage_prompts(2, cfg)
    run = lambda pipe: generate(pipe, prompts, latents(2))  # noqa: E731
    assert_keep_ratio_one_is_unpatched(pipe, run, STEPS, START)


def test_a_skipped_step_returns_the_last_outputs(pipe: ZImagePipeline) -> None:
    prompts = zimage_prompts(2, True)
    run = lambda pipe: generate(pipe, prompts, latents(2))  # noqa: E731
    assert_skipped_steps_return_the_last_outputs(pipe, run, STEPS, START)


@pytest.mark.slow
def test_steps_before_start_step_are_identical_and_remove_restores_bit_for_bit(pipe: ZImagePipeline) -> None:
    prompts = zimage_prompts(2, cfg=True)
    run = lambda pipe: generate(pipe, prompts, latents(2))  # noqa: E731
    assert_unpatched_until_start_and_removed(pipe, run, CONFIG, STEPS, passes=1)


@pytest.mark.parametrize("controlnet", [False, True], ids=["text-to-image", "controlnet"])
def test_pruned_step_fed_the_fill_steps_inputs_returns_its_output(controlnet: bool) -> None:
    """Two rows with captions of different lengths (a key mask), refiners and two main blocks: the caches
    are exact after the fill step, so this checks the gather in front of the first main block, the
    per-row rotary gather, the masked attention over the caches and the scatter; with ControlNet
    residuals (a mapping from block to (B, L, D), as ``ZImageControlNetModel`` returns), their gather."""
    transformer = tiny_zimage(num_layers=2)
    captions = zimage_prompts(2, cfg=False)["prompt_embeds"]
    start = [latent[:, None] for latent in latents(2)]  # (C, 1, H, W) each
    generator = torch.Generator().manual_seed(4)
    residuals = {
        0: torch.randn(2, 128, 32, generator=generator),
        1: torch.randn(2, 128, 32, generator=generator),
    }
    extra = {"controlnet_block_samples": residuals} if controlnet else {}
    state = apply_cat_pruning(transformer, CATPruningConfig(keep_ratio=0.3, start_step=2))
    state.begin_generation()
    modes, outputs = [], []
    with torch.no_grad():
        for timestep in (0.1, 0.2, 0.2):
            out = transformer(start, torch.tensor([timestep] * 2), captions, **extra).sample
            outputs.append(torch.stack(out))
            modes.append(state.mode)
            start = start if timestep == 0.2 else [x - 0.1 * o for x, o in zip(start, out, strict=True)]
    assert modes == [StepMode.FULL, StepMode.FILL, StepMode.PRUNED]
    assert state.context.layout.fixed_tokens == 64  # the longest caption, padded to 64
    assert state.indices.shape == (2, round(0.3 * 64)) and int(state.indices.max()) < 64
    assert not torch.equal(state.indices[0], state.indices[1])
    torch.testing.assert_close(outputs[2], outputs[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("cfg", [False, True], ids=["turbo", "cfg"])
def test_batched_prompts_equal_each_prompt_alone(pipe: ZImagePipeline, cfg: bool) -> None:
    """Each prompt selects its own tokens; alone, a prompt's row has no batch padding (another sequence
    length): right only if the key mask, the rotary rows and the fixed segment follow each row."""
    prompts = zimage_prompts(2, cfg)
    apply_cat_pruning(pipe, CONFIG)
    batched = generate(pipe, prompts, latents(2))
    for index in range(2):
        alone = generate(pipe, one(prompts, index), latents(2)[index : index + 1])
        torch.testing.assert_close(batched[index : index + 1], alone, atol=1e-5, rtol=0)


def test_cfg_is_one_batch_cond_first_sharing_the_conditional_selection(pipe: ZImagePipeline) -> None:
    """``ZImagePipeline`` batches ``[cond..., uncond...]``: one call per step, the pairs detected in that
    order, each unconditional row recomputing its prompt's tokens."""
    state = apply_cat_pruning(pipe, CONFIG)
    calls = record_calls(state, pipe.transformer)
    generate(pipe, zimage_prompts(2, cfg=True), latents(2))
    assert [(step, key) for step, key, _ in calls] == [(step, (None, 0)) for step in range(STEPS)]
    assert state.context.row_layout == RowLayout(paired=True, cond_first=True)
    for _, _, indices in calls[START:]:
        assert torch.equal(indices[:2], indices[2:])
    assert (state.stats.steps, state.stats.pruned_steps) == (STEPS, STEPS - START)


@pytest.mark.slow
def test_cfg_truncation_keeps_the_conditional_rows(pipe: ZImagePipeline) -> None:
    """``cfg_truncation`` runs the late steps without the unconditional rows: the engine keeps the
    conditional rows' caches (the first half) and the generation equals the unpatched one at keep 1.0."""
    prompts = zimage_prompts(2, cfg=True)
    run = lambda pipe: generate(pipe, prompts, latents(2), cfg_truncation=0.5)  # noqa: E731
    assert_keep_ratio_one_is_unpatched(pipe, run, STEPS, START)
    remove_cat_pruning(pipe)
    engine = apply_cat_pruning(pipe, CONFIG)
    rows = []
    pipe.transformer.register_forward_hook(lambda module, args, output: rows.append(engine.context.rows))
    run(pipe)
    assert rows[0] == 4 and rows[-1] == 2 and rows == sorted(rows, reverse=True)
    assert engine.stats.pruned_steps == STEPS - START


def test_omni_mode_is_refused() -> None:
    transformer = tiny_zimage()
    apply_cat_pruning(transformer, CONFIG).begin_generation()
    start = [latent[:, None] for latent in latents(1)]
    caption = [torch.randn(7, TEXT_DIM)]
    with pytest.raises(ValueError, match="Omni"), torch.no_grad():
        transformer([start], torch.tensor([0.1]), [caption])


def test_pruned_steps_run_on_the_meta_device() -> None:
    """No host reads or data-dependent shapes in the gather, rotary rows, caches or scatter."""
    with torch.device("meta"):
        transformer = tiny_zimage()
    state = apply_cat_pruning(transformer, CATPruningConfig(start_step=2))
    state.begin_generation(cfg=False)
    with torch.device("meta"):
        start = [torch.empty(4, 1, 16, 16) for _ in range(2)]
        captions = [torch.empty(32, TEXT_DIM) for _ in range(2)]
    modes = []
    with torch.no_grad():
        for step in range(4):
            output = transformer(start, torch.full((2,), step / 10, device="meta"), captions)
            modes.append(state.mode)
    assert modes == [StepMode.FULL, StepMode.FILL, StepMode.PRUNED, StepMode.PRUNED]
    assert output.sample[0].shape == (4, 1, 16, 16) and state.indices.shape == (2, round(0.3 * 64))


def test_counted_macs_of_a_pruned_step_agree_with_the_adapter_formula() -> None:
    """FlopCounterMode on the real forward (meta) against ``ZImageAdapter.step_macs`` within 5%."""
    model = tiny_zimage(num_layers=3, num_refiner_layers=1)
    architecture = Architecture(
        "tiny-z-image", "z-image", dict(model.config), text_tokens=32, default_steps=8
    )
    assert_formula_agrees_with_counted_macs(architecture, rows=2, image_tokens=256)  # CFG as one batch


@pytest.mark.slow
@pytest.mark.parametrize(("name", "steps"), [("z-image", 50), ("z-image-turbo", 8)])
def test_the_z_image_architectures_have_the_published_size_and_macs_cli_ratio(name: str, steps: int) -> None:
    """Z-Image and Z-Image-Turbo: 6B parameters (6.15B), 128 caption tokens for measurement; 50 and 8
    steps."""
    assert_published_architecture(
        name, "ZImageTransformer2DModel", 6_154_908_736, 128, steps, cli_steps=28, rows=2, image_tokens=4096,
        ratio=(0.45, 0.6),
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("how", ["whole", "blocks"])
def test_compiled_pruning_has_no_graph_breaks_and_a_second_generation_compiles_nothing(
    pipe: ZImagePipeline, how: str
) -> None:
    torch._dynamo.reset()
    prompts = zimage_prompts(2, cfg=True)
    apply_cat_pruning(pipe, CONFIG)
    assert_compiles_once(pipe, lambda pipe: generate(pipe, prompts, latents(2)), how)
