"""CAT pruning on HunyuanVideo 1.5: the real ``HunyuanVideo15Transformer3DModel`` and
``HunyuanVideo15Pipeline`` at toy size with random weights (CPU), the pipeline driven with prompt
embeddings and masks (no Qwen2.5-VL, no ByT5), with a toy ``AutoencoderKLHunyuanVideo15``.

What HunyuanVideo 1.5 adds and these tests aim at: latents concatenated with a condition along the
channels, a 3-D token grid (frames x rows x columns), a rotary table over the image tokens only, a joint
attention over [image, text] whose text is three padded sequences under a mask, and CFG as two calls per
step under ``cache_context("pred_cond"/"pred_uncond")``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from conftest import (
    assert_compiles_once,
    assert_formula_agrees_with_counted_macs,
    assert_keep_ratio_one_is_unpatched,
    assert_passes_share_selections,
    assert_published_architecture,
    assert_skipped_steps_return_the_last_outputs,
    one_prompt,
    record_calls,
)
from diffusers import (
    AutoencoderKLHunyuanVideo15,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideo15ImageToVideoPipeline,
    HunyuanVideo15Pipeline,
    HunyuanVideo15Transformer3DModel,
)
from diffusers.guiders import ClassifierFreeGuidance
from PIL import Image
from torch._dynamo.utils import counters
from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

from catprune import CATPruningConfig, apply_cat_pruning
from catprune.architectures import ARCHITECTURES, Architecture
from catprune.engine import StepMode, attached_engine
from catprune.measure import KnownMetaValues
from catprune.selection import Grid

STEPS = 5
START = 3
CONFIG = CATPruningConfig(keep_ratio=0.3, start_step=START)
FRAMES = 9
"""Video frames: 3 latent frames (the first alone, then 4 in each)."""
SIZE = 64
"""Pixels per side: 4x4 latents (16x down), 1x1 patches: 16 tokens per latent frame, 48 in all."""
LATENT_CHANNELS = 4
PROMPT_DIM, GLYPH_DIM, IMAGE_DIM = 32, 16, 16
PROMPT_TOKENS, GLYPH_TOKENS = 6, 5
"""Each prompt's padded text: its last 2 prompt and 2 glyph tokens are padding (masked)."""


def tiny_hunyuan(num_layers: int = 2) -> HunyuanVideo15Transformer3DModel:
    """HunyuanVideo 1.5's structure at toy width: 1x1x1 patches of 4 latent channels plus the condition
    (4) and its mask (1), 2 heads of 16 (rotary axes 4, 6, 6 over frames, rows, columns), double-stream
    blocks, a one-block token refiner."""
    torch.manual_seed(0)
    return HunyuanVideo15Transformer3DModel(
        in_channels=2 * LATENT_CHANNELS + 1,
        out_channels=LATENT_CHANNELS,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=num_layers,
        num_refiner_layers=1,
        text_embed_dim=PROMPT_DIM,
        text_embed_2_dim=GLYPH_DIM,
        image_embed_dim=IMAGE_DIM,
        rope_axes_dim=(4, 6, 6),
        target_size=SIZE,
    ).eval()


def hunyuan_pipeline(transformer: HunyuanVideo15Transformer3DModel, cfg: bool = True) -> Any:
    """A real ``HunyuanVideo15Pipeline`` around ``transformer`` with its guider (CFG at 6.0, or off), a toy
    VAE (4 latent channels; the published 4x temporal and 16x spatial factors, which the pipeline reads to
    size the latents) and no text encoders."""
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo15(
        latent_channels=LATENT_CHANNELS, block_out_channels=(8,) * 5, layers_per_block=1
    ).eval()
    pipe = HunyuanVideo15Pipeline(
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        text_encoder_2=None,
        tokenizer_2=None,
        guider=ClassifierFreeGuidance(guidance_scale=6.0 if cfg else 1.0),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_to_video_pipeline(transformer: HunyuanVideo15Transformer3DModel) -> Any:
    """A real ``HunyuanVideo15ImageToVideoPipeline``: the text-to-video pipeline's components and a toy
    SigLIP (width 16, one layer, 8x8 patches of a 32x32 resize: 16 image-embedding tokens)."""
    components = dict(hunyuan_pipeline(transformer).components)
    torch.manual_seed(0)
    vision = SiglipVisionConfig(
        hidden_size=IMAGE_DIM, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=8,
    )  # fmt: skip
    pipe = HunyuanVideo15ImageToVideoPipeline(
        **components,
        image_encoder=SiglipVisionModel(vision).eval(),
        feature_extractor=SiglipImageProcessorPil(size={"height": 32, "width": 32}),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def text_inputs(rows: int, generator: torch.Generator, prefix: str = "") -> dict[str, torch.Tensor]:
    """Prompt and glyph embeddings with their masks, the last two of each padding."""
    prompt_mask, glyph_mask = torch.ones(rows, PROMPT_TOKENS), torch.ones(rows, GLYPH_TOKENS)
    prompt_mask[:, -2:] = 0
    glyph_mask[:, -2:] = 0
    return {
        f"{prefix}prompt_embeds": torch.randn(rows, PROMPT_TOKENS, PROMPT_DIM, generator=generator),
        f"{prefix}prompt_embeds_mask": prompt_mask,
        f"{prefix}prompt_embeds_2": torch.randn(rows, GLYPH_TOKENS, GLYPH_DIM, generator=generator),
        f"{prefix}prompt_embeds_mask_2": glyph_mask,
    }


def hunyuan_prompts(num_prompts: int, cfg: bool = True) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    prompts = text_inputs(num_prompts, generator)
    if cfg:
        prompts |= text_inputs(num_prompts, generator, prefix="negative_")
    return prompts


def latents(num_prompts: int) -> torch.Tensor:
    """One latent video per prompt, each from its own seed (the same alone or batched)."""
    return torch.cat(
        [
            torch.randn(1, LATENT_CHANNELS, 3, 4, 4, generator=torch.Generator().manual_seed(i))
            for i in range(num_prompts)
        ]
    )


def generate(pipe: Any, prompts: dict[str, Any], start: torch.Tensor) -> torch.Tensor:
    return pipe(
        height=SIZE,
        width=SIZE,
        num_frames=FRAMES,
        num_inference_steps=STEPS,
        latents=start,
        output_type="latent",
        **prompts,
    ).frames


def transformer_inputs(rows: int, device: str | None = None) -> dict[str, torch.Tensor]:
    """A text-to-video call's conditioning as the pipeline passes it (zero image embeddings), padded text
    masked; random on CPU, empty on ``meta``."""
    generator = torch.Generator().manual_seed(4)
    make = torch.empty if device == "meta" else lambda *shape: torch.randn(*shape, generator=generator)
    with torch.device(device or "cpu"):
        prompt_mask, glyph_mask = torch.ones(rows, PROMPT_TOKENS), torch.ones(rows, GLYPH_TOKENS)
        return {
            "encoder_hidden_states": make(rows, PROMPT_TOKENS, PROMPT_DIM),
            "encoder_attention_mask": prompt_mask,
            "encoder_hidden_states_2": make(rows, GLYPH_TOKENS, GLYPH_DIM),
            "encoder_attention_mask_2": glyph_mask,
            "image_embeds": torch.zeros(rows, 729, IMAGE_DIM),
        }


@pytest.fixture
def pipe() -> Any:
    return hunyuan_pipeline(tiny_hunyuan())


@pytest.mark.parametrize("cfg", [False, True], ids=["no-cfg", "cfg"])
def test_keep_ratio_one_equals_the_unpatched_pipeline(cfg: bool) -> None:
    pipe = hunyuan_pipeline(tiny_hunyuan(), cfg)
    prompts = hunyuan_prompts(2, cfg)
    run = lambda pipe: generate(pipe, prompts, latents(2))  # noqa: E731
    assert_keep_ratio_one_is_unpatched(pipe, run, STEPS, START)


def test_a_skipped_step_returns_the_last_outputs() -> None:
    pipe = hunyuan_pipeline(tiny_hunyuan(), True)
    prompts = hunyuan_prompts(2, True)
    run = lambda pipe: generate(pipe, prompts, latents(2))  # noqa: E731
    assert_skipped_steps_return_the_last_outputs(pipe, run, STEPS, START)


def test_image_to_video_keeps_the_image_in_the_channels_and_at_keep_ratio_one_is_unpatched() -> None:
    """``HunyuanVideo15ImageToVideoPipeline``: the condition image enters through the channels (its
    latents and mask on the first frame) and through its SigLIP tokens on the text side, so the token
    layout has no fixed segment; at keep ratio 1.0 the pipeline's output is the unpatched one."""
    pipe = image_to_video_pipeline(tiny_hunyuan())
    image = Image.fromarray((np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype(np.uint8))
    prompts = hunyuan_prompts(2)
    run = lambda pipe: pipe(  # noqa: E731
        image=image, num_frames=FRAMES, num_inference_steps=STEPS, latents=latents(2), output_type="latent",
        **prompts,
    ).frames  # fmt: skip
    assert_keep_ratio_one_is_unpatched(pipe, run, STEPS, START)
    context = attached_engine(pipe.transformer).context
    assert (context.grid, context.fixed_tokens, context.text_tokens) == (Grid(4, 4, 3), 0, 6 + 5 + 16)


def test_pruned_step_fed_the_fill_steps_inputs_returns_its_output() -> None:
    """Two rows, three latent frames, two blocks, padded text in the second row: exact caches after the
    fill step, so this checks the gather after the embedder, the per-row rotary rows, the joint attention
    over the caches under the text mask and the scatter."""
    transformer = tiny_hunyuan()
    start = torch.randn(2, 2 * LATENT_CHANNELS + 1, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    inputs = transformer_inputs(2)
    inputs["encoder_attention_mask"][1, -3:] = 0
    inputs["encoder_attention_mask_2"][1, -1:] = 0
    state = apply_cat_pruning(transformer, CATPruningConfig(keep_ratio=0.3, start_step=2))
    state.begin_generation()
    modes, outputs = [], []
    with torch.no_grad():
        for timestep in (100.0, 200.0, 200.0):
            out = transformer(start, torch.tensor([timestep] * 2), **inputs).sample
            outputs.append(out)
            modes.append(state.mode)
            start = start if timestep == 200.0 else start - 0.1 * torch.cat([out, out, out[:, :1]], dim=1)
    assert modes == [StepMode.FULL, StepMode.FILL, StepMode.PRUNED]
    assert state.context.grid == Grid(4, 4, 3) and state.context.text_tokens == 6 + 5 + 729
    assert state.indices.shape == (2, round(0.3 * 48)) and not torch.equal(state.indices[0], state.indices[1])
    torch.testing.assert_close(outputs[2], outputs[1], atol=1e-5, rtol=0)


def test_batched_prompts_equal_each_prompt_alone(pipe: Any) -> None:
    prompts = hunyuan_prompts(2)
    apply_cat_pruning(pipe, CONFIG)
    batched = generate(pipe, prompts, latents(2))
    for index in range(2):
        alone = generate(pipe, one_prompt(prompts, index), latents(2)[index : index + 1])
        torch.testing.assert_close(batched[index : index + 1], alone, atol=1e-5, rtol=0)


def test_cfg_is_two_calls_per_step_sharing_the_selection(pipe: Any) -> None:
    """The guider calls the transformer under ``cache_context("pred_cond")`` then ``("pred_uncond")``:
    one step, two passes (each its own caches), the second recomputing the first's tokens."""
    state = apply_cat_pruning(pipe, CONFIG)
    calls = record_calls(state, pipe.transformer)
    generate(pipe, hunyuan_prompts(2), latents(2))
    expected = [(step, (name, 0)) for step in range(STEPS) for name in ("pred_cond", "pred_uncond")]
    assert [(step, key) for step, key, _ in calls] == expected
    assert_passes_share_selections(calls)
    assert (state.stats.steps, state.stats.pruned_steps) == (STEPS, STEPS - START)
    assert all(
        set(processor.caches) == {("pred_cond", 0), ("pred_uncond", 0)} for processor in state.processors
    )


def test_3d_selection_keeps_k_tokens_per_prompt_on_the_meta_device() -> None:
    """No host reads or data-dependent shapes of pruning's own: the 3-D grid's selection returns exactly K
    per row on ``meta``, and every call reads only what the unpatched model reads (whether the image
    embeddings are zero, the text masks), answered by ``KnownMetaValues``."""
    with torch.device("meta"):
        transformer = tiny_hunyuan()
    with KnownMetaValues() as known:
        inputs = transformer_inputs(2, "meta")
        start = torch.empty(2, 2 * LATENT_CHANNELS + 1, 3, 4, 4, device="meta")
        with torch.no_grad():
            transformer(start, torch.full((2,), 900.0, device="meta"), **inputs)
        unpatched_reads, known.reads = known.reads, 0
        state = apply_cat_pruning(transformer, CATPruningConfig(start_step=2))
        state.begin_generation(cfg=False)
        modes = []
        with torch.no_grad():
            for step in range(4):
                output = transformer(start, torch.full((2,), 900.0 - step, device="meta"), **inputs)
                modes.append(state.mode)
    assert modes == [StepMode.FULL, StepMode.FILL, StepMode.PRUNED, StepMode.PRUNED]
    assert state.context.grid == Grid(4, 4, 3)
    assert output.sample.shape == (2, LATENT_CHANNELS, 3, 4, 4)
    assert state.indices.shape == (2, round(0.3 * 48))
    assert unpatched_reads > 0 and known.reads == 4 * unpatched_reads


def test_counted_macs_of_a_pruned_step_agree_with_the_adapter_formula() -> None:
    """FlopCounterMode on the real forward (meta) against the adapter's ``step_macs`` within 5%: 121
    frames (31 latent frames) at 32x32 pixels (2x2 latents), CFG as two calls (one row per call), the
    pipelines' 1,985 text tokens (1000 prompt, 256 glyph, 729 image embeddings)."""
    model = tiny_hunyuan(num_layers=3)
    architecture = Architecture("tiny-hunyuan", "hunyuanvideo-1.5", dict(model.config), 1985, 50)
    assert_formula_agrees_with_counted_macs(
        architecture, rows=1, image_tokens=31 * 2 * 2, resolution=32, steps=50, start_step=8
    )


@pytest.mark.slow
def test_the_published_architecture_has_its_size_macs_ratio_and_cache() -> None:
    """HunyuanVideo 1.5 (8.3B) at 480p (480x848) and 121 frames: 31 x 30 x 53 = 49,290 image tokens,
    1,985 text tokens, 50 steps, CFG as two calls; its caches hold every layer's K/V of the image and text
    tokens, and the output tokens, per pass."""
    report = assert_published_architecture(
        "hunyuanvideo-1.5", "HunyuanVideo15Transformer3DModel", 8_326_608_160, 1985, 50, cli_steps=50,
        rows=1, image_tokens=49290, ratio=(0.4, 0.47),
    )  # fmt: skip
    config = ARCHITECTURES["hunyuanvideo-1.5"].config
    width = config["num_attention_heads"] * config["attention_head_dim"]
    per_pass = config["num_layers"] * 2 * (49290 + 1985) * width + 49290 * 32
    assert report["cache_passes"] == 2 and report["frames"] == 121
    assert report["cache_bytes"]["bfloat16"] == 2 * 2 * per_pass  # 45.4 GB


@pytest.mark.slow
def test_compiled_blocks_have_no_graph_breaks_and_a_second_generation_compiles_nothing(pipe: Any) -> None:
    """``compile_repeated_blocks(fullgraph=True)``: the model's own ``forward`` reads its inputs' values
    (whether the image embeddings are zero, the text masks' valid tokens), so only its blocks compile
    without graph breaks, pruned or not."""
    torch._dynamo.reset()
    prompts = hunyuan_prompts(2)
    apply_cat_pruning(pipe, CONFIG)
    assert_compiles_once(pipe, lambda pipe: generate(pipe, prompts, latents(2)), "blocks")


@pytest.mark.slow
def test_whole_model_compile_breaks_only_where_the_unpatched_model_does() -> None:
    """``transformer.compile()`` whole: the model's ``forward`` breaks the graph on its own reads (the
    zero-image-embeddings branch, the masked text join), so ``fullgraph=True`` is impossible, pruned or
    not; pruning adds no graph break of its own, and a second generation compiles nothing."""
    prompts = hunyuan_prompts(2)
    run = lambda pipe: generate(pipe, prompts, latents(2))  # noqa: E731
    reasons = []
    for prune in (False, True):
        torch._dynamo.reset()
        pipe = hunyuan_pipeline(tiny_hunyuan())
        if prune:
            apply_cat_pruning(pipe, CONFIG)
        eager = run(pipe)
        pipe.transformer.compile(backend="eager")
        counters.clear()
        first = run(pipe)
        reasons.append(set(counters["unimplemented"]))
        torch.testing.assert_close(first, eager, atol=1e-6, rtol=0)
    unpatched, pruned = reasons
    assert unpatched and pruned == unpatched
    counters.clear()
    assert torch.equal(run(pipe), first) and counters["stats"]["unique_graphs"] == 0
