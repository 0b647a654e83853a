"""Wan 2.1 (T2V, I2V): ``WanTransformer3DModel``.

Wan cuts the video latents (B, C, F, H, W) into 1x2x2 patches with a ``Conv3d`` (``patch_embedding``),
flattens them inside ``forward`` to (B, N, D) tokens in (frame, row, column) order, and runs its blocks:
self-attention (``attn1``, rotary), cross-attention to the text (``attn2``), a feed-forward, all modulated
per sample. A final norm and ``proj_out`` give each token its 1x2x2 patch of C channels.

- **Gather.** No module outputs the (B, N, D) sequence (the convolution's output is 5-D and flattened in
  ``forward``), so a pre-hook on the first block gathers its input, as for Z-Image; the scatter is after
  ``proj_out``, before unpatchify.
- **Grid.** ``Grid(height, width, frames)`` from the latents' shape and the patch size: the tokens'
  raster order is Wan's flatten order (frames first), and selection clusters and encodes positions over
  frames x height x width.
- **Rotary.** ``rope`` returns (cos, sin), each (1, N, 1, d) for all rows alike; a hook on it gives each row
  its selected tokens' rows (B, K, 1, d) at a pruned step.
- **Self-attention** ``attn1`` normalises q and k over all heads (``rms_norm_across_heads``) before
  splitting them: the caching processor does the same, then caches K/V of every image token.
- **Cross-attention** ``attn2`` keeps the model's own processor: its queries are the tokens that go through
  the block and its keys the 512 text tokens, so it is exact on the selected tokens alone. The text K/V it
  projects at every call are not cached: they cost ``2 * 512 * D^2`` per block, about 0.2% of a pruned
  step of Wan 2.1 at 480p (keep 0.3), and caching them would tie the cache to one prompt per pass for that.
- **Wan 2.1 I2V** (``WanImageToVideoPipeline``, a model with ``image_dim``): the latents are concatenated
  on channels with the mask and the condition image's latents (36 channels in, 16 out), and ``attn2`` also
  attends to the 257 CLIP tokens of ``encoder_hidden_states_image`` (the model prepends them to the text;
  its processor takes the last 512 tokens as the text), with their own K/V projections (``add_k_proj``,
  ``add_v_proj``): static within a generation, and exact on the selected queries like the text.
- **Guidance.** ``WanPipeline`` runs CFG as two calls per step under ``cache_context("cond"/"uncond")``:
  two passes, each with its own caches.
- **Wan 2.2 TI2V** (``WanPipeline(expand_timesteps=True)``) gives every token its own timestep (B, N):
  the conditioning frame's tokens 0, the others the step's. A pre-hook on the model gathers it like the
  tokens at a pruned step, so the per-token modulation (B, K, 6, D) and the final norm follow the selected
  tokens; steps are told by each row's largest timestep.
- **Wan 2.2 A14B** (``transformer_2``, ``boundary_ratio``): the high-noise expert runs the steps at
  timesteps >= ``boundary_ratio * 1000``, the low-noise one the rest. ``apply_cat_pruning(pipe)`` has one
  engine prune both: one generation, one step count, one selection history (the reference noise n_t0 and
  each token's staleness carry over: both experts predict the same flow). The first expert's K/V caches
  are not valid for the second (other weights), so at the switch they are freed and the second expert's
  first step is a fill step (one more full-cost step per generation: ``catprune macs --model
  wan2.2-a14b``); keeping both experts' caches would double the memory for nothing, since the first never
  runs again in the generation.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

from diffusers import UniPCMultistepScheduler, WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from torch import Tensor, nn

from ..engine import CachingProcessor, Grid, ParallelPlan, StepMode, StepSlot
from .attention import CachedSelfAttentionProcessor, Rotary, attend, project_out, rotate, split_heads
from .base import ModelAdapter, PublicModel, TensorFactory, gather_input_hook, linear_macs

_WAN21_1_3B = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}
"""``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``, ``transformer/config.json``: 1.42B parameters, width 1536."""

_WAN21_14B = {**_WAN21_1_3B, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}
"""``Wan-AI/Wan2.1-T2V-14B-Diffusers``, ``transformer/config.json``: 14.3B parameters, width 5120. Wan
2.2 T2V A14B's two experts have this architecture each (the Wan team's ``t2v_A14B`` config: dim 5120, ffn
13824, 40 heads, 40 layers), with flow shift 12 and ``boundary_ratio`` 0.875."""

_WAN21_I2V_14B = {**_WAN21_14B, "in_channels": 36, "image_dim": 1280, "added_kv_proj_dim": 5120}
"""``Wan-AI/Wan2.1-I2V-14B-480P-Diffusers``, ``transformer/config.json``: the 14B T2V blocks with 36 input
channels (16 noisy latents, 4 mask, 16 condition-image latents), a CLIP image embedder (1280 -> 5120) and
image K/V projections in every cross-attention: 16.4B parameters."""

TEXT_TOKENS = 512
"""umT5 tokens: ``WanPipeline`` pads every prompt to ``max_sequence_length=512``."""

IMAGE_CONTEXT_TOKENS = 257
"""CLIP ViT-H/14 tokens of the condition image (224 px: 16 x 16 patches and the class token):
``WanImageToVideoPipeline.encode_image``'s ``encoder_hidden_states_image`` for Wan 2.1 I2V. The MAC formula
assumes this count for a model with an image embedder (its config does not give it): a generation's MAC
count is off where the image tokens differ (a toy CLIP; Wan FLF2V's two images, 514)."""

FRAMES = 81
"""Frames of a generation: ``WanPipeline``'s ``num_frames`` (21 latent frames)."""

WIDTHS = {480: 832, 720: 1280}
"""Wan's video sizes by height (480p: 480x832, 720p: 720x1280); other heights: square."""

WAN_PIPELINES = ("WanPipeline", "WanImageToVideoPipeline", "WanVideoToVideoPipeline")


class WanSelfAttentionProcessor(CachedSelfAttentionProcessor):
    """Wan's self-attention (``attn1``): Q, K, V projected (or fused ``to_qkv``), q and k RMS-normalised
    across all heads before the heads are split, rotated by the rotary table (1 or B, n, 1, d), K/V of every
    image token cached."""

    def attend(
        self, attn: Any, tokens: Tensor, context: Tensor | None, mask: Tensor | None, rotary: Any
    ) -> Any:
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(tokens).chunk(3, dim=-1)  # (B, n, h d) each
        else:
            query, key, value = attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens)
        query, key = attn.norm_q(query), attn.norm_k(key)  # across heads
        query, key, value = (split_heads(part, attn.heads) for part in (query, key, value))  # (B, n, h, d)
        if rotary is not None:
            table: Rotary = (rotary[0][:, :, 0], rotary[1][:, :, 0])  # (1 or B, n, d) each
            query, key = rotate(query, table), rotate(key, table)
        self.store(key, value)
        if self.capture_attention:
            self._capture_attention(attn, query, None)
        keys, values = self.cached()  # (B, N, h, d) each
        return project_out(attn, attend(query, keys, values, exchange=self.exchange), tokens)


class WanAdapter(ModelAdapter):
    family = "wan"
    model_class = WanTransformer3DModel
    gather_point = "blocks.0"
    """A pre-hook: the first block's input is the (B, N, D) token sequence."""
    scatter_point = "proj_out"
    token_arguments = ()
    plain_processors = (WanAttnProcessor,)
    cfg_batch = 1
    """CFG as a second call per step (``cache_context("uncond")``): one row per prompt per call."""
    cfg_calls = 2
    default_resolution = 480
    default_frames = FRAMES
    video_widths = WIDTHS
    text_embedder = "condition_embedder.text_embedder"
    blocks = ("blocks",)
    context_parallel = ParallelPlan({"": ("timestep",), "rope": (0, 1), "blocks.0": ("hidden_states",)})
    """``_cp_plan`` splits the per-token timesteps (Wan 2.2 TI2V), the rotary table and the first block's
    input: the image tokens only (the text, in cross-attention only, is not split)."""

    scheduler_class = UniPCMultistepScheduler
    scheduler_config: ClassVar[Mapping[str, Any]] = {
        "prediction_type": "flow_prediction",
        "use_flow_sigmas": True,
        "flow_shift": 3.0,
    }
    """The published pipelines' scheduler (flow shift 3.0 for 480p; 5.0 for 720p)."""
    default_steps = 50
    guidance_scale = 5.0
    default_text_tokens = TEXT_TOKENS
    text_tokens_by_pipeline: ClassVar[Mapping[str, int]] = dict.fromkeys(WAN_PIPELINES, TEXT_TOKENS)
    vae_config: ClassVar[Mapping[str, Any]] = {}
    """Wan's VAE (``AutoencoderKLWan``, 3-D) is not an ``AutoencoderKL``: ``catprune bench --decode`` does
    not time it."""
    public_models: ClassVar[Mapping[str, PublicModel]] = {
        "wan2.1-t2v-1.3b": PublicModel(_WAN21_1_3B, TEXT_TOKENS),
        "wan2.1-t2v-14b": PublicModel(_WAN21_14B, TEXT_TOKENS),
        "wan2.1-i2v-14b": PublicModel(_WAN21_I2V_14B, TEXT_TOKENS),
        "wan2.2-a14b": PublicModel(
            _WAN21_14B, TEXT_TOKENS, scheduler_config={"flow_shift": 12.0}, boundary_ratio=0.875
        ),
    }

    # --- the call

    def token_grid(self, model: nn.Module, arguments: dict[str, Any]) -> Grid:
        frames, height, width = arguments["hidden_states"].shape[-3:]
        p_t, p_h, p_w = model.config.patch_size
        return Grid(height // p_h, width // p_w, frames // p_t)

    def call_timestep(self, arguments: dict[str, Any]) -> Any:
        """The call's timestep per row: Wan 2.2 TI2V's per-token timesteps (B, N) by each row's largest
        (the conditioning frame's tokens have 0)."""
        timestep = arguments.get("timestep")
        if isinstance(timestep, Tensor) and timestep.ndim == 2:
            return timestep.amax(dim=1)  # (B,)
        return timestep

    def text_tokens(self, arguments: dict[str, Any]) -> int:
        return arguments["encoder_hidden_states"].shape[1]

    def noise_channels(self, model: nn.Module) -> int:
        return model.config.out_channels

    def attention_processors(self, model: nn.Module, slot: StepSlot) -> Iterator[CachingProcessor]:
        for block in model.blocks:
            yield WanSelfAttentionProcessor(block.attn1, slot)

    def install(self, model: nn.Module, slot: StepSlot, scatter: Any) -> list[Any]:
        """A pre-hook on the first block gathers the sequence, a hook on ``rope`` each row's rotary rows;
        ``proj_out``'s output is scattered."""

        def gather_rotary(module: nn.Module, args: Any, output: tuple[Tensor, Tensor]) -> Any:
            context = slot.context
            if context is None or context.mode is not StepMode.PRUNED:
                return None
            return tuple(context.gather_table(part[0]) for part in output)  # (B, K, 1, d) each

        def gather_timestep(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            context = slot.context
            if context is None or context.mode is not StepMode.PRUNED:
                return None
            if "timestep" in kwargs:
                timestep = kwargs["timestep"]
                if timestep.ndim != 2:
                    return None
                return args, {**kwargs, "timestep": context.gather(timestep)}  # (B, N) -> (B, K)
            if len(args) < 2 or args[1].ndim != 2:
                return None
            return (args[0], context.gather(args[1]), *args[2:]), kwargs

        return [
            model.register_forward_pre_hook(gather_timestep, with_kwargs=True),
            model.blocks[0].register_forward_pre_hook(gather_input_hook(slot)),
            model.rope.register_forward_hook(gather_rotary),
            model.proj_out.register_forward_hook(lambda module, args, output: scatter(output)),
        ]

    # --- cost

    def embedder_macs(self, model: nn.Module) -> int:
        return model.patch_embedding.weight.numel()

    def text_macs(self, model: nn.Module, text_tokens: int) -> int:
        """The text through ``text_embedder``; Wan 2.1 I2V's CLIP tokens through its image embedder."""
        image_embedder = model.condition_embedder.image_embedder
        image_context = 0 if image_embedder is None else IMAGE_CONTEXT_TOKENS * linear_macs(image_embedder)
        return super().text_macs(model, text_tokens) + image_context

    def block_macs(
        self, block: nn.Module, image_queries: int, image_tokens: int, text_tokens: int, pruned: bool
    ) -> int:
        """Self-attention of the queries over all image tokens, cross-attention of the queries to the text
        and, for I2V, the CLIP tokens (their K/V projected for every such token at every call), the
        feed-forward of the queries."""
        self_attention, cross = block.attn1, block.attn2
        image_context = IMAGE_CONTEXT_TOKENS if cross.add_k_proj is not None else 0
        per_query = linear_macs(self_attention, cross.to_q, cross.to_out, block.ffn)
        context_kv = text_tokens * linear_macs(cross.to_k, cross.to_v)
        context_kv += image_context * linear_macs(cross.add_k_proj, cross.add_v_proj)
        keys = image_tokens * self_attention.inner_dim + (text_tokens + image_context) * cross.inner_dim
        products = 2 * image_queries * keys
        return image_queries * per_query + context_kv + products

    # --- the pipeline around the transformer

    def latent_shape(self, config: Mapping[str, Any], batch: int, resolution: int) -> tuple[int, ...]:
        frames, height, width = self.video_size(config, resolution)
        if (frames - 1) % 4:
            raise ValueError(f"Wan's frames are 4k + 1 (81, 121...), got {frames}")
        _, p_h, p_w = config["patch_size"]
        if height % (8 * p_h) or width % (8 * p_w):
            raise ValueError(
                f"the video's height and width must be multiples of {8 * p_h}, got {height}x{width}"
            )
        latent_frames = (frames - 1) // 4 + 1  # AutoencoderKLWan: 4x in time, the first frame alone
        return batch, int(config["in_channels"]), latent_frames, height // 8, width // 8

    def image_grid(self, config: Mapping[str, Any], resolution: int) -> tuple[int, int]:
        """(frames x height, width) of the token grid: its token count, for the tools' square images."""
        _, _, frames, height, width = self.latent_shape(config, 1, resolution)
        p_t, p_h, p_w = config["patch_size"]
        return frames // p_t * (height // p_h), width // p_w

    def latent_image(self, latents: Tensor, resolution: int) -> Tensor:
        return latents[:, :, 0]  # the first frame

    def conditioning(
        self, model: nn.Module, rows: int, text_tokens: int, resolution: int, make: TensorFactory
    ) -> dict[str, Any]:
        """The prompt's umT5 embeddings; for I2V also the condition image's CLIP tokens."""
        config = model.config
        inputs = {"encoder_hidden_states": make.randn(rows, text_tokens, config.text_dim)}
        if config.image_dim is not None:
            inputs["encoder_hidden_states_image"] = make.randn(rows, IMAGE_CONTEXT_TOKENS, config.image_dim)
        return inputs
