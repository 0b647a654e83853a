"""Stable Diffusion 3 / 3.5 (MMDiT): ``SD3Transformer2DModel``.

Every block's joint attention mixes image and text tokens: at a pruned step the selected image tokens
and all text tokens are recomputed, and attend over the cached K/V of all image tokens. SD3.5's
dual-attention blocks add an image-only self-attention (``attn2``), cached the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from diffusers import SD3Transformer2DModel
from torch import nn

from ..pruning import CachedSelfAttentionProcessor, PruningState
from .base import ModelAdapter, linear_macs


class SD3Adapter(ModelAdapter):
    model_class = SD3Transformer2DModel
    text_embedder = "context_embedder"

    def is_auxiliary_call(self, arguments: dict[str, Any]) -> bool:
        """The pipeline's skip-layer-guidance call (``skip_layers=...``) is an extra call within a step."""
        return arguments.get("skip_layers") is not None

    def attention_processors(
        self, model: nn.Module, state: PruningState
    ) -> Iterator[CachedSelfAttentionProcessor]:
        for block in model.transformer_blocks:
            yield CachedSelfAttentionProcessor(block.attn, state)
            if block.attn2 is not None:
                yield CachedSelfAttentionProcessor(block.attn2, state)

    def block_macs(
        self, block: nn.Module, image_queries: int, image_tokens: int, text_tokens: int, pruned: bool
    ) -> int:
        attn = block.attn
        image = linear_macs(attn.to_q, attn.to_k, attn.to_v, attn.to_out, block.ff, block.attn2)
        text = linear_macs(
            attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.to_add_out, block.ff_context
        )
        # QK^T and AV: queries x keys x width, twice; SD3.5's image-only attention likewise.
        joint = 2 * (image_queries + text_tokens) * (image_tokens + text_tokens) * attn.inner_dim
        dual = 2 * image_queries * image_tokens * block.attn2.inner_dim if block.attn2 is not None else 0
        return image_queries * image + text_tokens * text + joint + dual
