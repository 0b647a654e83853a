"""FLUX.1 (dev, schnell): ``FluxTransformer2DModel``.

Flux takes packed latents (B, N, 64): 2x2 patches of 16 VAE channels, N = (H/16)(W/16) in raster order,
their grid described by the image ids. 19 double-stream blocks (a joint attention as in SD3, with separate
weights for text and image tokens) are followed by 38 single-stream blocks (text and image tokens in one
sequence through shared weights). At a pruned step the selected image tokens and all text tokens run
through both kinds; every attention reads the cached K/V of all image tokens, cached after q/k norm and
rotary embedding (positions do not move). Each prompt selects its own tokens, so the rotary embedding is
gathered per row, once per step, by a hook on ``pos_embed``. The pipelines are guidance-distilled (one row
per prompt); true CFG is a second call per step, under its own cache context (see
``catprune.engine.tracker``).

Flux.1 Kontext (``FluxKontextPipeline``) appends a reference image's tokens to the image tokens, with ids
whose first coordinate is 1: they are a fixed segment of the token layout, recomputed at every step like
the text tokens (in the joint blocks they attend to the noisy image and change with it).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock
from torch import Tensor, nn

from ..engine import CachingProcessor, Grid, ParallelPlan, StepSlot, TokenLayout
from .attention import (
    IMAGE_PROJECTIONS,
    JointAttentionProcessor,
    Rotary,
    attend,
    joint_block_macs,
    projections,
    query_mask,
)
from .base import KL_AUTOENCODER, PackedLatentAdapter, PublicModel, TensorFactory, linear_macs

_FLUX_DEV = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
"""``black-forest-labs/FLUX.1-dev``, ``transformer/config.json``."""

FLUX_VAE: Mapping[str, Any] = {
    **KL_AUTOENCODER,
    "latent_channels": 16,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
"""FLUX.1's VAE (16 latent channels), which Z-Image uses too."""


class SingleStreamAttentionProcessor(CachingProcessor):
    """The attention of a single-stream block: its input is [text T, image n (+ fixed R)] through one set
    of projections (the caches keep that order), and it has no output projection (the block's
    ``proj_out`` mixes it with the MLP). A mask over the whole sequence (Chroma's) keeps the rows of the
    queries."""

    def attend(
        self, attn: Any, tokens: Tensor, context: Tensor | None, mask: Tensor | None, rotary: Rotary | None
    ) -> Any:
        if context is not None:
            raise NotImplementedError("CAT pruning: a single-stream attention with a context")
        query, key, value = projections(attn, tokens, IMAGE_PROJECTIONS, rotary)  # (B, T+n+R, h, d)
        return self.stream_attention(query, key, value, mask)

    def stream_attention(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None) -> Tensor:
        """Attention of the stream's Q, K, V (B, T+n+R, h, d) over the cached K/V of all image tokens, with
        the text and fixed tokens' K/V written into the cache: (B, T+n+R, h*d)."""
        text = self.context.local_text_tokens
        self.store(key[:, text:], value[:, text:], lead=(key[:, :text], value[:, :text]))
        return attend(query, *self.cached(), query_mask(mask, self.context, text), self.exchange)


def token_layout_of(ids: Tensor) -> TokenLayout:
    """The token layout that image ids (N + R, 3 or 4) describe (one host read): the generated image's
    tokens first, a raster grid sharing the first id's index (its rows and columns told by their distinct
    coordinates, at any spacing: FLUX.3's pipelines scale them by 0.5), then any others (a reference
    image's) as fixed tokens."""
    rows = ids.tolist()
    generated = next((i for i, row in enumerate(rows) if row[0] != rows[0][0]), len(rows))
    image = rows[:generated]
    grid = Grid(len({row[1] for row in image}), len({row[2] for row in image}))
    raster = all(row[1] == image[0][1] for row in image[: grid.width])
    if grid.num_tokens != generated or not raster:
        raise ValueError(
            f"CAT pruning: the Flux transformer's first {generated} image tokens do not form a raster grid "
            f"(their ids span {grid.height}x{grid.width}); pruning needs the generated image's tokens first, "
            "in raster order"
        )
    return TokenLayout(grid, fixed_tokens=len(rows) - generated)


class FluxAdapter(PackedLatentAdapter):
    family = "flux"
    model_class = FluxTransformer2DModel
    gather_point = "x_embedder"
    scatter_point = "proj_out"
    token_arguments = ("controlnet_block_samples", "controlnet_single_block_samples")
    cfg_batch = 1
    text_embedder = "context_embedder"
    blocks = ("transformer_blocks", "single_transformer_blocks")
    depth_keys = ("num_layers", "num_single_layers")
    single_blocks: ClassVar[tuple[type[nn.Module], ...]] = (FluxSingleTransformerBlock,)
    """The single-stream block classes (text and image tokens through one set of weights)."""
    single_processor: ClassVar[type[SingleStreamAttentionProcessor]] = SingleStreamAttentionProcessor
    """The caching processor of the single-stream blocks' attention."""
    id_axes: ClassVar[int] = 3
    """Coordinates of an image or text id: (index, row, column)."""
    context_parallel = ParallelPlan({"": ("hidden_states", "img_ids")}, splits_text=True)
    """``_cp_plan`` splits the image tokens and their ids at the model's input, and the text too."""

    scheduler_class = FlowMatchEulerDiscreteScheduler
    scheduler_config: ClassVar[Mapping[str, Any]] = {"shift": 3.0}
    """The pipelines shift the schedule by resolution (``use_dynamic_shifting``); measurement uses a fixed
    shift, which moves the timesteps but not the cost."""
    default_steps = 28
    guidance_scale = 3.5
    """FLUX.1-dev's distilled guidance, an input of the transformer (not a second batch)."""
    default_text_tokens = 512
    """``FluxPipeline``: max_sequence_length=512 T5 tokens (CLIP gives only the pooled embedding)."""
    text_tokens_by_pipeline: ClassVar[Mapping[str, int]] = dict.fromkeys(
        ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxControlNetPipeline"), 512
    )
    vae_config: ClassVar[Mapping[str, Any]] = FLUX_VAE
    public_models: ClassVar[Mapping[str, PublicModel]] = {
        "flux-dev": PublicModel(_FLUX_DEV, 512),
        "flux-schnell": PublicModel({**_FLUX_DEV, "guidance_embeds": False}, 256, default_steps=4),
    }

    def __init__(self) -> None:
        self._layout: tuple[Tensor, TokenLayout] | None = None
        """The latest image ids read and their layout: a pipeline passes the same ids at every step."""

    def token_grid(self, model: nn.Module, arguments: dict[str, Any]) -> Grid:
        return self.token_layout(model, arguments).grid

    def token_layout(self, model: nn.Module, arguments: dict[str, Any]) -> TokenLayout:
        """From the image ids (read once per ids tensor: one host read per generation); a square grid for
        ids on ``meta`` (shapes only: MAC counting)."""
        tokens = arguments["hidden_states"].shape[1]
        ids = arguments["img_ids"]
        ids = ids[0] if ids.ndim == 3 else ids  # (N + R, 3): (0, row, column) in raster order, then others
        if ids.device.type == "meta":
            side = math.isqrt(tokens)
            return TokenLayout(Grid(side, tokens // side))
        if self._layout is None or self._layout[0] is not ids:
            self._layout = ids, token_layout_of(ids)
        layout = self._layout[1]
        if layout.grid.num_tokens + layout.fixed_tokens != tokens:
            raise ValueError(
                f"CAT pruning: the Flux transformer got {tokens} image tokens but {len(ids)} image ids"
            )
        return layout

    def text_tokens(self, arguments: dict[str, Any]) -> int:
        return arguments["encoder_hidden_states"].shape[1]

    def attention_processors(self, model: nn.Module, slot: StepSlot) -> Iterator[CachingProcessor]:
        for block in model.transformer_blocks:
            yield JointAttentionProcessor(block.attn, slot, extra_first=True)
        for block in model.single_transformer_blocks:
            yield self.single_processor(block.attn, slot, extra_first=True)

    def hooks(self, model: nn.Module, slot: StepSlot) -> list[Any]:
        """At a pruned step, the rotary embedding (cos, sin), each (T+N+R, d), becomes each row's over its
        text, selected image and fixed tokens (B, T+K+R, d)."""

        def gather_rotary(module: nn.Module, args: Any, output: Rotary) -> Rotary:
            context = slot.context
            if context is None:
                return output
            cos, sin = output
            text = context.local_text_tokens
            return context.gather_table(cos, lead=text), context.gather_table(sin, lead=text)

        return [model.pos_embed.register_forward_hook(gather_rotary)]

    # --- cost

    def embedder_macs(self, model: nn.Module) -> int:
        return linear_macs(model.get_submodule(self.gather_point))

    def block_macs(
        self, block: nn.Module, image_queries: int, image_tokens: int, text_tokens: int, pruned: bool
    ) -> int:
        if not isinstance(block, self.single_blocks):
            return joint_block_macs(block, image_queries, image_tokens, text_tokens)
        attn = block.attn
        queries = text_tokens + image_queries
        per_token = linear_macs(*self.single_block_layers(block))
        # QK^T and AV: queries x keys x width, twice.
        return queries * per_token + 2 * queries * (text_tokens + image_tokens) * attn.inner_dim

    def single_block_layers(self, block: nn.Module) -> tuple[nn.Module, ...]:
        """The linear layers a single-stream block runs every token through: Q, K, V, the MLP's input and
        the output projection shared with the attention."""
        attn = block.attn
        return attn.to_q, attn.to_k, attn.to_v, block.proj_mlp, block.proj_out

    # --- the pipeline around the transformer

    def text_conditioning(
        self, model: nn.Module, rows: int, text_tokens: int, resolution: int, make: TensorFactory
    ) -> dict[str, Any]:
        """The text sequence and the text and image ids (``id_axes`` coordinates, the image's (row, column)
        second and third, the rest 0), as the pipelines pass them."""
        height, width = self.image_grid(model.config, resolution)
        axes = self.id_axes
        image_ids = make.full((height, width, axes), 0.0)  # (h, w, axes): (0, row, column, 0...)
        image_ids[..., 1] += torch.arange(height, device=make.device, dtype=make.dtype)[:, None]
        image_ids[..., 2] += torch.arange(width, device=make.device, dtype=make.dtype)[None, :]
        return {
            "encoder_hidden_states": make.randn(rows, text_tokens, model.config.joint_attention_dim),
            "txt_ids": make.full((text_tokens, axes), 0.0),
            "img_ids": image_ids.flatten(0, 1),  # (N, axes)
        }

    def conditioning(
        self, model: nn.Module, rows: int, text_tokens: int, resolution: int, make: TensorFactory
    ) -> dict[str, Any]:
        """The text conditioning, with the pooled projection and the distilled guidance where the model's
        config has them (FLUX.1-dev both, schnell no guidance, Chroma neither)."""
        config = model.config
        arguments = self.text_conditioning(model, rows, text_tokens, resolution, make)
        if config.get("pooled_projection_dim"):
            arguments["pooled_projections"] = make.randn(rows, config.pooled_projection_dim)
        if config.get("guidance_embeds"):
            arguments["guidance"] = make.full((rows,), self.guidance_scale)
        return arguments
