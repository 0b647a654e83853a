"""HunyuanVideo 1.5 (T2V, I2V): ``HunyuanVideo15Transformer3DModel``.

The pipelines concatenate the noisy video latents (B, 32, F, H, W) with a condition (32 channels) and its
mask (1 channel) along the channels: zeros for text-to-video, the first frame's VAE latents (and a mask of
1 on it) for image-to-video. ``x_embedder`` (a ``Conv3d`` of 1x1x1 patches) gives the (B, N, D) image
tokens in (frame, row, column) order; 54 double-stream blocks run a joint attention over [image, text]
with separate weights for each; ``norm_out`` and ``proj_out`` give each token its 32 output channels.

- **Gather and scatter.** After ``x_embedder`` (its output is the (B, N, D) sequence) and after
  ``proj_out``, before the model's unpatchify. The grid is ``Grid(H, W, F)`` of the latents: its raster
  order is the embedder's flatten order, and selection clusters and encodes positions over frames x
  height x width.
- **Rotary.** ``rope`` returns (cos, sin), each (N, d), over the image tokens only (the text is not
  rotated); a hook gives each row its selected tokens' rows (B, K, d) at a pruned step.
- **Text.** The "text" of every block is three sequences the model embeds and joins per sample: the
  SigLIP image embeddings (729 tokens; zeros and masked out for text-to-video), the ByT5 glyph tokens
  (256) and the Qwen2.5-VL prompt tokens (1000, through a two-block token refiner), the valid tokens of
  each moved first. The pipelines pad them to fixed lengths, so a call has 1,985 text tokens, recomputed
  at every step like any joint attention's text.
- **Mask.** The model passes the text mask (B, T) and its processor builds the mask of every query and
  key pair over [image, text]. The caching processor masks the padded text tokens as keys only: the image
  tokens' outputs are the model's (a masked key has weight 0 for every query), and the padded text
  tokens, whose own attention the model leaves at 0, are never attended to by any token and are dropped
  at the end. A (K + T) x (N + T) mask is never built.
- **Image-to-video.** The condition image enters through the channels (the first frame's latents and
  mask, part of each token's input) and through the 729 SigLIP tokens on the text side: no image-grid
  tokens are added, so nothing is a fixed segment.
- **Guidance.** The pipelines' ``ClassifierFreeGuidance`` guider calls the transformer twice per step,
  under ``cache_context("pred_cond")`` then ``("pred_uncond")``: two passes, each with its own caches.
- **Host reads of the model's own.** ``forward`` reads ``torch.all(image_embeds == 0)`` (text-to-video or
  not) and joins the text sequences with boolean masks (data-dependent shapes), before any block, at every
  call, pruned or not: the whole model cannot be compiled with ``fullgraph=True`` (its blocks can:
  ``compile_repeated_blocks``), nor run on ``meta`` without values for those reads
  (``catprune.measure.KnownMetaValues`` gives them).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideo15Transformer3DModel
from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0
from torch import Tensor, nn

from ..engine import CachingProcessor, Grid, StepSlot
from .attention import JointAttentionProcessor, Rotary, joint_block_macs
from .base import ModelAdapter, PublicModel, TensorFactory, linear_macs

_HUNYUANVIDEO_15 = {
    "in_channels": 65,
    "out_channels": 32,
    "num_attention_heads": 16,
    "attention_head_dim": 128,
    "num_layers": 54,
    "num_refiner_layers": 2,
    "mlp_ratio": 4.0,
    "patch_size": 1,
    "patch_size_t": 1,
    "qk_norm": "rms_norm",
    "text_embed_dim": 3584,
    "text_embed_2_dim": 1472,
    "image_embed_dim": 1152,
    "rope_theta": 256.0,
    "rope_axes_dim": (16, 56, 56),
}
"""diffusers' ``HunyuanVideo15Transformer3DModel`` defaults (the published 8.3B architecture: 54 blocks of
width 2048): 8,326,608,160 parameters."""

PROMPT_TOKENS = 1000
"""Qwen2.5-VL tokens: the pipelines pad every prompt to ``tokenizer_max_length=1000`` (after the 108-token
template is cropped)."""

GLYPH_TOKENS = 256
"""ByT5 tokens of the quoted text in the prompt: padded to ``tokenizer_2_max_length=256``."""

VISION_TOKENS = 729
"""SigLIP tokens of the condition image (``vision_num_semantic_tokens``): zeros for text-to-video."""

TEXT_TOKENS = PROMPT_TOKENS + GLYPH_TOKENS + VISION_TOKENS
"""Text-side tokens of every call: 1,985."""

FRAMES = 121
"""Frames of a generation: the pipelines' ``num_frames`` (31 latent frames)."""

WIDTHS = {480: 848, 720: 1280}
"""The 16:9 video sizes by height (480p: 480x848, 720p: 720x1280); other heights: square."""

TEMPORAL_COMPRESSION, SPATIAL_COMPRESSION = 4, 16
"""``AutoencoderKLHunyuanVideo15``: 4x in time (the first frame alone), 16x in space."""

HUNYUAN_PIPELINES = ("HunyuanVideo15Pipeline", "HunyuanVideo15ImageToVideoPipeline")


class HunyuanVideo15AttentionProcessor(JointAttentionProcessor):
    """The joint attention of HunyuanVideo 1.5's blocks: [image, text] in the caches as in the model, the
    rotary table over the image tokens only, the text mask as a key mask over [every image token, text].
    Its ``__call__`` names the inputs, since diffusers' ``Attention`` passes a processor only those."""

    extra_rotary = False

    def __call__(  # type: ignore[override]
        self,
        attn: Any,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_rotary_emb: Rotary | None = None,
    ) -> Any:
        return super().__call__(
            attn,
            hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            image_rotary_emb=image_rotary_emb,
        )

    def attend(
        self, attn: Any, tokens: Tensor, context: Tensor | None, mask: Tensor | None, rotary: Rotary | None
    ) -> Any:
        if mask is not None:  # (B, T) the valid text tokens -> the keys' (B, 1, 1, N + T)
            image = mask.new_ones(mask.shape[0], self.context.num_tokens)  # (B, N)
            mask = torch.cat([image, mask], dim=1).bool()[:, None, None, :]
        return super().attend(attn, tokens, context, mask, rotary)


class HunyuanVideo15Adapter(ModelAdapter):
    family = "hunyuanvideo-1.5"
    model_class = HunyuanVideo15Transformer3DModel
    gather_point = "x_embedder"
    scatter_point = "proj_out"
    token_arguments = ()
    plain_processors = (HunyuanVideo15AttnProcessor2_0,)
    cfg_batch = 1
    """CFG as a second call per step (``cache_context("pred_uncond")``): one row per prompt per call."""
    cfg_calls = 2
    default_resolution = 480
    default_frames = FRAMES
    video_widths = WIDTHS
    text_embedder = "context_embedder"
    blocks = ("transformer_blocks",)

    scheduler_class = FlowMatchEulerDiscreteScheduler
    scheduler_config: ClassVar[Mapping[str, Any]] = {"shift": 5.0}
    """The 480p pipelines' flow shift (720p: 9.0); the pipelines pass sigmas 1 -> 0 in equal steps."""
    default_steps = 50
    guidance_scale = 6.0
    default_text_tokens = TEXT_TOKENS
    text_tokens_by_pipeline: ClassVar[Mapping[str, int]] = dict.fromkeys(HUNYUAN_PIPELINES, TEXT_TOKENS)
    vae_config: ClassVar[Mapping[str, Any]] = {}
    """HunyuanVideo 1.5's VAE (``AutoencoderKLHunyuanVideo15``, 3-D) is not an ``AutoencoderKL``:
    ``catprune bench --decode`` does not time it."""
    public_models: ClassVar[Mapping[str, PublicModel]] = {
        "hunyuanvideo-1.5": PublicModel(_HUNYUANVIDEO_15, TEXT_TOKENS)
    }

    # --- the call

    def token_grid(self, model: nn.Module, arguments: dict[str, Any]) -> Grid:
        frames, height, width = arguments["hidden_states"].shape[-3:]
        config = model.config
        return Grid(height // config.patch_size, width // config.patch_size, frames // config.patch_size_t)

    def text_tokens(self, arguments: dict[str, Any]) -> int:
        """The joint attention's text side: prompt, glyph and image-embedding tokens."""
        sources = ("encoder_hidden_states", "encoder_hidden_states_2", "image_embeds")
        return sum(arguments[name].shape[1] for name in sources)

    def noise_channels(self, model: nn.Module) -> int:
        return model.config.out_channels

    def attention_processors(self, model: nn.Module, slot: StepSlot) -> Iterator[CachingProcessor]:
        for block in model.transformer_blocks:
            yield HunyuanVideo15AttentionProcessor(block.attn, slot)

    def hooks(self, model: nn.Module, slot: StepSlot) -> list[Any]:
        """At a pruned step the rotary table (cos, sin), each (N, d), becomes each row's (B, K, d)."""

        def gather_rotary(module: nn.Module, args: Any, output: Rotary) -> Rotary:
            context = slot.context
            if context is None:
                return output
            cos, sin = output
            return context.gather_table(cos), context.gather_table(sin)

        return [model.rope.register_forward_hook(gather_rotary)]

    # --- cost

    def embedder_macs(self, model: nn.Module) -> int:
        return model.x_embedder.proj.weight.numel()

    def text_macs(self, model: nn.Module, text_tokens: int) -> int:
        """Each text source through its own embedder: the image embeddings, the glyph tokens, and the
        prompt tokens through the token refiner (its linear layers and its self-attention's products). The
        published split is assumed: 729 image and 256 glyph tokens, the rest prompt."""
        vision = min(VISION_TOKENS, text_tokens)
        glyph = min(GLYPH_TOKENS, text_tokens - vision)
        prompt = text_tokens - vision - glyph
        refiner = model.context_embedder
        refiner_blocks = refiner.token_refiner.refiner_blocks
        width = refiner_blocks[0].attn.inner_dim if len(refiner_blocks) else 0
        products = len(refiner_blocks) * 2 * prompt * prompt * width  # QK^T and AV per refiner block
        return (
            vision * linear_macs(model.image_embedder)
            + glyph * linear_macs(model.context_embedder_2)
            + prompt * linear_macs(refiner.proj_in, refiner.token_refiner)
            + products
        )

    def block_macs(
        self, block: nn.Module, image_queries: int, image_tokens: int, text_tokens: int, pruned: bool
    ) -> int:
        return joint_block_macs(block, image_queries, image_tokens, text_tokens)

    # --- the pipeline around the transformer

    def latent_shape(self, config: Mapping[str, Any], batch: int, resolution: int) -> tuple[int, ...]:
        """The noisy latents the pipeline makes (B, 32, F', H/16, W/16); :meth:`call_inputs` adds the
        text-to-video condition channels."""
        frames, height, width = self.video_size(config, resolution)
        if (frames - 1) % TEMPORAL_COMPRESSION:
            raise ValueError(f"HunyuanVideo 1.5's frames are 4k + 1 (121, 61...), got {frames}")
        pixels = SPATIAL_COMPRESSION * int(config["patch_size"])
        if height % pixels or width % pixels:
            raise ValueError(
                f"the video's height and width must be multiples of {pixels}, got {height}x{width}"
            )
        latent_frames = (frames - 1) // TEMPORAL_COMPRESSION + 1
        shape = latent_frames, height // SPATIAL_COMPRESSION, width // SPATIAL_COMPRESSION
        return batch, int(config["out_channels"]), *shape

    def image_grid(self, config: Mapping[str, Any], resolution: int) -> tuple[int, int]:
        """(frames x height, width) of the token grid: its token count, for the tools' square images."""
        _, _, frames, height, width = self.latent_shape(config, 1, resolution)
        patch, patch_t = int(config["patch_size"]), int(config.get("patch_size_t", 1))
        return frames // patch_t * (height // patch), width // patch

    def call_inputs(self, latents: Tensor, timestep: Tensor) -> dict[str, Any]:
        """The pipeline's text-to-video input: the latents, a zero condition of as many channels and a zero
        mask channel (``HunyuanVideo15Pipeline.prepare_cond_latents_and_mask``)."""
        batch, _, frames, height, width = latents.shape
        condition = latents.new_zeros(batch, latents.shape[1] + 1, frames, height, width)
        return {"hidden_states": torch.cat([latents, condition], dim=1), "timestep": timestep}

    def latent_image(self, latents: Tensor, resolution: int) -> Tensor:
        return latents[:, :, 0]  # the first frame

    def conditioning(
        self, model: nn.Module, rows: int, text_tokens: int, resolution: int, make: TensorFactory
    ) -> dict[str, Any]:
        """Text-to-video: ``text_tokens`` split as the pipelines pass them (729 zero image embeddings, 256
        glyph tokens, the rest prompt tokens), every mask 1."""
        config = model.config
        prompt = text_tokens - VISION_TOKENS - GLYPH_TOKENS
        if prompt < 1:
            raise ValueError(f"HunyuanVideo 1.5 takes more than {VISION_TOKENS + GLYPH_TOKENS} text tokens")
        return {
            "encoder_hidden_states": make.randn(rows, prompt, config.text_embed_dim),
            "encoder_attention_mask": make.full((rows, prompt), 1.0),
            "encoder_hidden_states_2": make.randn(rows, GLYPH_TOKENS, config.text_embed_2_dim),
            "encoder_attention_mask_2": make.full((rows, GLYPH_TOKENS), 1.0),
            "image_embeds": make.full((rows, VISION_TOKENS, config.image_embed_dim), 0.0),
        }
