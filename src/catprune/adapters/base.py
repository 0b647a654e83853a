"""What an adapter tells the rest of catprune about one transformer class, and the checks at registration.

An adapter owns everything model-specific: which modules gather and scatter, its attention processors,
the token grid, text tokens, noise channels, the MAC formula, the public configs of its checkpoints and
the pipeline facts that set their cost (text tokens, scheduler, default steps and guidance). The base class
has no model's defaults: what an adapter must say is listed in :data:`REQUIRED_ATTRIBUTES` and the
abstract methods, and :func:`catprune.adapters.register_adapter` refuses an adapter that omits any of it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import nn

from ..pruning import CachingProcessor, PruningState

REQUIRED_ATTRIBUTES = (
    "family",
    "model_class",
    "embedder",
    "output_projection",
    "token_arguments",
    "cfg_batch",
    "text_embedder",
    "blocks",
    "scheduler_class",
    "scheduler_config",
    "default_steps",
    "guidance_scale",
    "default_text_tokens",
    "text_tokens_by_pipeline",
    "public_models",
    "vae_config",
)
"""Class attributes every adapter defines (see :class:`ModelAdapter`)."""


@dataclass(frozen=True)
class TensorFactory:
    """Makes the inputs of a transformer call on one device and dtype; random ones from ``generator``."""

    device: torch.device | str | None = None
    dtype: torch.dtype | None = None
    generator: torch.Generator | None = None

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, device=self.device, dtype=self.dtype)

    def full(self, shape: tuple[int, ...], value: float) -> torch.Tensor:
        return torch.full(shape, value, device=self.device, dtype=self.dtype)


@dataclass(frozen=True)
class PublicModel:
    """A published checkpoint's transformer config and how many text tokens its pipeline feeds it."""

    config: Mapping[str, Any]
    text_tokens: int
    default_steps: int | None = None
    """Steps its pipeline runs by default, where they differ from the family's (FLUX.1-schnell's 4)."""


KL_AUTOENCODER: Mapping[str, Any] = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "sample_size": 1024,
}
"""The ``AutoencoderKL`` layout shared by the SD3, Flux and SDXL VAEs (8x down, 512 channels deep); each
adapter's ``vae_config`` adds its latent channels and scaling."""


def linear_macs(*modules: nn.Module | None) -> int:
    """Multiply-accumulates per token of every ``nn.Linear`` inside ``modules``."""
    return sum(
        layer.in_features * layer.out_features
        for module in modules
        if module is not None
        for layer in module.modules()
        if isinstance(layer, nn.Linear)
    )


class ModelAdapter(ABC):
    """Everything catprune knows about one transformer class.

    The mechanism (``catprune.pruning``) gathers the selected tokens after ``embedder``, scatters them back
    after ``output_projection`` and installs :meth:`processors`; measurement and the tools read the
    pipeline facts and ``public_models``.
    """

    family: ClassVar[str]
    """Short name of the model family (``"sd3"``), used by ``catprune.architectures``."""
    model_class: ClassVar[type[nn.Module]]
    embedder: ClassVar[str]
    """Submodule whose output is the image tokens (B, N, D): the gather happens after it."""
    output_projection: ClassVar[str]
    """Submodule whose output is the output tokens (B, n, p*p*C) before unpatchify: the scatter point."""
    token_arguments: ClassVar[tuple[str, ...]]
    """Call arguments holding sequences of per-image-token tensors (B, N, D) that the blocks add to the image
    tokens (ControlNet residuals): gathered at the selected tokens at a pruned step."""
    cfg_batch: ClassVar[int]
    """Rows per prompt in a call of the family's pipelines under guidance: 2 where classifier-free guidance
    is one batch ``[uncond..., cond...]`` (SD3, PixArt), 1 for guidance-distilled models (Flux)."""
    text_embedder: ClassVar[str]
    """Submodule that projects the text embeddings (run on every step, for every text token)."""
    blocks: ClassVar[tuple[str, ...]]
    """The ``nn.ModuleList`` s of transformer blocks, in the order they run."""

    scheduler_class: ClassVar[type[SchedulerMixin]]
    scheduler_config: ClassVar[Mapping[str, Any]]
    default_steps: ClassVar[int]
    guidance_scale: ClassVar[float]
    default_text_tokens: ClassVar[int]
    """Text tokens the family's main pipeline feeds the transformer."""
    text_tokens_by_pipeline: ClassVar[Mapping[str, int]]
    """Text tokens by pipeline class name, for a local pipeline folder whose ``model_index.json`` names it."""
    public_models: ClassVar[Mapping[str, PublicModel]]
    """Named public architectures (``catprune macs --model NAME``)."""
    vae_config: ClassVar[Mapping[str, Any]]
    """The ``AutoencoderKL`` config of the family's published pipelines: ``catprune bench --decode`` times
    the decode with random weights."""
    depth_keys: ClassVar[tuple[str, ...]] = ("num_layers",)
    """Config keys that count blocks: ``Architecture.with_layers`` sets each (Flux has two kinds)."""

    # --- the mechanism's questions

    @abstractmethod
    def token_grid(self, model: nn.Module, arguments: dict[str, Any]) -> tuple[int, int]:
        """The (height, width) of the image token grid of a call, from its bound arguments."""

    @abstractmethod
    def noise_channels(self, model: nn.Module) -> int:
        """How many leading output channels form the noise prediction."""

    def noise_tokens(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """Output tokens (B, N, p*p*C_out) -> their noise channels (B, N, p*p*C_noise)."""
        kept = self.noise_channels(model)
        if kept == model.out_channels:
            return tokens
        return tokens.unflatten(-1, (-1, model.out_channels))[..., :kept].flatten(-2)

    def is_auxiliary_call(self, arguments: dict[str, Any]) -> bool:
        """Whether a call is an extra evaluation inside a step (runs unpruned, is not counted as a step).
        No auxiliary calls unless an adapter says so."""
        return False

    @abstractmethod
    def text_tokens(self, arguments: dict[str, Any]) -> int:
        """Text tokens of a call, from its bound arguments."""

    @abstractmethod
    def attention_processors(self, model: nn.Module, state: PruningState) -> Iterator[CachingProcessor]:
        """One caching processor per attention layer that pruning replaces."""

    def hooks(self, model: nn.Module, state: PruningState) -> list[Any]:
        """Module hooks the model needs besides the gather and scatter (their handles); none by default."""
        return []

    def processors(self, model: nn.Module, state: PruningState) -> list[CachingProcessor]:
        """:meth:`attention_processors`, with the attention map captured in the middle self-attention
        layer when the strategy needs one (AT-EDM)."""
        processors = list(self.attention_processors(model, state))
        if state.selector.needs_attention:
            capturing = [p for p in processors if hasattr(p, "capture_attention")]
            if not capturing:
                raise TypeError(
                    f"{type(self).__name__} cannot capture attention maps for {state.config.strategy}"
                )
            capturing[len(capturing) // 2].capture_attention = True
        return processors

    # --- cost

    @abstractmethod
    def embedder_macs(self, model: nn.Module) -> int:
        """MACs per image token of the image-token embedder."""

    @abstractmethod
    def block_macs(
        self, block: nn.Module, image_queries: int, image_tokens: int, text_tokens: int, pruned: bool
    ) -> int:
        """MACs of one block per sample (see :meth:`step_macs`)."""

    def step_macs(
        self, model: nn.Module, image_queries: int, image_tokens: int, text_tokens: int, pruned: bool
    ) -> int:
        """MACs of one transformer call per sample, from the layer shapes: ``image_queries`` of the
        ``image_tokens`` go through the blocks. adaLN and timestep embeddings, the same in every step and
        tiny, are left out."""
        total = image_tokens * self.embedder_macs(model)
        total += image_queries * linear_macs(model.get_submodule(self.output_projection))
        total += text_tokens * linear_macs(model.get_submodule(self.text_embedder))
        for blocks in self.blocks:
            for block in model.get_submodule(blocks):
                total += self.block_macs(block, image_queries, image_tokens, text_tokens, pruned)
        return total

    # --- the pipeline around the transformer (measurement without a pipeline)

    @abstractmethod
    def latent_shape(self, config: Mapping[str, Any], batch: int, resolution: int) -> tuple[int, ...]:
        """The latents of ``batch`` square images of ``resolution`` pixels, as the pipeline makes them."""

    @abstractmethod
    def image_grid(self, config: Mapping[str, Any], resolution: int) -> tuple[int, int]:
        """The image token grid (height, width) of a square image of ``resolution`` pixels."""

    @abstractmethod
    def latent_image(self, latents: torch.Tensor, resolution: int) -> torch.Tensor:
        """The denoised latents as the VAE takes them, (B, C, H/8, W/8), for square ``resolution`` images."""

    @abstractmethod
    def conditioning(
        self, model: nn.Module, rows: int, text_tokens: int, resolution: int, make: TensorFactory
    ) -> dict[str, Any]:
        """Transformer kwargs besides the latents and timestep, with random prompt embeddings of the shapes
        the pipeline's text encoders give (text encoding is not part of the transformer's cost)."""

    def noise_prediction(self, model: nn.Module, output: torch.Tensor) -> torch.Tensor:
        """The channels of a (B, C, H, W) output that the scheduler steps with."""
        kept = self.noise_channels(model)
        return output if kept == output.shape[1] else output[:, :kept]


class PatchedLatentAdapter(ModelAdapter):
    """For transformers that take 4-D latents (B, C, H, W) and cut them into p x p patches with a
    convolution (diffusers' ``PatchEmbed``: SD3, PixArt): grid, latent shape and embedder cost."""

    vae_scale_factor: ClassVar[int] = 8

    def token_grid(self, model: nn.Module, arguments: dict[str, Any]) -> tuple[int, int]:
        patch, latents = model.config.patch_size, arguments["hidden_states"]
        return latents.shape[-2] // patch, latents.shape[-1] // patch

    def embedder_macs(self, model: nn.Module) -> int:
        embedder = model.get_submodule(self.embedder)
        return sum(conv.weight.numel() for conv in embedder.modules() if isinstance(conv, nn.Conv2d))

    def latent_shape(self, config: Mapping[str, Any], batch: int, resolution: int) -> tuple[int, ...]:
        patch = int(config["patch_size"])
        if resolution % (self.vae_scale_factor * patch):
            raise ValueError(
                f"resolution must be a multiple of {self.vae_scale_factor * patch}, got {resolution}"
            )
        side = resolution // self.vae_scale_factor
        return batch, int(config["in_channels"]), side, side

    def image_grid(self, config: Mapping[str, Any], resolution: int) -> tuple[int, int]:
        side = self.latent_shape(config, 1, resolution)[-1] // int(config["patch_size"])
        return side, side

    def latent_image(self, latents: torch.Tensor, resolution: int) -> torch.Tensor:
        return latents  # (B, C, H/8, W/8) already
