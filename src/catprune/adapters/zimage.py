"""Z-Image (base, Turbo): ``ZImageTransformer2DModel``.

Z-Image takes a *list* of latents, one (C, F=1, H, W) tensor per sample, and the caption features as a list
of (T_i, D_cap) tensors. It cuts each image into 2x2 patches, embeds them flattened (sum N_i, D), pads each
sample's image and caption to multiples of 32 tokens, refines the image tokens by 2 *noise refiner* blocks
and the caption by 2 *context refiner* blocks, then runs 30 single-stream blocks over each sample's
``[image, caption]`` (batch rows padded to the longest, with a key mask), a final layer, and unpatchifies.

- **Token layout.** The gather happens in front of the first main block (a pre-hook on ``layers.0``): its
  input is ``[image N, image padding P, caption T]`` per row, so the image tokens come first and the
  padding and caption are a fixed segment (recomputed at every step, like FLUX.1 Kontext's reference
  tokens). The refiners run on all tokens at every step (2 of 34 blocks, a few percent of a step); the
  scatter is after the final layer (``all_final_layer``), before unpatchify, which reads each row's first
  N tokens.
- **Rotary.** The model passes every block one complex table per row (B, L, d/2); a pre-hook on each main
  block gathers its rows like the tokens, and the caching processor turns it into (cos, sin) as
  ``adapters.attention.rotate`` applies it (the same rotation as the model's complex multiplication).
- **Mask.** The (B, L) key mask (batch padding) is over keys only: it stays whole, as the K/V caches do.
- **Guidance.** ``ZImagePipeline`` runs CFG as one batch ``[cond..., uncond...]`` (``cond_first``), and
  ``cfg_truncation`` drops the unconditional rows for the late steps (the step engine keeps the
  conditional rows' caches). Timesteps increase ((1000 - t) / 1000). Turbo runs about 8 distilled steps
  without CFG (see "Few-step models" in docs/measurement.md).
- **ControlNet** residuals (``controlnet_block_samples``, a mapping from block index to (B, L, D) over the
  main sequence) are gathered like the sequence.
- **Not supported:** the Omni mode (a nested list with reference images and SigLIP features; its per-token
  noise/clean modulation): refused with the reason.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF, ZSingleStreamAttnProcessor
from torch import Tensor, nn

from ..engine import CachingProcessor, Grid, StepMode, StepSlot, TokenLayout
from .attention import CachedSelfAttentionProcessor, real_rotary
from .base import ModelAdapter, PublicModel, TensorFactory, gather_input_hook, linear_macs
from .flux import FLUX_VAE

_Z_IMAGE = {
    "all_patch_size": (2,),
    "all_f_patch_size": (1,),
    "in_channels": 16,
    "dim": 3840,
    "n_layers": 30,
    "n_refiner_layers": 2,
    "n_heads": 30,
    "n_kv_heads": 30,
    "qk_norm": True,
    "cap_feat_dim": 2560,
    "axes_dims": (32, 48, 48),
}
"""``Tongyi-MAI/Z-Image`` and ``Z-Image-Turbo``, ``transformer/config.json`` (diffusers' defaults): 6.15B
parameters, Qwen3-4B's hidden states (2560) as the caption features."""

TEXT_TOKENS = 128
"""Caption tokens for measurement: the pipeline passes the prompt's own Qwen3 tokens (at most 512), padded
to a multiple of 32 in the model; 128 is a prompt of about 90 words, as for Qwen-Image."""

Z_IMAGE_PIPELINES = ("ZImagePipeline", "ZImageImg2ImgPipeline", "ZImageInpaintPipeline")


def padded(tokens: int) -> int:
    """``tokens`` padded to Z-Image's multiple (32), as ``_pad_with_ids`` pads each image and caption."""
    return tokens + (-tokens) % SEQ_MULTI_OF


class ZImageAttentionProcessor(CachedSelfAttentionProcessor):
    """The attention of Z-Image's blocks over [image, padding, caption]: image K/V cached, the rest (the
    fixed segment) rewritten at every step; the complex per-row rotary table (named ``freqs_cis``, which
    diffusers' ``Attention`` passes only to a processor whose signature names it) and the (B, L) key mask."""

    def __call__(  # type: ignore[override]
        self,
        attn: Any,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        freqs_cis: Tensor | None = None,
    ) -> Tensor:
        if self.slot.mode is StepMode.FULL:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, freqs_cis)
        mask = attention_mask
        if mask is not None and mask.ndim == 2:
            mask = mask[:, None, None, :]  # (B, 1, 1, L): keys only
        rotary = None if freqs_cis is None else real_rotary(freqs_cis)
        return self.attend(attn, hidden_states, None, mask, rotary)


class ZImageAdapter(ModelAdapter):
    family = "z-image"
    model_class = ZImageTransformer2DModel
    gather_point = "layers.0"
    """A pre-hook: the first main block's input is the [image, padding, caption] sequence."""
    scatter_point = "all_final_layer.2-1.linear"
    """The final layer's output projection for 2x2 patches (the published models' only ``all_patch_size``):
    its output is the model's per-token output before unpatchify."""
    token_arguments = ("controlnet_block_samples",)
    """``ZImageControlNetModel``'s residuals: {block index: (B, L, D)} over the main sequence, added after
    that block; gathered like the sequence."""
    plain_processors = (ZSingleStreamAttnProcessor,)
    cond_first = True
    """``ZImagePipeline`` batches CFG as ``[cond..., uncond...]``."""
    cfg_batch = 2
    text_embedder = "cap_embedder"
    blocks = ("noise_refiner", "context_refiner", "layers")
    depth_keys = ("n_layers", "n_refiner_layers")

    scheduler_class = FlowMatchEulerDiscreteScheduler
    scheduler_config: ClassVar[Mapping[str, Any]] = {"shift": 3.0}
    default_steps = 50
    guidance_scale = 5.0
    default_text_tokens = TEXT_TOKENS
    text_tokens_by_pipeline: ClassVar[Mapping[str, int]] = dict.fromkeys(Z_IMAGE_PIPELINES, TEXT_TOKENS)
    vae_config: ClassVar[Mapping[str, Any]] = FLUX_VAE
    """FLUX.1's VAE, which Z-Image uses."""
    public_models: ClassVar[Mapping[str, PublicModel]] = {
        "z-image": PublicModel(_Z_IMAGE, TEXT_TOKENS),
        "z-image-turbo": PublicModel(_Z_IMAGE, TEXT_TOKENS, default_steps=8),
    }

    # --- the call

    def call_latents(self, arguments: dict[str, Any]) -> Tensor:
        return torch.stack(self._latents(arguments))  # (B, C, F, H, W)

    def call_timestep(self, arguments: dict[str, Any]) -> Any:
        return arguments.get("t")

    def batch_rows(self, arguments: dict[str, Any]) -> int:
        return len(self._latents(arguments))

    @staticmethod
    def _latents(arguments: dict[str, Any]) -> list[Tensor]:
        latents = arguments["x"]
        if isinstance(latents[0], list):
            raise ValueError(
                "CAT pruning: Z-Image's Omni mode (reference images and SigLIP features, per-token noisy and "
                "clean modulation) is not supported; ZImagePipeline's text-to-image mode is"
            )
        return latents

    def token_grid(self, model: nn.Module, arguments: dict[str, Any]) -> Grid:
        patch, frames = arguments.get("patch_size", 2), arguments.get("f_patch_size", 1)
        _, depth, height, width = self._latents(arguments)[0].shape
        return Grid(height // patch, width // patch, depth // frames)

    def token_layout(self, model: nn.Module, arguments: dict[str, Any]) -> TokenLayout:
        """The image grid (from the first latent's shape), then its padding and the longest caption's
        padded tokens, fixed (no host read)."""
        grid = self.token_grid(model, arguments)
        image = grid.num_tokens
        return TokenLayout(grid, padded(image) - image + self.text_tokens(arguments))

    def text_tokens(self, arguments: dict[str, Any]) -> int:
        """The longest caption, padded: the rows' caption segments (for the cost; the processors see the
        captions as fixed tokens)."""
        return max(padded(len(caption)) for caption in arguments["cap_feats"])

    def noise_channels(self, model: nn.Module) -> int:
        return model.out_channels

    def attention_processors(self, model: nn.Module, slot: StepSlot) -> Iterator[CachingProcessor]:
        for block in model.layers:
            yield ZImageAttentionProcessor(block.attention, slot)

    def install(self, model: nn.Module, slot: StepSlot, scatter: Any) -> list[Any]:
        """A pre-hook on the first main block gathers the sequence, one on every main block its rotary
        rows; the final layer's output projection is scattered."""

        def gather_rotary(module: nn.Module, args: tuple[Any, ...]) -> Any:
            context = slot.context
            if context is None:
                return None
            tokens, mask, freqs, *rest = args
            return tokens, mask, context.gather(freqs), *rest  # (B, L, d/2) -> (B, K + R, d/2)

        scatter_module = model.get_submodule(self.scatter_point)
        return [
            model.layers[0].register_forward_pre_hook(gather_input_hook(slot)),
            *(block.register_forward_pre_hook(gather_rotary) for block in model.layers),
            scatter_module.register_forward_hook(lambda module, args, output: scatter(output)),
        ]

    # --- cost

    def embedder_macs(self, model: nn.Module) -> int:
        return linear_macs(model.all_x_embedder)

    def block_macs(
        self, block: nn.Module, image_queries: int, image_tokens: int, text_tokens: int, pruned: bool
    ) -> int:
        """A block's ``image_queries`` queries over ``image_tokens`` keys (per-sample modulation left out)."""
        attention = block.attention
        per_token = linear_macs(attention.to_q, attention.to_k, attention.to_v, attention.to_out)
        per_token += linear_macs(block.feed_forward)
        return image_queries * per_token + 2 * image_queries * image_tokens * attention.inner_dim

    def step_macs(
        self, model: nn.Module, image_queries: int, image_tokens: int, text_tokens: int, pruned: bool
    ) -> int:
        """``image_tokens`` counts the whole main sequence (image, padding, caption) and ``image_queries``
        its tokens that go through the main blocks; the embedders and refiners run on every token."""
        image, text = image_tokens - text_tokens, text_tokens
        total = image * self.embedder_macs(model) + text * linear_macs(model.cap_embedder)
        total += sum(self.block_macs(block, image, image, 0, False) for block in model.noise_refiner)
        total += sum(self.block_macs(block, text, text, 0, False) for block in model.context_refiner)
        total += sum(self.block_macs(block, image_queries, image_tokens, 0, pruned) for block in model.layers)
        return total + image_queries * linear_macs(model.get_submodule(self.scatter_point))

    # --- the pipeline around the transformer

    def latent_shape(self, config: Mapping[str, Any], batch: int, resolution: int) -> tuple[int, ...]:
        height, width = self.image_grid(config, resolution)
        return batch, int(config["in_channels"]), 1, 2 * height, 2 * width

    def image_grid(self, config: Mapping[str, Any], resolution: int) -> tuple[int, int]:
        if resolution % 16:
            raise ValueError(f"resolution must be a multiple of 16, got {resolution}")
        return resolution // 16, resolution // 16

    def latent_image(self, latents: Tensor, resolution: int) -> Tensor:
        return latents[:, :, 0]  # (B, C, 1, H/8, W/8) -> (B, C, H/8, W/8)

    def call_inputs(self, latents: Tensor, timestep: Tensor) -> dict[str, Any]:
        return {"x": list(latents.unbind(0)), "t": timestep}

    def call_output(self, output: Any) -> Tensor:
        return torch.stack(output)  # a list of (C, 1, H, W)

    def conditioning(
        self, model: nn.Module, rows: int, text_tokens: int, resolution: int, make: TensorFactory
    ) -> dict[str, Any]:
        return {"cap_feats": [make.randn(text_tokens, model.config.cap_feat_dim) for _ in range(rows)]}
