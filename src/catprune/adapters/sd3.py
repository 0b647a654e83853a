"""Stable Diffusion 3 / 3.5 (MMDiT): ``SD3Transformer2DModel``.

Every block's joint attention mixes image and text tokens: at a pruned step the selected image tokens
and all text tokens are recomputed, and attend over the cached K/V of all image tokens. SD3.5's
dual-attention blocks add an image-only self-attention (``attn2``), cached the same way.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from torch import nn

from ..engine import StepSlot
from .attention import CachedSelfAttentionProcessor, JointAttentionProcessor, joint_block_macs
from .base import KL_AUTOENCODER, PatchedLatentAdapter, PublicModel, TensorFactory, linear_macs

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


class SD3Adapter(PatchedLatentAdapter):
    family = "sd3"
    model_class = SD3Transformer2DModel
    gather_point = "pos_embed"
    scatter_point = "proj_out"
    token_arguments = ("block_controlnet_hidden_states",)
    cfg_batch = 2
    text_embedder = "context_embedder"
    blocks = ("transformer_blocks",)

    scheduler_class = FlowMatchEulerDiscreteScheduler
    scheduler_config: ClassVar[Mapping[str, Any]] = {"shift": 3.0}
    default_steps = 28
    guidance_scale = 7.0
    default_text_tokens = TEXT_TOKENS
    text_tokens_by_pipeline: ClassVar[Mapping[str, int]] = {"StableDiffusion3Pipeline": TEXT_TOKENS}
    vae_config: ClassVar[Mapping[str, Any]] = {
        **KL_AUTOENCODER,
        "latent_channels": 16,
        "scaling_factor": 1.5305,
        "shift_factor": 0.0609,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    }
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
        self, model: nn.Module, slot: StepSlot
    ) -> Iterator[CachedSelfAttentionProcessor]:
        for block in model.transformer_blocks:
            yield JointAttentionProcessor(block.attn, slot)
            if block.attn2 is not None:
                yield CachedSelfAttentionProcessor(block.attn2, slot)

    def block_macs(
        self, block: nn.Module, image_queries: int, image_tokens: int, text_tokens: int, pruned: bool
    ) -> int:
        joint = joint_block_macs(block, image_queries, image_tokens, text_tokens)
        if block.attn2 is None:
            return joint
        # SD3.5's image-only attention: its projections, then QK^T and AV over the image tokens.
        attn2 = block.attn2
        return joint + image_queries * (linear_macs(attn2) + 2 * image_tokens * attn2.inner_dim)

    def conditioning(
        self, model: nn.Module, rows: int, text_tokens: int, resolution: int, make: TensorFactory
    ) -> dict[str, Any]:
        config = model.config
        return {
            "encoder_hidden_states": make.randn(rows, text_tokens, config.joint_attention_dim),
            "pooled_projections": make.randn(rows, config.pooled_projection_dim),
        }
