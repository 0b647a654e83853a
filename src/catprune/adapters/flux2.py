"""FLUX.2 (dev, Klein): ``Flux2Transformer2DModel``.

FLUX.2 keeps FLUX.1's plan (packed latents, image ids in raster order, double-stream then single-stream
blocks, text first in every sequence) at other sizes: latents packed to (B, N, 128) (2x2 patches of 32
VAE channels), 8 double-stream and 48 single-stream blocks in FLUX.2-dev (Klein 4B: 5 and 20), ids with 4
axes (t, h, w, l). So the Flux adapter's gather and scatter points, token layout (the generated image's
grid from the ids; a reference image's tokens, whose ``t`` is 10, 20..., a fixed segment recomputed at
every step), double-stream caching processor and cost formula apply. What differs:

- **Rotary.** ``pos_embed`` is called twice, on the image ids and on the text ids, and the model concatenates
  the two tables ``[text, image]`` itself, so a hook on ``pos_embed`` cannot give each row its own table
  (the model's ``cat`` joins them along the tokens of a shared table). A pre-hook on every block gathers the
  concatenated table instead: (T + N + R, d) -> each row's (B, T + K + R, d) at a pruned step.
- **Single-stream blocks** project Q, K, V and the MLP's input in one fused layer (``to_qkv_mlp_proj``) and
  mix the attention and MLP outputs in one (``to_out``), all inside the attention processor: the caching
  processor runs both for the text, selected image and fixed tokens, the attention over the cached K/V of
  all image tokens.
- **Modulation** is one set per block kind for the whole model, per sample (nothing per token).
- **Guidance.** ``Flux2Pipeline`` (dev) is guidance-distilled: one call per step, ``guidance`` an input.
  ``Flux2KleinPipeline`` on a base (not distilled) checkpoint runs true CFG as a second call per step under
  ``cache_context("uncond")`` (another pass, its own caches); the distilled Klein runs 4 steps, one call
  each, which leaves pruning little (see ``catprune macs`` and docs/models.md on few-step models).
- ``Flux2KleinKVPipeline``'s reference K/V cache (``kv_cache_mode``) prepends the reference tokens and
  drops them after the first step: refused (the model's own reference cache and CAT's K/V caches would
  have to be one).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from diffusers import Flux2Transformer2DModel
from diffusers.models.transformers.transformer_flux2 import Flux2SingleTransformerBlock
from torch import Tensor, nn

from ..engine import StepSlot, TokenLayout
from .attention import PositionalRotaryCall, Rotary, rotate, split_heads
from .base import KL_AUTOENCODER, PublicModel, gather_rotary_hook
from .flux import FluxAdapter, SingleStreamAttentionProcessor

_FLUX2_DEV = {
    "patch_size": 1,
    "in_channels": 128,
    "num_layers": 8,
    "num_single_layers": 48,
    "attention_head_dim": 128,
    "num_attention_heads": 48,
    "joint_attention_dim": 15360,
    "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": (32, 32, 32, 32),
    "rope_theta": 2000,
    "guidance_embeds": True,
}
"""``black-forest-labs/FLUX.2-dev``, ``transformer/config.json`` (diffusers' defaults): 32.2B parameters."""

_FLUX2_KLEIN_4B = {
    **_FLUX2_DEV,
    "num_layers": 5,
    "num_single_layers": 20,
    "num_attention_heads": 24,
    "joint_attention_dim": 7680,
    "guidance_embeds": False,
}
"""``black-forest-labs/FLUX.2-klein-4B``, ``transformer/config.json``: 3.9B parameters, Qwen3-4B's hidden
states of three layers (3 x 2560) as the text input, no guidance embedding (distilled to 4 steps)."""

FLUX2_PIPELINES = ("Flux2Pipeline", "Flux2KleinPipeline", "Flux2KleinInpaintPipeline")


class Flux2SingleStreamProcessor(PositionalRotaryCall, SingleStreamAttentionProcessor):
    """The attention of a FLUX.2 single-stream block with the MLP fused into it: one projection of
    [text, image (+ fixed)] gives Q, K, V and the MLP's input; the attention output and the MLP's output go
    through one output projection. diffusers' ``Flux2ParallelSelfAttention`` passes its processor
    ``(hidden_states, attention_mask, image_rotary_emb)`` positionally."""

    def attend(
        self, attn: Any, tokens: Tensor, context: Tensor | None, mask: Tensor | None, rotary: Rotary | None
    ) -> Tensor:
        projected = attn.to_qkv_mlp_proj(tokens)  # (B, T+n+R, 3 h d + 2 m)
        width = 3 * attn.inner_dim
        qkv, mlp = projected.split([width, projected.shape[-1] - width], dim=-1)
        query, key, value = (split_heads(part, attn.heads) for part in qkv.chunk(3, dim=-1))  # (B, L, h, d)
        query, key = attn.norm_q(query), attn.norm_k(key)
        if rotary is not None:
            query, key = rotate(query, rotary), rotate(key, rotary)
        out = self.stream_attention(query, key, value, mask)  # (B, T+n+R, h d)
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))


class Flux2Adapter(FluxAdapter):
    family = "flux2"
    model_class = Flux2Transformer2DModel
    token_arguments = ()
    single_blocks = (Flux2SingleTransformerBlock,)
    single_processor = Flux2SingleStreamProcessor
    id_axes = 4
    """(t, h, w, l): the image's row and column second and third, as in FLUX.1."""
    context_parallel = None
    """Not under context parallelism yet: its per-block rotary gather reads the whole text (untested)."""

    default_steps = 50
    """``Flux2Pipeline``'s and ``Flux2KleinPipeline``'s ``num_inference_steps``."""
    guidance_scale = 4.0
    """FLUX.2-dev's distilled guidance (an input of the transformer); Klein base: true CFG's scale."""
    default_text_tokens = 512
    """``max_sequence_length=512`` text tokens, padded to it (Mistral-3 for dev, Qwen3 for Klein)."""
    text_tokens_by_pipeline: ClassVar[Mapping[str, int]] = dict.fromkeys(FLUX2_PIPELINES, 512)
    vae_config: ClassVar[Mapping[str, Any]] = {**KL_AUTOENCODER, "latent_channels": 32}
    """A stand-in: FLUX.2's VAE (``AutoencoderKLFlux2``) is this layout with 32 latent channels and a batch
    norm over the packed latents, which ``catprune bench --decode`` does not build; the decode costs the
    same."""
    public_models: ClassVar[Mapping[str, PublicModel]] = {
        "flux2-dev": PublicModel(_FLUX2_DEV, 512),
        "flux2-klein": PublicModel(_FLUX2_KLEIN_4B, 512, default_steps=4),
    }

    def token_layout(self, model: nn.Module, arguments: dict[str, Any]) -> TokenLayout:
        if arguments.get("kv_cache_mode") is not None:
            raise ValueError(
                "CAT pruning: FLUX.2's reference K/V cache (kv_cache_mode, Flux2KleinKVPipeline) prepends "
                "the reference tokens at the first step and drops them later; use Flux2KleinPipeline"
            )
        return super().token_layout(model, arguments)

    def hooks(self, model: nn.Module, slot: StepSlot) -> list[Any]:
        """At a pruned step every block gets each row's rotary table over its text, selected image and
        fixed tokens (B, T+K+R, d), gathered from the model's [text, image] table."""

        gather_rotary = gather_rotary_hook(slot, text_first=True)
        return [
            block.register_forward_pre_hook(gather_rotary, with_kwargs=True)
            for blocks in (model.transformer_blocks, model.single_transformer_blocks)
            for block in blocks
        ]

    # --- cost

    def single_block_layers(self, block: nn.Module) -> tuple[nn.Module, ...]:
        return block.attn.to_qkv_mlp_proj, block.attn.to_out
