"""Tiny real diffusers models and pipelines (random weights, CPU) shared by the tests."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    AutoencoderKLWan,
    ChromaPipeline,
    ChromaTransformer2DModel,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    Flux2Pipeline,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    WanPipeline,
    WanTransformer3DModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from torch._dynamo.utils import counters

from catprune import CATPruningConfig, apply_cat_pruning, remove_cat_pruning
from catprune.engine import StepMode

torch.use_deterministic_algorithms(True)

TEXT_DIM = 32
TEXT_TOKENS = 7
POOLED_DIM = 16


def tiny_sd3(sd35: bool = False, num_layers: int = 2) -> SD3Transformer2DModel:
    """SD3-medium's structure at toy width; ``sd35`` adds dual attention and RMS qk-norm (SD3.5)."""
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=TEXT_DIM,
        caption_projection_dim=32,
        pooled_projection_dim=POOLED_DIM,
        out_channels=4,
        pos_embed_max_size=32,
        dual_attention_layers=(0,) if sd35 else (),
        qk_norm="rms_norm" if sd35 else None,
    ).eval()


def tiny_pixart(additional_conditions: bool = False) -> PixArtTransformer2DModel:
    """PixArt-Sigma's structure (learned sigma: 8 output channels) at toy width; ``additional_conditions``
    gives PixArt-alpha's resolution and aspect-ratio embedders."""
    torch.manual_seed(0)
    return PixArtTransformer2DModel(
        # PixArt-alpha's pipeline passes resolution conditions only for sample_size 128.
        sample_size=128 if additional_conditions else 16,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=12,  # width 24: PixArt-alpha's size embedders need a multiple of 3
        in_channels=4,
        out_channels=8,
        patch_size=2,
        attention_bias=True,
        cross_attention_dim=24,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        caption_channels=TEXT_DIM,
        interpolation_scale=1,
        use_additional_conditions=additional_conditions,
    ).eval()


FLUX_TOY = {
    "patch_size": 1,
    "in_channels": 16,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": TEXT_DIM,
    "axes_dims_rope": (4, 6, 6),
}
"""FLUX.1's layout at toy width (Chroma's too): 2x2-packed latents of 4 channels, 2 heads of 16, rotary axes
summing to the head width."""


def tiny_flux(
    guidance: bool = True, num_layers: int = 1, num_single_layers: int = 2
) -> FluxTransformer2DModel:
    """FLUX.1's structure at toy width: double- then single-stream blocks, rotary axes summing to the
    head width, 2x2-packed latents of 4 channels; ``guidance`` embeds the distilled guidance (dev)."""
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        **FLUX_TOY,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        pooled_projection_dim=POOLED_DIM,
        guidance_embeds=guidance,
    ).eval()


def tiny_chroma(num_layers: int = 1, num_single_layers: int = 2) -> ChromaTransformer2DModel:
    """Chroma's structure at toy width: FLUX.1's blocks and rotary axes, with a small modulation
    approximator (16 input channels, width 32, 2 layers) instead of per-block modulation layers."""
    torch.manual_seed(0)
    return ChromaTransformer2DModel(
        **FLUX_TOY,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        approximator_num_channels=16,
        approximator_hidden_dim=32,
        approximator_layers=2,
    ).eval()


def chroma_pipeline(transformer: ChromaTransformer2DModel) -> ChromaPipeline:
    """A real ``ChromaPipeline`` around ``transformer``, driven with prompt embeddings and masks (no T5)."""
    return flow_matching_pipeline(ChromaPipeline, transformer, None, text_encoders=1)


def tiny_flux2(
    guidance: bool = True, num_layers: int = 1, num_single_layers: int = 2
) -> Flux2Transformer2DModel:
    """FLUX.2's structure at toy width: double- then single-stream blocks (the latter with the fused
    Q/K/V/MLP projection), 2 heads of 16, four rotary axes of 4, 2x2-packed latents of 4 channels;
    ``guidance`` embeds the distilled guidance (dev), without it Klein."""
    torch.manual_seed(0)
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        timestep_guidance_channels=16,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance,
    ).eval()


def flux2_pipeline(transformer: Flux2Transformer2DModel, pipeline_class: type = Flux2Pipeline) -> Any:
    """A real FLUX.2 pipeline (dev's, or ``Flux2KleinPipeline``) around ``transformer``, driven with prompt
    embeddings (no Mistral-3 or Qwen3), with a toy ``AutoencoderKLFlux2`` (downscale 2, 4 latent channels:
    2x2-packed, the transformer's 16; Klein's pipeline reads its batch norm even for latent output, and it
    encodes reference images)."""
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    ).eval()
    return flow_matching_pipeline(pipeline_class, transformer, vae, text_encoders=1)


def tiny_zimage(num_layers: int = 2, num_refiner_layers: int = 1) -> ZImageTransformer2DModel:
    """Z-Image's structure at toy width: noise and context refiners, then single-stream blocks, over 2x2
    patches of 4 latent channels, 2 heads of 16, rotary axes summing to the head width."""
    torch.manual_seed(0)
    return ZImageTransformer2DModel(
        in_channels=4,
        dim=32,
        n_layers=num_layers,
        n_refiner_layers=num_refiner_layers,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=TEXT_DIM,
        axes_dims=[4, 6, 6],
        axes_lens=[256, 64, 64],
    ).eval()


def zimage_pipeline(transformer: ZImageTransformer2DModel) -> ZImagePipeline:
    """A real ``ZImagePipeline`` around ``transformer``, driven with caption features (no Qwen3), no VAE."""
    return flow_matching_pipeline(ZImagePipeline, transformer, None, text_encoders=1)


def tiny_wan(num_layers: int = 2, seed: int = 0, image_dim: int | None = None) -> WanTransformer3DModel:
    """Wan 2.1's structure at toy width: 1x2x2 patches of 4 latent channels, 2 heads of 12 (rotary axes
    4, 4, 4 over frames, rows, columns), self-attention with q/k normalised across heads, cross-attention
    to the text, a feed-forward of 32; ``seed`` draws the weights (Wan 2.2 A14B's second expert: another).
    ``image_dim``: Wan 2.1 I2V's, whose input adds the 4-frame mask and the condition image's latents (12
    channels) and whose cross-attention also attends to CLIP tokens of that width."""
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4 if image_dim is None else 12,
        out_channels=4,
        text_dim=TEXT_DIM,
        freq_dim=16,
        ffn_dim=32,
        num_layers=num_layers,
        rope_max_seq_len=64,
        image_dim=image_dim,
        added_kv_proj_dim=None if image_dim is None else 24,
    ).eval()


def wan_pipeline(
    transformer: WanTransformer3DModel, pipeline_class: type = WanPipeline, **options: Any
) -> Any:
    """A real Wan pipeline (``pipeline_class``: ``WanPipeline`` or ``WanImageToVideoPipeline``) around
    ``transformer``, driven with prompt embeddings (no umT5), with a toy ``AutoencoderKLWan`` (4 latent
    channels; its published 4x temporal and 8x spatial factors, which the pipeline reads to size the
    latents); ``options``: Wan 2.2's ``transformer_2``, ``boundary_ratio``, ``expand_timesteps``, I2V's
    ``image_encoder`` and ``image_processor``."""
    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    ).eval()  # fmt: skip
    return flow_matching_pipeline(pipeline_class, transformer, vae, text_encoders=1, **options)


def tiny_qwen(num_layers: int = 1, zero_cond_t: bool = False) -> QwenImageTransformer2DModel:
    """Qwen-Image's structure at toy width: double-stream blocks over 2x2-packed latents of 4 channels, 2
    heads of 16, rotary axes summing to the head width; ``zero_cond_t`` modulates reference tokens at
    timestep 0 (Qwen-Image-Edit-2511)."""
    torch.manual_seed(0)
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=num_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        axes_dims_rope=(4, 6, 6),
        zero_cond_t=zero_cond_t,
    ).eval()


def qwen_pipeline(
    transformer: QwenImageTransformer2DModel, pipeline_class: type = QwenImagePipeline, **components: Any
) -> Any:
    """A real Qwen-Image pipeline (text-to-image, or Edit with ``vae`` and ``processor``) around
    ``transformer``, driven with prompt embeddings and masks (no Qwen2.5-VL)."""
    vae = components.pop("vae", None)
    return flow_matching_pipeline(pipeline_class, transformer, vae, text_encoders=1, **components)


def flux_pipeline(
    transformer: FluxTransformer2DModel,
    vae: Any = None,
    pipeline_class: type = FluxPipeline,
    **components: Any,
) -> Any:
    """A real Flux pipeline (``pipeline_class``: text-to-image, img2img, ControlNet...) around
    ``transformer``, driven with prompt embeddings (no text encoders: CLIP and T5)."""
    return flow_matching_pipeline(pipeline_class, transformer, vae, text_encoders=2, **components)


def flow_matching_pipeline(
    pipeline_class: type, transformer: Any, vae: Any, text_encoders: int, **components: Any
) -> Any:
    """``pipeline_class`` around ``transformer`` with flow-matching Euler (shift 3), ``vae`` and no text
    encoders or tokenizers (``text_encoders`` of each), quiet."""
    suffixes = ["", *(f"_{number}" for number in range(2, text_encoders + 1))]
    absent = {f"{kind}{suffix}": None for suffix in suffixes for kind in ("text_encoder", "tokenizer")}
    pipe = pipeline_class(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        **absent,
        **components,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_vae(latent_channels: int = 4) -> AutoencoderKL:
    """A VAE at toy size: downscale 2 (32x32 pixels -> 16x16 latents), 4 latent channels (SD3's 16 for
    its inpainting pipeline)."""
    torch.manual_seed(0)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=1.5,
        shift_factor=0.1,  # SD3's pipelines add the VAE's shift when decoding
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()


def sd3_pipeline(
    transformer: SD3Transformer2DModel,
    vae: Any = None,
    pipeline_class: type = StableDiffusion3Pipeline,
    **components: Any,
) -> Any:
    """A real SD3 pipeline (``pipeline_class``: text-to-image, ControlNet, PAG...) around ``transformer``,
    driven with prompt embeddings (no text encoders: CLIP-L, CLIP-G, T5), with ``vae`` and any other
    ``components``."""
    return flow_matching_pipeline(pipeline_class, transformer, vae, text_encoders=3, **components)


def pixart_pipeline(transformer: PixArtTransformer2DModel, alpha: bool = False):
    cls = PixArtAlphaPipeline if alpha else PixArtSigmaPipeline
    pipe = cls(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_prompts(num_prompts: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """Prompt and negative-prompt embeddings for ``num_prompts`` different prompts."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "prompt_embeds": torch.randn(num_prompts, TEXT_TOKENS, TEXT_DIM, generator=generator),
        "pooled_prompt_embeds": torch.randn(num_prompts, POOLED_DIM, generator=generator),
        "negative_prompt_embeds": torch.randn(num_prompts, TEXT_TOKENS, TEXT_DIM, generator=generator),
        "negative_pooled_prompt_embeds": torch.randn(num_prompts, POOLED_DIM, generator=generator),
    }


def pixart_prompts(num_prompts: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """Prompt embeddings with attention masks (the last text tokens are padding)."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(num_prompts, TEXT_TOKENS)
    mask[:, TEXT_TOKENS - 2 :] = 0
    return {
        "negative_prompt": None,
        "prompt_embeds": torch.randn(num_prompts, TEXT_TOKENS, TEXT_DIM, generator=generator),
        "prompt_attention_mask": mask,
        "negative_prompt_embeds": torch.randn(num_prompts, TEXT_TOKENS, TEXT_DIM, generator=generator),
        "negative_prompt_attention_mask": mask.clone(),
    }


def seeded_latents(num_prompts: int, size: int = 16, channels: int = 4, seed: int = 0) -> torch.Tensor:
    """One latent per prompt, each from its own seed, so a prompt's latent is the same alone or batched."""
    return torch.cat(
        [
            torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(seed + i))
            for i in range(num_prompts)
        ]
    )


@pytest.fixture
def sd3_pipe() -> StableDiffusion3Pipeline:
    return sd3_pipeline(tiny_sd3())


def one_prompt(prompts: dict[str, Any], index: int) -> dict[str, Any]:
    """Prompt ``index``'s inputs of a batch of prompt inputs (tensors sliced, settings kept)."""
    return {k: v[index : index + 1] if isinstance(v, torch.Tensor) else v for k, v in prompts.items()}


def record_calls(state: Any, transformer: torch.nn.Module) -> list[tuple[int, Any, torch.Tensor | None]]:
    """(step, pass key, indices at a pruned call) of every later call of ``transformer``, in order."""
    calls: list[tuple[int, Any, torch.Tensor | None]] = []

    def record(module: torch.nn.Module, args: Any, output: Any) -> None:
        context = state.context
        pruned = context.mode is StepMode.PRUNED
        calls.append((context.step, context.pass_key, context.indices.clone() if pruned else None))

    transformer.register_forward_hook(record)
    return calls


def assert_passes_share_selections(
    calls: list[tuple[int, Any, torch.Tensor | None]], passes: int = 2
) -> None:
    """Each step's passes are pruned alike and recompute the tokens its first pass selected."""
    for step in range(0, len(calls), passes):
        first, *others = calls[step : step + passes]
        for other in others:
            assert (first[2] is None) == (other[2] is None)
            assert first[2] is None or torch.equal(first[2], other[2])


def assert_compiles_once(pipe: Any, generate: Any, how: str) -> None:
    """``pipe.transformer`` (pruning applied) compiled whole or by its repeated blocks with
    ``fullgraph=True`` (any graph break raises): whole, one graph per kind of step (full, fill, pruned)
    whatever the passes; a second generation compiles nothing; the outputs are the eager ones."""
    eager = generate(pipe)
    if how == "whole":
        pipe.transformer.compile(fullgraph=True, backend="eager")
    else:
        pipe.transformer.compile_repeated_blocks(fullgraph=True, backend="eager")
    counters.clear()
    first = generate(pipe)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 3 if how == "whole" else graphs > 0
    counters.clear()
    assert torch.equal(generate(pipe), first)
    assert counters["stats"]["unique_graphs"] == 0, "a later generation recompiled"
    torch.testing.assert_close(first, eager, atol=1e-6, rtol=0)


def fill_and_pruned_outputs(
    transformer: torch.nn.Module, tokens: torch.Tensor, inputs: dict[str, Any]
) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """A bare ``transformer`` pruned from step 2 (keep 0.3) called at timestep 0.9 (full), 0.8 (the fill
    step), then 0.8 again with the fill step's inputs (pruned): (engine, fill output, pruned output), which
    agree when the caches are exact after the fill step (an adapter's gather, attention and scatter at
    once). ``tokens`` (B, ...) are the first argument, ``inputs`` the others."""
    state = apply_cat_pruning(transformer, CATPruningConfig(keep_ratio=0.3, start_step=2))
    state.begin_generation()
    modes, outputs = [], []
    with torch.no_grad():
        for timestep in (0.9, 0.8, 0.8):
            outputs.append(
                transformer(tokens, timestep=torch.full(tokens.shape[:1], timestep), **inputs).sample
            )
            modes.append(state.mode)
            tokens = tokens if timestep == 0.8 else tokens - 0.1 * outputs[-1]
    assert modes == [StepMode.FULL, StepMode.FILL, StepMode.PRUNED]
    return state, outputs[1], outputs[2]


def last_meta_output(transformer: torch.nn.Module, tokens: torch.Tensor, inputs: dict[str, Any]) -> Any:
    """``transformer`` and its inputs on ``meta`` (no data: a host read or a data-dependent shape fails),
    pruned from step 2 and called for four steps: (engine, the last pruned step's output)."""
    state = apply_cat_pruning(transformer, CATPruningConfig(start_step=2))
    state.begin_generation()
    modes = []
    with torch.no_grad():
        for step in range(4):
            timestep = torch.full(tokens.shape[:1], 0.9 - step / 10, device="meta")
            output = transformer(tokens, timestep=timestep, **inputs)
            modes.append(state.mode)
    assert modes == [StepMode.FULL, StepMode.FILL, StepMode.PRUNED, StepMode.PRUNED]
    return state, output


def assert_keep_ratio_one_is_unpatched(pipe: Any, generate: Any, steps: int, start: int) -> None:
    """With every token kept, a pruned generation (``generate(pipe)``) equals the unpatched one."""
    reference = generate(pipe)
    state = apply_cat_pruning(pipe, CATPruningConfig(keep_ratio=1.0, start_step=start))
    torch.testing.assert_close(generate(pipe), reference, atol=1e-5, rtol=0)
    assert (state.stats.steps, state.stats.pruned_steps) == (steps, steps - start)


def assert_skipped_steps_return_the_last_outputs(pipe: Any, generate: Any, steps: int, start: int) -> None:
    """With ``skip_every=2`` (no output extrapolation) every second pruned step recomputes no image token:
    each of its calls returns what the same pass returned at the step before, bit for bit."""
    state = apply_cat_pruning(pipe, CATPruningConfig(keep_ratio=0.3, start_step=start, skip_every=2))
    outputs: dict[tuple[int, Any], torch.Tensor] = {}

    def record(module: torch.nn.Module, args: Any, output: Any) -> None:
        if state.context is not None:
            first = output[0]  # (B, ...), or a list of (C, ...) per prompt (Z-Image)
            first = torch.stack(first) if isinstance(first, (list, tuple)) else first
            outputs[state.context.step, state.context.pass_key] = first.clone()

    handle = pipe.transformer.register_forward_hook(record)
    generate(pipe)
    handle.remove()
    skipped = [step for step in range(start, steps) if state.config.skips(step)]
    assert skipped and state.stats.skipped_steps == len(skipped)
    for step, key in outputs:
        if step in skipped:
            assert torch.equal(outputs[step, key], outputs[step - 1, key]), (step, key)
    remove_cat_pruning(pipe)


def assert_unpatched_until_start_and_removed(
    pipe: Any, generate: Any, config: CATPruningConfig, steps: int, passes: int
) -> None:
    """Under ``config`` the calls of the steps before ``start_step`` (the full steps, then the fill step;
    ``passes`` calls each) return the unpatched outputs bit for bit, the later ones differ, and
    ``remove_cat_pruning`` restores the unpatched generation bit for bit."""
    outputs: list[torch.Tensor] = []

    def keep(module: torch.nn.Module, args: Any, output: Any) -> None:
        sample = output[0]  # a tensor, or Z-Image's list of per-sample tensors
        outputs.append(torch.stack(sample) if isinstance(sample, list) else sample.clone())

    pipe.transformer.register_forward_hook(keep)
    reference = generate(pipe)
    unpatched, outputs[:] = list(outputs), []
    state = apply_cat_pruning(pipe, config)
    pruned = generate(pipe)
    for call in range(passes * config.start_step):
        assert torch.equal(outputs[call], unpatched[call]), call
    assert not torch.equal(pruned, reference)
    assert (state.stats.steps, state.stats.pruned_steps) == (steps, steps - config.start_step)
    remove_cat_pruning(pipe)
    assert torch.equal(generate(pipe), reference)


def macs_cli(name: str, steps: int) -> dict[str, Any]:
    """``catprune macs --model NAME --steps STEPS --json``'s report, run as a user runs it."""
    command = [sys.executable, "-m", "catprune", "macs", "--model", name, "--steps", str(steps), "--json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    return json.loads(result.stdout)


def assert_formula_agrees_with_counted_macs(
    architecture: Any,
    rows: int,
    image_tokens: int,
    resolution: int = 256,
    steps: int = 10,
    start_step: int = 4,
) -> None:
    """FlopCounterMode on the real forward (meta) against the adapter's ``step_macs``, within 5%, for full
    and pruned steps; ``rows`` per call, ``image_tokens`` of which ``round(0.3 * N)`` are kept."""
    from catprune.measure import count_macs

    report = count_macs(architecture, resolution=resolution, steps=steps, start_step=start_step)
    assert report.rows == rows
    assert report.image_tokens == image_tokens and report.kept_tokens == round(0.3 * image_tokens)
    assert report.pruned_step.macs == pytest.approx(report.analytic_pruned_step, rel=0.05)
    assert report.full_step.macs == pytest.approx(report.analytic_full_step, rel=0.05)


def assert_published_architecture(
    name: str,
    model_class: str,
    parameters: int,
    text_tokens: int,
    default_steps: int,
    cli_steps: int,
    rows: int,
    image_tokens: int,
    ratio: tuple[float, float],
) -> dict[str, Any]:
    """A named architecture built on ``meta`` has the published parameter count and the pipeline's text
    tokens and steps, and ``catprune macs --model NAME --json`` reports its class, rows, tokens and a ratio
    in ``ratio``; returns that report."""
    from catprune.architectures import ARCHITECTURES

    architecture = ARCHITECTURES[name]
    assert sum(p.numel() for p in architecture.build().parameters()) == parameters
    assert (architecture.text_tokens, architecture.default_steps) == (text_tokens, default_steps)
    report = macs_cli(name, cli_steps)
    assert report["class"] == model_class and report["rows"] == rows
    assert (report["image_tokens"], report["text_tokens"]) == (image_tokens, text_tokens)
    assert ratio[0] < report["ratio"] < ratio[1]
    return report
