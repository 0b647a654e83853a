"""FLUX.3 (base, step-distilled flow map): ``Flux3Transformer2DModel``.

FLUX.3 takes packed latents (B, N, 128) (2x2 patches of 32 VAE channels in raster order, ids (t, h, w, l)
with h and w scaled by 0.5), the text (stacked Qwen3-VL hidden states) and, for image-to-image, the
reference images' packed latents as a separate input (``image_cond_hidden_states``). Each token mode goes
through its own *per-mode* blocks, self-attention within the mode only (5 each for the image, the
reference and the text), then the text and the image and reference tokens run through 28 joint *single*
blocks over [text, image, reference]; only the image tokens reach the output layer.

- **Gather and scatter.** The image tokens are gathered after their embedder (``x_embedders.image``): the
  image's per-mode blocks and the single blocks run on the K selected tokens and attend over cached K/V
  of all N (the per-mode blocks over image keys only, the single blocks over [text, image, reference]
  with the text and reference rows rewritten at every step). ``proj_out`` is the scatter point.
- **Reference images** run through their own per-mode blocks (untouched: they never meet the image tokens
  there) and join the single blocks after the image tokens: a fixed segment of the layout, never
  selected, recomputed at every step. The model drops them before the output layer.
- **Per-token modulation.** The image tokens are modulated at the flow timestep, the reference and text
  tokens at 0 (a flow map adds the embedding of the timestep it jumps to, ``target_timestep``, to all),
  through (B, N, D) tensors expanded inside ``forward``: pre-hooks gather the image modulations' input
  (the per-mode and the single blocks' heads) and the output layer's conditioning at the selected tokens,
  and give the output layer the image rows of the joint sequence.
- **Rotary.** ``pos_embed`` runs on the text, image and reference ids apart and the model concatenates the
  tables: a pre-hook on every image per-mode block and every single block gives each row its own table.
- **Precision.** FLUX.3's processor normalises and rotates q/k in float32 (its q/k norms stay in float32)
  and casts them back; the caching processors do the same.
- **Guidance.** ``Flux3ModularPipeline``'s guider runs classifier-free guidance as two calls per step,
  conditional then unconditional, without ``cache_context``: the step engine reads the second call at the
  same timestep as a second pass ``(None, 1)``, with its own caches. A guider that changes the model for
  some of its calls (``prepare_models``: perturbed-attention, skip-layer, smoothed-energy guidance,
  AutoGuidance) is refused. ``Flux3DistilledModularPipeline`` (the step-distilled flow map,
  ``flow_map=True``) runs 16 steps, one call each, without guidance.
- **Cost.** The formula counts a reference image's tokens with the image's layers (the same shapes): exact
  for text-to-image; with a reference, its per-mode attention is counted over the image and reference keys
  and its rows in the output layer, which the model skips (2.3% above the counted 1024x1024 step with a
  1024x1024 reference).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

from diffusers import Flux3Transformer2DModel
from diffusers.guiders.guider_utils import BaseGuidance
from torch import Tensor, nn

from ..engine import CachingProcessor, StepMode, StepSlot, TokenLayout
from .attention import (
    IMAGE_PROJECTIONS,
    CachedSelfAttentionProcessor,
    PositionalRotaryCall,
    Rotary,
    project_out,
    projections,
)
from .base import PublicModel, TensorFactory, gather_input_hook, gather_rotary_hook, linear_macs
from .flux import FluxAdapter, SingleStreamAttentionProcessor
from .flux2 import Flux2Adapter

_FLUX3 = {
    "in_channels": 128,
    "cond_in_channels": 128,
    "num_layers": 5,
    "num_single_layers": 28,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 20480,
    "timestep_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": (32, 32, 32, 32),
    "rope_theta": 10000,
    "flow_map": False,
}
"""diffusers' default ``Flux3Transformer2DModel`` config, which its single-file loader gives the base
checkpoint (``black-forest-labs/flux-3-image-klein-base``; the repository's ``transformer/config.json`` is
not readable offline): 5 per-mode blocks per mode, 28 single blocks, width 3072, the text as 8 Qwen3-VL
layers of 2560 (20480)."""

TEXT_TOKENS = 320
"""Text tokens for measurement: the pipeline encodes the prompt in Qwen3-VL's chat template, right-padded
to a multiple of 80; its prompt upsampler (on by default) writes captions of "typically 100 to 350 words",
about 300 tokens: 320. The unconditional pass's empty negative prompt is 80 tokens; the tools count both
passes at 320 (with 80 the ratio at 28 steps is 0.523 instead of 0.536: docs/measurement.md, "FLUX.3")."""

FLUX3_PIPELINES = ("Flux3ModularPipeline", "Flux3DistilledModularPipeline")


class Flux3ModeAttentionProcessor(PositionalRotaryCall, CachedSelfAttentionProcessor):
    """The self-attention of the image's per-mode blocks: the selected image tokens over the cached K/V of
    all N, q/k in float32 as FLUX.3's processor computes them."""

    upcast_qk = True


class Flux3SingleStreamProcessor(PositionalRotaryCall, SingleStreamAttentionProcessor):
    """The attention of a FLUX.3 single block over [text, image (+ reference)] through one set of
    projections (q/k in float32), with its own output projection (the block adds the MLP's output)."""

    def attend(
        self, attn: Any, tokens: Tensor, context: Tensor | None, mask: Tensor | None, rotary: Rotary | None
    ) -> Tensor:
        query, key, value = projections(attn, tokens, IMAGE_PROJECTIONS, rotary, upcast=True)  # (B, L, h, d)
        return project_out(attn, self.stream_attention(query, key, value, mask), tokens)  # (B, T+n+R, D)


class Flux3Adapter(FluxAdapter):
    family = "flux3"
    model_class = Flux3Transformer2DModel
    gather_point = "x_embedders.image"
    token_arguments = ()
    blocks = ("txt_mode_blocks", "mode_blocks.image", "mode_blocks.image_cond", "single_transformer_blocks")
    id_axes = 4
    """(t, h, w, l): the image's row and column second and third."""
    cfg_calls = 2
    """The guider's conditional and unconditional calls (the flow map's one: ``PublicModel.cfg_calls``)."""

    scheduler_config: ClassVar[Mapping[str, Any]] = {"shift": 6.93}
    """``Flux3SetTimestepsStep``'s constant shift (linear sigmas 1 .. 1/steps, shifted)."""
    default_steps = 50
    guidance_scale = 3.5
    """The guider's (``ClassifierFreeGuidance``) scale: a second call per step."""
    default_text_tokens = TEXT_TOKENS
    text_tokens_by_pipeline: ClassVar[Mapping[str, int]] = dict.fromkeys(FLUX3_PIPELINES, TEXT_TOKENS)
    vae_config = Flux2Adapter.vae_config
    """FLUX.3 decodes with FLUX.2's ``AutoencoderKLFlux2``: the same stand-in (32 latent channels)."""
    public_models: ClassVar[Mapping[str, PublicModel]] = {
        "flux3": PublicModel(_FLUX3, TEXT_TOKENS),
        "flux3-distilled": PublicModel(
            {**_FLUX3, "flow_map": True}, TEXT_TOKENS, default_steps=16, cfg_calls=1
        ),
    }
    """The base model (50 steps, CFG as two calls) and the step-distilled flow map
    (``flux-3-image-klein``: the same config with the target-timestep embedder, 16 steps, no guidance)."""

    def token_layout(self, model: nn.Module, arguments: dict[str, Any]) -> TokenLayout:
        """The image grid from its ids (as FLUX.1's), the reference tokens (a separate input) fixed."""
        grid = super().token_layout(model, arguments).grid
        reference = arguments.get("image_cond_hidden_states")
        return TokenLayout(grid, 0 if reference is None else reference.shape[1])

    def noise_channels(self, model: nn.Module) -> int:
        return model.config.in_channels

    def noise_tokens(self, model: nn.Module, tokens: Tensor) -> Tensor:
        return tokens  # every output channel is the noise prediction

    def check_pipeline(self, pipeline: Any) -> None:
        guider = getattr(pipeline, "guider", None)
        if guider is not None and type(guider).prepare_models is not BaseGuidance.prepare_models:
            raise ValueError(
                f"CAT pruning: the pipeline's guider {type(guider).__name__} changes the transformer for "
                "some of its calls (prepare_models), which pruning's attention processors and caches would "
                "not follow; use ClassifierFreeGuidance or another guider that only combines the predictions"
            )

    def attention_processors(self, model: nn.Module, slot: StepSlot) -> Iterator[CachingProcessor]:
        """The image's per-mode blocks and the single blocks; the text's and the reference's per-mode blocks
        never see the image tokens and keep their processors."""
        for block in model.mode_blocks["image"]:
            yield Flux3ModeAttentionProcessor(block.attn, slot)
        for block in model.single_transformer_blocks:
            yield Flux3SingleStreamProcessor(block.attn, slot, extra_first=True)

    def hooks(self, model: nn.Module, slot: StepSlot) -> list[Any]:
        """At a pruned step: each row's rotary rows in every block that sees image tokens, the image tokens'
        modulation input (B, N, D) -> (B, K, D) in front of both modulation heads, and the output layer's
        input cut to the image rows with their conditioning gathered."""

        def output_rows(module: nn.Module, args: tuple[Any, ...]) -> Any:
            context = slot.context
            if context is None or context.mode is not StepMode.PRUNED:
                return None
            tokens, conditioning = args  # (B, min(N, K + R), D): the image rows first; (B, N, D)
            return tokens[:, : context.num_kept], context.gather(conditioning)  # (B, K, D) each

        modulation = gather_input_hook(slot)
        mode_rotary = gather_rotary_hook(slot, text_first=False)  # image tokens only
        single_rotary = gather_rotary_hook(slot, text_first=True)  # [text, image, reference]
        return [
            *(
                block.register_forward_pre_hook(mode_rotary, with_kwargs=True)
                for block in model.mode_blocks["image"]
            ),
            *(
                block.register_forward_pre_hook(single_rotary, with_kwargs=True)
                for block in model.single_transformer_blocks
            ),
            model.early_stream_modulations["image"].register_forward_pre_hook(modulation),
            model.single_stream_modulations["image"].register_forward_pre_hook(modulation),
            model.norm_out.register_forward_pre_hook(output_rows),
        ]

    # --- cost

    def block_macs(
        self, block: nn.Module, image_queries: int, image_tokens: int, text_tokens: int, pruned: bool
    ) -> int:
        """A per-mode or single block: its queries (text + image) through attention and MLP, over its keys."""
        attn = block.attn
        queries, keys = text_tokens + image_queries, text_tokens + image_tokens
        per_token = linear_macs(attn.to_q, attn.to_k, attn.to_v, attn.to_out, block.ff)
        return queries * per_token + 2 * queries * keys * attn.inner_dim  # QK^T and AV

    def step_macs(
        self, model: nn.Module, image_queries: int, image_tokens: int, text_tokens: int, pruned: bool
    ) -> int:
        """Per sample: the embedders, the per-token modulation heads, the text's per-mode blocks (text
        only), the image's (with the reference tokens, see the module docstring), the single blocks over
        [text, image, reference] and the output layer."""
        early, single = model.early_stream_modulations, model.single_stream_modulations
        text_layers = linear_macs(model.context_embedder, early["txt"], single["txt"])
        total = image_tokens * self.embedder_macs(model) + text_tokens * text_layers
        total += image_queries * linear_macs(early["image"], single["image"])
        total += sum(
            self.block_macs(block, text_tokens, text_tokens, 0, pruned) for block in model.txt_mode_blocks
        )
        total += sum(
            self.block_macs(block, image_queries, image_tokens, 0, pruned)
            for block in model.mode_blocks["image"]
        )
        total += sum(
            self.block_macs(block, image_queries, image_tokens, text_tokens, pruned)
            for block in model.single_transformer_blocks
        )
        return total + image_queries * linear_macs(model.norm_out, model.proj_out)

    # --- the pipeline around the transformer

    def conditioning(
        self, model: nn.Module, rows: int, text_tokens: int, resolution: int, make: TensorFactory
    ) -> dict[str, Any]:
        """The text and ids, and for a flow map the timestep each step jumps to."""
        arguments = super().conditioning(model, rows, text_tokens, resolution, make)
        if model.config.flow_map:
            arguments["target_timestep"] = make.full((rows,), 0.0)
        return arguments
