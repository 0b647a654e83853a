"""PixArt-Sigma and PixArt-alpha (DiT with cross-attention): ``PixArtTransformer2DModel``.

Text enters only through cross-attention, so a pruned step recomputes the selected image tokens alone:
their self-attention reads the cached K/V of all image tokens, their cross-attention reuses the text's
K/V (computed once per generation). With learned sigma the model outputs noise and variance channels;
selection looks at the noise half.
"""

from __future__ import annotations

from collections.abc import Iterator

from diffusers import PixArtTransformer2DModel
from torch import nn

from ..pruning import CachedSelfAttentionProcessor, Processor, PruningState, ReusedTextAttentionProcessor
from .base import ModelAdapter, linear_macs


class PixArtAdapter(ModelAdapter):
    model_class = PixArtTransformer2DModel
    text_embedder = "caption_projection"

    def noise_channels(self, model: nn.Module) -> int:
        learned_sigma = model.out_channels == 2 * model.config.in_channels
        return model.config.in_channels if learned_sigma else model.out_channels

    def attention_processors(self, model: nn.Module, state: PruningState) -> Iterator[Processor]:
        for block in model.transformer_blocks:
            yield CachedSelfAttentionProcessor(block.attn1, state)
            yield ReusedTextAttentionProcessor(block.attn2, state)

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
