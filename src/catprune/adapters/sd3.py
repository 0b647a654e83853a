"""Stable Diffusion 3 / 3.5 (MMDiT): ``SD3Transformer2DModel``.

Every block's joint attention mixes image and text tokens: at a pruned step the selected image tokens
and all text tokens are recomputed, and attend over the cached K/V of all image tokens. SD3.5's
dual-attention blocks add an image-only self-attention (``attn2``), cached the same way.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from torch import Tensor, nn

from ..pruning import PruningState
from .attention import CachedSelfAttentionProcessor, Projections, projections
from .base import PatchedLatentAdapter, PublicModel, TensorFactory, linear_macs

TEXT_TOKENS = 333
"""What ``StableDiffusion3Pipeline`` feeds the transformer: 77 CLIP tokens (CLIP-L + CLIP-G, padded to
T5's width) + 256 T5 tokens."""

_SD3_MEDIUM = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "num_attention_heads": 24,
    "attention_head_dim": 64,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
}
"""``stabilityai/stable-diffusion-3-medium-diffusers``, ``transformer/config.json``."""


MINIATURE = PublicModel(
    {
        **_SD3_MEDIUM,
        "sample_size": 64,
        "num_layers": 4,
        "num_attention_heads": 4,
        "joint_attention_dim": 256,
        "caption_projection_dim": 256,
        "pooled_projection_dim": 64,
        "pos_embed_max_size": 96,
    },
    TEXT_TOKENS,
)
"""SD3's structure at width 256 (4 heads x 64) with 4 blocks, fed as many text tokens as SD3: a CPU demo."""


TEXT_PROJECTIONS = ("add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k")
"""The layers of SD3's joint attention that project the text tokens: Q, K, V, Q norm, K norm."""


class JointAttentionProcessor(CachedSelfAttentionProcessor):
    """SD3's joint attention: the text tokens' Q, K, V (``add_*_proj``) join the image tokens' every step,
    and their output goes through ``to_add_out`` unless the block is ``context_pre_only``."""

    def extra_projections(self, attn: Any, context: Tensor | None) -> Projections | None:
        if context is None:
            return None
        return projections(attn, context, TEXT_PROJECTIONS)  # (B, T, h, d) each

    def finish(self, attn: Any, image_out: Tensor, extra_out: Tensor | None) -> Any:
        if extra_out is None:
            return image_out
        if not attn.context_pre_only:
            extra_out = attn.to_add_out(extra_out)
        return image_out, extra_out


class SD3Adapter(PatchedLatentAdapter):
    family = "sd3"
    model_class = SD3Transformer2DModel
    embedder = "pos_embed"
    output_projection = "proj_out"
    token_arguments = ("block_controlnet_hidden_states",)
    text_embedder = "context_embedder"
    blocks = "transformer_blocks"

    scheduler_class = FlowMatchEulerDiscreteScheduler
    scheduler_config: ClassVar[Mapping[str, Any]] = {"shift": 3.0}
    default_steps = 28
    guidance_scale = 7.0
    default_text_tokens = TEXT_TOKENS
    text_tokens_by_pipeline: ClassVar[Mapping[str, int]] = {"StableDiffusion3Pipeline": TEXT_TOKENS}
    public_models: ClassVar[Mapping[str, PublicModel]] = {
        "sd3-medium": PublicModel(_SD3_MEDIUM, TEXT_TOKENS),
        "sd3.5-medium": PublicModel(
            {
                **_SD3_MEDIUM,
                "pos_embed_max_size": 384,
                "dual_attention_layers": tuple(range(13)),
                "qk_norm": "rms_norm",
            },
            TEXT_TOKENS,
        ),
        "sd3.5-large": PublicModel(
            {
                **_SD3_MEDIUM,
                "num_layers": 38,
                "num_attention_heads": 38,
                "caption_projection_dim": 2432,
                "qk_norm": "rms_norm",
            },
            TEXT_TOKENS,
        ),
    }

    def noise_channels(self, model: nn.Module) -> int:
        return model.out_channels

    def text_tokens(self, arguments: dict[str, Any]) -> int:
        return arguments["encoder_hidden_states"].shape[1]

    def is_auxiliary_call(self, arguments: dict[str, Any]) -> bool:
        """The pipeline's skip-layer-guidance call (``skip_layers=...``) is an extra call within a step."""
        return arguments.get("skip_layers") is not None

    def attention_processors(
        self, model: nn.Module, state: PruningState
    ) -> Iterator[CachedSelfAttentionProcessor]:
        for block in model.transformer_blocks:
            yield JointAttentionProcessor(block.attn, state)
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

    def conditioning(
        self, model: nn.Module, rows: int, text_tokens: int, resolution: int, make: TensorFactory
    ) -> dict[str, Any]:
        config = model.config
        return {
            "encoder_hidden_states": make.randn(rows, text_tokens, config.joint_attention_dim),
            "pooled_projections": make.randn(rows, config.pooled_projection_dim),
        }
