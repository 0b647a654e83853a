"""Qwen-Image (text-to-image, Edit): ``QwenImageTransformer2DModel``.

Qwen-Image takes packed latents (B, N, 64) as FLUX.1 does (2x2 patches of 16 VAE channels) and runs 60
double-stream blocks: a joint attention over [text, image] with separate weights for each, separate MLPs,
no single-stream blocks. At a pruned step the selected image tokens and all text tokens go through every
block, and attend over the cached K/V of all image tokens (cached after q/k norm and rotary embedding).

- **Token layout.** The grid comes from the ``img_shapes`` argument, one list of (frames, height, width) per
  sample: the generated image first, then the reference images the Edit pipelines append to the sequence
  (their tokens are a fixed segment, recomputed at every step; the pipelines slice them off the output).
- **Rotary.** ``pos_embed`` returns complex tables (image, text); at fill and pruned steps a hook turns them
  into one real (cos, sin) table over [text, image], the image rows gathered per row at a pruned step, the
  form the shared caching processors apply. Full steps get the model's own tables untouched.
- **Text mask.** ``encoder_hidden_states_mask`` reaches the attention as a keyword the processor must name;
  the caching processor builds the key mask over [text, all image tokens] as the model's processor does.
- **Per-token modulation.** With ``zero_cond_t`` (Qwen-Image-Edit-2511) the model modulates the generated
  image's tokens at the timestep and the reference tokens at 0, through a per-token ``modulate_index`` it
  passes to every block: a pre-hook on each block gathers it like the tokens.
- **Guidance.** ``true_cfg_scale`` with a negative prompt is a second call per step under
  ``cache_context("uncond")`` (another pass, with its own caches). ControlNet residuals
  (``controlnet_block_samples``) are per image token and gathered at the selected tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from math import prod
from typing import Any, ClassVar

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0
from torch import Tensor, nn

from ..engine import CachingProcessor, Grid, StepMode, StepSlot, TokenLayout
from .attention import JointAttentionProcessor, joint_block_macs, real_rotary
from .base import KL_AUTOENCODER, PackedLatentAdapter, PublicModel, TensorFactory, linear_macs

_QWEN_IMAGE = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
}
"""``Qwen/Qwen-Image``, ``transformer/config.json`` (Qwen-Image-Edit and -Edit-2509 have the same)."""

TEXT_TOKENS = 128
"""Text tokens for measurement: Qwen-Image's pipelines pass the Qwen2.5-VL hidden states of the prompt
itself (the 34-token system template dropped), padded to the batch's longest prompt, at most 512; 128 is a
prompt of about 90 words (Qwen-Image's examples are long). The MAC ratio barely moves with it (T << N)."""

QWEN_PIPELINES = (
    "QwenImagePipeline",
    "QwenImageImg2ImgPipeline",
    "QwenImageInpaintPipeline",
    "QwenImageControlNetPipeline",
    "QwenImageEditPipeline",
    "QwenImageEditPlusPipeline",
)


class QwenJointAttentionProcessor(JointAttentionProcessor):
    """The joint attention of Qwen-Image's blocks: [text, image] in the caches as in the model, the rotary
    table as the ``pos_embed`` hook gives it, and the text mask named in the signature (diffusers'
    ``Attention`` passes a processor only the keywords its ``__call__`` names)."""

    def __init__(self, attention: nn.Module, slot: StepSlot) -> None:
        super().__init__(attention, slot, extra_first=True)

    def __call__(  # type: ignore[override]
        self,
        attn: Any,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        encoder_hidden_states_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_rotary_emb: Any = None,
    ) -> Any:
        inputs = {
            "encoder_hidden_states": encoder_hidden_states,
            "encoder_hidden_states_mask": encoder_hidden_states_mask,
            "attention_mask": attention_mask,
            "image_rotary_emb": image_rotary_emb,
        }
        if self.slot.mode is StepMode.FULL or attention_mask is not None:
            return self.original(attn, hidden_states, **inputs)  # the model's processor refuses a mask
        mask = None
        if encoder_hidden_states_mask is not None:  # bool (B, T): the keys [text, every image token]
            context = self.context
            image = encoder_hidden_states_mask.new_ones(
                encoder_hidden_states_mask.shape[0], context.num_tokens + context.fixed_tokens
            )
            mask = torch.cat([encoder_hidden_states_mask, image], dim=1)[:, None, None, :]  # (B, 1, 1, L)
        return self.attend(attn, hidden_states, encoder_hidden_states, mask, image_rotary_emb)


def image_shapes(arguments: dict[str, Any]) -> list[tuple[int, int, int]]:
    """The (frames, height, width) of the first sample's images: the generated one, then references."""
    shapes = arguments.get("img_shapes")
    if not shapes:
        raise ValueError("CAT pruning: the Qwen-Image transformer needs img_shapes (the token grid)")
    first = shapes[0]
    return [tuple(first)] if isinstance(first[0], int) else [tuple(shape) for shape in first]


class QwenImageAdapter(PackedLatentAdapter):
    family = "qwen-image"
    model_class = QwenImageTransformer2DModel
    gather_point = "img_in"
    scatter_point = "proj_out"
    token_arguments = ("controlnet_block_samples",)
    plain_processors = (QwenDoubleStreamAttnProcessor2_0,)
    cfg_batch = 1
    """True CFG is a second call per step (another pass), not a second batch row."""
    text_embedder = "txt_in"
    blocks = ("transformer_blocks",)

    scheduler_class = FlowMatchEulerDiscreteScheduler
    scheduler_config: ClassVar[Mapping[str, Any]] = {"shift": 3.0}
    """The pipelines shift the schedule by resolution; measurement uses a fixed shift (timesteps move, the
    cost does not)."""
    default_steps = 50
    guidance_scale = 4.0
    """``true_cfg_scale``: with a negative prompt, a second call per step."""
    default_text_tokens = TEXT_TOKENS
    text_tokens_by_pipeline: ClassVar[Mapping[str, int]] = dict.fromkeys(QWEN_PIPELINES, TEXT_TOKENS)
    vae_config: ClassVar[Mapping[str, Any]] = {**KL_AUTOENCODER, "latent_channels": 16}
    """A stand-in: Qwen-Image's VAE is a causal 3-D one (``AutoencoderKLQwenImage``, Wan's layout), which
    ``catprune bench --decode`` cannot build; this 2-D ``AutoencoderKL`` of the same latent shape times a
    comparable decode."""
    public_models: ClassVar[Mapping[str, PublicModel]] = {"qwen-image": PublicModel(_QWEN_IMAGE, TEXT_TOKENS)}

    def token_grid(self, model: nn.Module, arguments: dict[str, Any]) -> Grid:
        return self.token_layout(model, arguments).grid

    def token_layout(self, model: nn.Module, arguments: dict[str, Any]) -> TokenLayout:
        """From ``img_shapes`` (no host read): the generated image's grid, the reference images' tokens
        fixed."""
        shapes = image_shapes(arguments)
        frames, height, width = shapes[0]
        layout = TokenLayout(Grid(height, width, frames), sum(prod(shape) for shape in shapes[1:]))
        tokens = arguments["hidden_states"].shape[1]
        if layout.grid.num_tokens + layout.fixed_tokens != tokens:
            raise ValueError(
                f"CAT pruning: the Qwen-Image transformer got {tokens} image tokens but img_shapes {shapes}"
            )
        return layout

    def text_tokens(self, arguments: dict[str, Any]) -> int:
        return arguments["encoder_hidden_states"].shape[1]

    def attention_processors(self, model: nn.Module, slot: StepSlot) -> Iterator[CachingProcessor]:
        for block in model.transformer_blocks:
            yield QwenJointAttentionProcessor(block.attn, slot)

    def hooks(self, model: nn.Module, slot: StepSlot) -> list[Any]:
        """The rotary tables as the caching processors apply them, and each block's ``modulate_index``
        gathered at a pruned step."""

        def rotary(module: nn.Module, args: Any, output: tuple[Tensor, Tensor]) -> Any:
            context = slot.context
            if context is None or context.mode is StepMode.FULL:
                return output
            image, text = output  # complex (N + R, d/2), (T, d/2)
            image = context.gather_table(image)  # (N + R, d/2), or each row's (B, K + R, d/2)
            text = text.expand(*image.shape[:-2], *text.shape)  # (T, d/2) or (B, T, d/2)
            return real_rotary(torch.cat([text, image], dim=-2))  # [text, image] as the caches hold them

        def modulate_index(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> Any:
            context, index = slot.context, kwargs.get("modulate_index")
            if context is None or index is None:
                return None
            return args, {**kwargs, "modulate_index": context.gather(index)}  # (B, N + R) -> (B, K + R)

        return [
            model.pos_embed.register_forward_hook(rotary),
            *(
                block.register_forward_pre_hook(modulate_index, with_kwargs=True)
                for block in model.transformer_blocks
            ),
        ]

    # --- cost

    def embedder_macs(self, model: nn.Module) -> int:
        return linear_macs(model.get_submodule(self.gather_point))

    def block_macs(
        self, block: nn.Module, image_queries: int, image_tokens: int, text_tokens: int, pruned: bool
    ) -> int:
        return joint_block_macs(block, image_queries, image_tokens, text_tokens, ("img_mlp", "txt_mlp"))

    # --- the pipeline around the transformer

    def conditioning(
        self, model: nn.Module, rows: int, text_tokens: int, resolution: int, make: TensorFactory
    ) -> dict[str, Any]:
        height, width = self.image_grid(model.config, resolution)
        return {
            "encoder_hidden_states": make.randn(rows, text_tokens, model.config.joint_attention_dim),
            "img_shapes": [[(1, height, width)]] * rows,
        }
