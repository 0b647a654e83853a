"""PixArt-Sigma and PixArt-alpha (DiT with cross-attention): ``PixArtTransformer2DModel``.

Text enters only through cross-attention, so a pruned step recomputes the selected image tokens alone:
their self-attention reads the cached K/V of all image tokens, their cross-attention reuses the text's
K/V (computed once per generation). With learned sigma the model outputs noise and variance channels;
selection and the scheduler look at the noise half.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel
from torch import Tensor, nn

from ..engine import CachingProcessor, StepSlot
from .attention import CachedSelfAttentionProcessor, attend, project_out, split_heads
from .base import KL_AUTOENCODER, PatchedLatentAdapter, PublicModel, TensorFactory, linear_macs

_PIXART_SIGMA = {
    "sample_size": 128,
    "num_layers": 28,
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": 8,
    "patch_size": 2,
    "attention_bias": True,
    "cross_attention_dim": 1152,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "caption_channels": 4096,
    "interpolation_scale": 2,
    "use_additional_conditions": False,
}
"""``PixArt-alpha/PixArt-Sigma-XL-2-1024-MS``, ``transformer/config.json``."""


def noise_channels(in_channels: int, out_channels: int) -> int:
    """With learned sigma (twice the input channels out) the first half is the noise, the rest variance."""
    return in_channels if out_channels == 2 * in_channels else out_channels


class ReusedTextAttentionProcessor(CachingProcessor):
    """Cross-attention from image tokens to text tokens: the text's K and V do not change between steps,
    so from the fill step on they are computed once per generation and reused; queries are computed for
    the image tokens that go through the block (the selected ones at a pruned step)."""

    def attend(
        self, attn: Any, tokens: Tensor, context: Tensor | None, mask: Tensor | None, rotary: Any
    ) -> Any:
        batch, heads = tokens.shape[0], attn.heads
        if self.cache.empty:
            key = split_heads(attn.to_k(context), heads)  # (B, T, h, d)
            value = split_heads(attn.to_v(context), heads)  # (B, T, h, d)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            self.cache.keep(key, value)
        query = split_heads(attn.to_q(tokens), heads)  # (B, n, h, d)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if mask is not None:
            mask = attn.prepare_attention_mask(mask, self.cache.key.shape[1], batch)
            mask = mask.view(batch, heads, -1, mask.shape[-1])  # (B, h, 1, T)
        return project_out(attn, attend(query, self.cache.key, self.cache.value, mask), tokens)


class PixArtAdapter(PatchedLatentAdapter):
    family = "pixart"
    model_class = PixArtTransformer2DModel
    gather_point = "pos_embed"
    scatter_point = "proj_out"
    token_arguments = ()
    cfg_batch = 2
    text_embedder = "caption_projection"
    blocks = ("transformer_blocks",)

    scheduler_class = DPMSolverMultistepScheduler
    scheduler_config: ClassVar[Mapping[str, Any]] = {}
    default_steps = 20
    guidance_scale = 4.5
    default_text_tokens = 300
    """``PixArtSigmaPipeline``: max_sequence_length=300 T5 tokens, through cross-attention only."""
    text_tokens_by_pipeline: ClassVar[Mapping[str, int]] = {
        "PixArtSigmaPipeline": 300,
        "PixArtAlphaPipeline": 120,
    }
    vae_config: ClassVar[Mapping[str, Any]] = {
        **KL_AUTOENCODER,
        "latent_channels": 4,
        "scaling_factor": 0.13025,
    }
    """PixArt-Sigma's SDXL VAE."""
    public_models: ClassVar[Mapping[str, PublicModel]] = {
        "pixart-sigma": PublicModel(_PIXART_SIGMA, 300),
        "pixart-alpha": PublicModel({**_PIXART_SIGMA, "use_additional_conditions": True}, 120),
    }

    def noise_channels(self, model: nn.Module) -> int:
        return noise_channels(model.config.in_channels, model.out_channels)

    def text_tokens(self, arguments: dict[str, Any]) -> int:
        return arguments["encoder_hidden_states"].shape[1]

    def attention_processors(self, model: nn.Module, slot: StepSlot) -> Iterator[CachingProcessor]:
        for block in model.transformer_blocks:
            yield CachedSelfAttentionProcessor(block.attn1, slot)
            yield ReusedTextAttentionProcessor(block.attn2, slot)

    def block_macs(
        self, block: nn.Module, image_queries: int, image_tokens: int, text_tokens: int, pruned: bool
    ) -> int:
        self_attn, cross_attn = block.attn1, block.attn2
        image = linear_macs(self_attn, cross_attn.to_q, cross_attn.to_out, block.ff)
        # The text's K/V: computed at every full step, reused at pruned steps.
        text_kv = 0 if pruned else text_tokens * linear_macs(cross_attn.to_k, cross_attn.to_v)
        attention = (
            2 * image_queries * (image_tokens * self_attn.inner_dim + text_tokens * cross_attn.inner_dim)
        )
        return image_queries * image + text_kv + attention

    def conditioning(
        self, model: nn.Module, rows: int, text_tokens: int, resolution: int, make: TensorFactory
    ) -> dict[str, Any]:
        micro_conditions: dict[str, torch.Tensor | None] = {"resolution": None, "aspect_ratio": None}
        if model.use_additional_conditions:  # PixArt-alpha's pipeline passes the image size
            micro_conditions = {
                "resolution": make.full((rows, 2), resolution),
                "aspect_ratio": make.full((rows, 1), 1),
            }
        return {
            "encoder_hidden_states": make.randn(rows, text_tokens, model.config.caption_channels),
            "encoder_attention_mask": make.full((rows, text_tokens), 1),
            "added_cond_kwargs": micro_conditions,
        }
