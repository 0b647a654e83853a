"""Chroma (Chroma1-HD, Chroma1-Base): ``ChromaTransformer2DModel``.

Chroma is FLUX.1-schnell's layout (19 double-stream and 38 single-stream blocks over packed latents, the
same image ids, rotary embedding, attention layers and ``x_embedder`` / ``proj_out``) with the per-block
modulation layers replaced by one *approximator*: an MLP that maps the timestep to every block's
modulation at once (per sample, the same at pruned steps). So the Flux adapter's mechanism applies as it
is: the gather after ``x_embedder``, the rotary table gathered per row, the caching processors of both
block kinds. What differs:

- a text mask: ``ChromaPipeline`` passes ``attention_mask`` (B, T + N), the T5 padding after the first pad
  token masked and the image tokens all ones, and every block builds the (B, 1, L, L) mask ``m[q] * m[k]``
  of its whole sequence from it. The caching processors keep the mask's rows of the queries that go
  through the block, over all keys (see ``adapters.attention.query_mask``);
- true classifier-free guidance: ``guidance_scale > 1`` calls the transformer twice per step, the negative
  prompt second, without ``cache_context``: the step engine tells the second call as another pass of the
  step (the scheduler has not moved and the timestep is the same) and gives it its own caches;
- no pooled text projection and no guidance embedding; the approximator's MACs (per sample, one row per
  modulation vector) are part of the cost formula, since a small model's approximator is not negligible.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from diffusers import ChromaTransformer2DModel
from diffusers.models.transformers.transformer_chroma import ChromaSingleTransformerBlock
from torch import nn

from .base import PublicModel, linear_macs
from .flux import FluxAdapter

_CHROMA1_HD = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "axes_dims_rope": (16, 56, 56),
    "approximator_num_channels": 64,
    "approximator_hidden_dim": 5120,
    "approximator_layers": 5,
}
"""``lodestones/Chroma1-HD``, ``transformer/config.json`` (diffusers' defaults)."""

CHROMA_PIPELINES = ("ChromaPipeline", "ChromaImg2ImgPipeline", "ChromaInpaintPipeline")


class ChromaAdapter(FluxAdapter):
    family = "chroma"
    model_class = ChromaTransformer2DModel
    single_blocks = (ChromaSingleTransformerBlock,)
    cfg_batch = 1
    """True CFG is a second call per step (another pass), not a second batch row."""
    context_parallel = None
    """Not under context parallelism: diffusers gives ``ChromaTransformer2DModel`` no ``_cp_plan``."""

    default_steps = 35
    """``ChromaPipeline``'s ``num_inference_steps``."""
    guidance_scale = 5.0
    """True CFG: the pipeline calls the transformer a second time with the negative prompt."""
    default_text_tokens = 512
    """``max_sequence_length=512`` T5 tokens (the padding after the first pad token masked)."""
    text_tokens_by_pipeline: ClassVar[Mapping[str, int]] = dict.fromkeys(CHROMA_PIPELINES, 512)
    public_models: ClassVar[Mapping[str, PublicModel]] = {"chroma": PublicModel(_CHROMA1_HD, 512)}

    def step_macs(
        self, model: nn.Module, image_queries: int, image_tokens: int, text_tokens: int, pruned: bool
    ) -> int:
        """Flux's count plus the approximator, which runs on one row per modulation vector per sample."""
        vectors = model.time_text_embed.mod_proj.shape[0]
        approximator = vectors * linear_macs(model.distilled_guidance_layer)
        return approximator + super().step_macs(model, image_queries, image_tokens, text_tokens, pruned)
