"""The adapter contract: what catprune knows about one transformer class, in three parts.

- :class:`PruningAdapter`, required: where to gather and scatter tokens, the token layout (grid and
  segments never pruned), per-token call arguments, the attention processors, the noise channels. This is
  all the step engine (``catprune.engine``) reads.
- :class:`CostModel`, optional: the MAC formula, from the layer shapes (without it, generations count no
  MACs; ``FlopCounterMode`` still counts them for ``catprune macs``).
- :class:`Catalogue`, optional: what the tools need to run the model without its pipeline: public
  configs, the pipeline's scheduler, steps, guidance and text tokens, the VAE config and the call inputs.

:func:`catprune.adapters.register_adapter` checks the required part, and each optional part the adapter
declares, and names whatever is missing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor, nn

from ..engine import CachingProcessor, Grid, ParallelPlan, StepMode, StepSlot, TokenLayout


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
    cfg_calls: int | None = None
    """Calls per step under guidance, where they differ from the family's ``Catalogue.cfg_calls`` (FLUX.3's
    step-distilled flow map: 1, it runs without guidance)."""
    scheduler_config: Mapping[str, Any] = field(default_factory=dict)
    """Where its scheduler differs from the family's (Wan 2.2 A14B's flow shift 12)."""
    boundary_ratio: float | None = None
    """A pipeline of two experts (Wan 2.2 A14B): the first runs the timesteps >= ``boundary_ratio`` x
    1000, the second (the same architecture, other weights) the rest."""


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


def gather_tokens(slot: StepSlot, tokens: Tensor, lead: int = 0) -> Tensor:
    """A per-token tensor (B, lead + N + R, ...) as the current call uses it: the selected image tokens at
    a pruned step (see :meth:`catprune.engine.StepContext.gather`), as it is otherwise."""
    context = slot.context
    return tokens if context is None else context.gather(tokens, lead)


def gather_input_hook(slot: StepSlot) -> Callable[..., Any]:
    """A forward pre-hook that gathers a module's first input, the token sequence (B, N + R, D), at the
    selected tokens: the gather point of a model whose sequence no module outputs (Z-Image, Wan)."""

    def gather_input(module: nn.Module, args: tuple[Any, ...]) -> Any:
        context = slot.context
        if context is None:
            return None
        return context.gather(args[0]), *args[1:]  # (B, L, D) -> (B, K + R, D)

    return gather_input


def gather_rotary_hook(slot: StepSlot, text_first: bool) -> Callable[..., Any]:
    """A forward pre-hook (``with_kwargs=True``) for a block that takes the model's rotary table (cos, sin),
    shared by all rows, as ``image_rotary_emb`` or as its last positional argument: at a pruned step each
    row's table over the block's sequence, [text T (``text_first``), image N, fixed R] -> (B, T + K + R, d).
    For models that concatenate the table inside ``forward`` from several ``pos_embed`` calls, where no
    module's output is the block's table (FLUX.2, FLUX.3)."""

    def gather_rotary(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        context = slot.context
        if context is None or context.mode is not StepMode.PRUNED:
            return None
        lead = context.text_tokens if text_first else 0
        if "image_rotary_emb" in kwargs:
            table = tuple(context.gather_table(part, lead) for part in kwargs["image_rotary_emb"])
            return args, {**kwargs, "image_rotary_emb": table}
        *rest, rotary = args
        return (*rest, tuple(context.gather_table(part, lead) for part in rotary)), kwargs

    return gather_rotary


class PruningAdapter(ABC):
    """The required part: everything the step engine needs from one transformer class.

    The engine gathers the selected tokens after ``gather_point``, scatters them back after
    ``scatter_point`` (or wherever :meth:`install` puts the hooks) and installs :meth:`processors`.
    """

    REQUIRED: ClassVar[tuple[str, ...]] = (
        "family",
        "model_class",
        "gather_point",
        "scatter_point",
        "token_arguments",
    )
    """Class attributes every adapter defines."""

    family: ClassVar[str]
    """Short name of the model family (``"sd3"``): the registry's key."""
    model_class: ClassVar[type[nn.Module]]
    gather_point: ClassVar[str]
    """Submodule whose output is the token sequence (B, N + R, D) that the blocks run on: the image tokens,
    then any fixed ones (see :class:`TokenLayout`); the gather happens after it."""
    scatter_point: ClassVar[str]
    """Submodule whose output is the output tokens (B, N + R, p*p*C) before unpatchify: the scatter point."""
    token_arguments: ClassVar[tuple[str, ...]]
    """Call arguments holding sequences (or mappings by block) of per-image-token tensors (B, N + R, D) that
    the blocks add to the tokens (ControlNet residuals): gathered at the selected tokens at a pruned step."""
    plain_processors: ClassVar[tuple[type, ...]] = ()
    """The model's own attention processors (beside diffusers' plain ones) that compute the plain attention
    the caching processors recompute, so that pruning may replace them (Qwen-Image's)."""
    cond_first: ClassVar[bool] = False
    """Whether the family's pipelines put CFG's conditional rows first (``[cond..., uncond...]``); diffusers'
    usual order is ``[uncond..., cond...]``."""
    context_parallel: ClassVar[ParallelPlan | None] = None
    """Where the model's ``_cp_plan`` splits the image tokens, for pruning under diffusers' context
    parallelism (``catprune.engine.parallel``); None: pruning refuses context parallelism."""

    @abstractmethod
    def token_grid(self, model: nn.Module, arguments: dict[str, Any]) -> Grid:
        """The image token grid of a call, from its bound arguments."""

    def token_layout(self, model: nn.Module, arguments: dict[str, Any]) -> TokenLayout:
        """The call's token sequence at the gather point: its grid, and no fixed tokens unless the adapter
        says so."""
        return TokenLayout(self.token_grid(model, arguments))

    def batch_rows(self, arguments: dict[str, Any]) -> int:
        """Batch rows of a call."""
        return self.call_latents(arguments).shape[0]

    def call_latents(self, arguments: dict[str, Any]) -> Tensor:
        """A call's latents (B, ...), one row per batch row: CFG pairs are told by its two halves being
        equal. diffusers' ``hidden_states`` unless the model names them otherwise (Z-Image's list ``x``)."""
        return arguments["hidden_states"]

    def call_timestep(self, arguments: dict[str, Any]) -> Any:
        """A call's timestep, which the step engine tells steps and passes by: ``timestep`` unless the model
        names it otherwise (Z-Image's ``t``)."""
        return arguments.get("timestep")

    @abstractmethod
    def text_tokens(self, arguments: dict[str, Any]) -> int:
        """Text tokens of a call, from its bound arguments."""

    @abstractmethod
    def noise_channels(self, model: nn.Module) -> int:
        """How many leading output channels form the noise prediction."""

    def noise_tokens(self, model: nn.Module, tokens: Tensor) -> Tensor:
        """Output tokens (B, N, p*p*C_out) -> their noise channels (B, N, p*p*C_noise)."""
        kept = self.noise_channels(model)
        # The model's own attribute where it sets one (PixArt: twice the input channels with learned
        # sigma), else its config's: diffusers deprecates reading a config key as a model attribute.
        out_channels = vars(model).get("out_channels") or model.config.out_channels
        if kept == out_channels:
            return tokens
        return tokens.unflatten(-1, (-1, out_channels))[..., :kept].flatten(-2)

    def is_auxiliary_call(self, arguments: dict[str, Any]) -> bool:
        """Whether a call is an extra evaluation inside a step (runs unpruned, is not counted as a step).
        No auxiliary calls unless an adapter says so."""
        return False

    @abstractmethod
    def attention_processors(self, model: nn.Module, slot: StepSlot) -> Iterator[CachingProcessor]:
        """One caching processor per attention layer that pruning replaces."""

    def check_pipeline(self, pipeline: Any) -> None:
        """Raise ValueError, naming the reason, for a pipeline whose use of the model pruning does not
        support (``apply_cat_pruning(pipe)`` asks before it changes anything); nothing by default."""
        return None

    def hooks(self, model: nn.Module, slot: StepSlot) -> list[Any]:
        """Module hooks the model needs besides the gather and scatter (their handles): per-token tables
        computed inside ``forward`` (rotary embeddings), gathered per row; none by default."""
        return []

    def install(self, model: nn.Module, slot: StepSlot, scatter: Callable[[Tensor], Tensor]) -> list[Any]:
        """The module hooks that gather after ``gather_point`` and call ``scatter`` after ``scatter_point``,
        then :meth:`hooks`; returns their handles. An adapter whose model has no such modules overrides
        it."""
        gather_module = model.get_submodule(self.gather_point)
        scatter_module = model.get_submodule(self.scatter_point)
        return [
            gather_module.register_forward_hook(lambda module, args, output: gather_tokens(slot, output)),
            scatter_module.register_forward_hook(lambda module, args, output: scatter(output)),
            *self.hooks(model, slot),
        ]

    def processors(self, model: nn.Module, slot: StepSlot, capture_attention: bool) -> list[CachingProcessor]:
        """:meth:`attention_processors`, with the attention map captured in the middle self-attention
        layer when the strategy needs one (AT-EDM)."""
        processors = list(self.attention_processors(model, slot))
        if capture_attention:
            capturing = [p for p in processors if hasattr(p, "capture_attention")]
            if not capturing:
                raise TypeError(f"{type(self).__name__} cannot capture the attention maps a strategy needs")
            capturing[len(capturing) // 2].capture_attention = True
        return processors


class CostModel(ABC):
    """Optional part: MACs of a call from the layer shapes."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("text_embedder", "blocks")

    text_embedder: ClassVar[str]
    """Submodule that projects the text embeddings (run on every step, for every text token)."""
    blocks: ClassVar[tuple[str, ...]]
    """The ``nn.ModuleList`` s of transformer blocks, in the order they run."""

    @abstractmethod
    def embedder_macs(self, model: nn.Module) -> int:
        """MACs per image token of the image-token embedder."""

    @abstractmethod
    def block_macs(
        self, block: nn.Module, image_queries: int, image_tokens: int, text_tokens: int, pruned: bool
    ) -> int:
        """MACs of one block per sample (see :meth:`step_macs`)."""

    def text_macs(self, model: nn.Module, text_tokens: int) -> int:
        """MACs per sample of projecting the text: ``text_embedder`` over every text token, unless the
        model embeds several text sources each over its own tokens (HunyuanVideo 1.5)."""
        return text_tokens * linear_macs(model.get_submodule(self.text_embedder))

    def step_macs(
        self, model: nn.Module, image_queries: int, image_tokens: int, text_tokens: int, pruned: bool
    ) -> int:
        """MACs of one transformer call per sample, from the layer shapes: ``image_queries`` of the
        ``image_tokens`` go through the blocks. adaLN and timestep embeddings, the same in every step and
        tiny, are left out."""
        total = image_tokens * self.embedder_macs(model)
        total += image_queries * linear_macs(model.get_submodule(self.scatter_point))  # type: ignore[attr-defined]
        total += self.text_macs(model, text_tokens)
        for blocks in self.blocks:
            for block in model.get_submodule(blocks):
                total += self.block_macs(block, image_queries, image_tokens, text_tokens, pruned)
        return total


class Catalogue(ABC):
    """Optional part: what the tools need to measure and run a family without its pipeline."""

    REQUIRED: ClassVar[tuple[str, ...]] = (
        "cfg_batch",
        "scheduler_class",
        "scheduler_config",
        "default_steps",
        "guidance_scale",
        "default_text_tokens",
        "text_tokens_by_pipeline",
        "public_models",
        "vae_config",
    )

    cfg_batch: ClassVar[int]
    """Rows per prompt in a call of the family's pipelines under guidance: 2 where classifier-free guidance
    is one batch of pairs (SD3, PixArt), 1 for guidance-distilled models (Flux)."""
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
    default_resolution: ClassVar[int] = 1024
    """The square image's side (a video's height) in pixels that the tools measure at by default."""
    default_frames: ClassVar[int | None] = None
    """A video family's frames per generation (its pipeline's ``num_frames``); None for images. A video
    family's ``latent_shape`` and ``image_grid`` size the video by :meth:`video_size`."""
    cfg_calls: ClassVar[int] = 1
    """Calls per step under classifier-free guidance: 2 where the pipeline runs CFG as a second call (Wan:
    two passes, each with its own caches), 1 otherwise."""

    video_widths: ClassVar[Mapping[int, int]] = {}
    """A video family's usual width by height (480p: 832 for Wan); other heights: square."""

    def video_size(self, config: Mapping[str, Any], resolution: int) -> tuple[int, int, int]:
        """A video family's (frames, height, width) in pixels at ``resolution`` (the video's height): the
        config's ``num_frames`` and ``width`` where the tools set them (``catprune macs --frames --width``),
        else the pipeline's frames and the family's usual width for that height."""
        if self.default_frames is None:
            raise NotImplementedError(f"{type(self).__name__} generates images")
        frames = int(config.get("num_frames", self.default_frames))
        width = int(config.get("width", self.video_widths.get(resolution, resolution)))
        return frames, resolution, width

    @abstractmethod
    def latent_shape(self, config: Mapping[str, Any], batch: int, resolution: int) -> tuple[int, ...]:
        """The latents of ``batch`` square images of ``resolution`` pixels, as the pipeline makes them."""

    @abstractmethod
    def image_grid(self, config: Mapping[str, Any], resolution: int) -> tuple[int, int]:
        """The image token grid (height, width) of a square image of ``resolution`` pixels."""

    @abstractmethod
    def latent_image(self, latents: Tensor, resolution: int) -> Tensor:
        """The denoised latents as the VAE takes them, (B, C, H/8, W/8), for square ``resolution`` images."""

    @abstractmethod
    def conditioning(
        self, model: nn.Module, rows: int, text_tokens: int, resolution: int, make: TensorFactory
    ) -> dict[str, Any]:
        """Transformer kwargs besides the latents and timestep, with random prompt embeddings of the shapes
        the pipeline's text encoders give (text encoding is not part of the transformer's cost)."""

    def call_inputs(self, latents: Tensor, timestep: Tensor) -> dict[str, Any]:
        """The transformer's keyword arguments for ``latents`` (as :meth:`latent_shape`) and ``timestep``
        (besides :meth:`conditioning`)."""
        return {"hidden_states": latents, "timestep": timestep}

    def call_output(self, output: Any) -> Tensor:
        """The transformer's first output as one tensor shaped like the latents."""
        return output

    def noise_prediction(self, model: nn.Module, output: Tensor) -> Tensor:
        """The channels of a (B, C, H, W) output that the scheduler steps with."""
        kept = self.noise_channels(model)  # type: ignore[attr-defined]
        return output if kept == output.shape[1] else output[:, :kept]


class ModelAdapter(PruningAdapter, CostModel, Catalogue):
    """An adapter with all three parts, as every built-in family has."""


class PatchedLatentAdapter(ModelAdapter):
    """For transformers that take 4-D latents (B, C, H, W) and cut them into p x p patches with a
    convolution (diffusers' ``PatchEmbed``: SD3, PixArt): grid, latent shape and embedder cost."""

    vae_scale_factor: ClassVar[int] = 8

    def token_grid(self, model: nn.Module, arguments: dict[str, Any]) -> Grid:
        patch, latents = model.config.patch_size, arguments["hidden_states"]
        return Grid(latents.shape[-2] // patch, latents.shape[-1] // patch)

    def embedder_macs(self, model: nn.Module) -> int:
        embedder = model.get_submodule(self.gather_point)
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


class PackedLatentAdapter(ModelAdapter):
    """For transformers that take packed latents (B, N, 4C): the pipeline packs each 2x2 patch of C VAE
    channels into one token (FLUX.1, Chroma, Qwen-Image), so a token covers 16x16 image pixels and every
    output channel is the noise prediction."""

    vae_scale_factor: ClassVar[int] = 8
    packing: ClassVar[int] = 2

    def noise_channels(self, model: nn.Module) -> int:
        return model.out_channels

    def noise_prediction(self, model: nn.Module, output: Tensor) -> Tensor:
        """Packed (B, N, C) output: every channel is the noise prediction."""
        return output

    def latent_shape(self, config: Mapping[str, Any], batch: int, resolution: int) -> tuple[int, ...]:
        height, width = self.image_grid(config, resolution)
        return batch, height * width, int(config["in_channels"])

    def latent_image(self, latents: Tensor, resolution: int) -> Tensor:
        """Packed (B, N, C*4) latents -> (B, C, H/8, W/8), as ``FluxPipeline._unpack_latents``."""
        height, width = self.image_grid({}, resolution)
        packing = self.packing
        batch, channels = latents.shape[0], latents.shape[2] // (packing * packing)
        grid = latents.view(batch, height, width, channels, packing, packing)  # (B, h, w, C, 2, 2)
        grid = grid.permute(0, 3, 1, 4, 2, 5)  # (B, C, h, 2, w, 2)
        return grid.reshape(batch, channels, height * packing, width * packing)  # (B, C, H/8, W/8)

    def image_grid(self, config: Mapping[str, Any], resolution: int) -> tuple[int, int]:
        pixels = self.vae_scale_factor * self.packing
        if resolution % pixels:
            raise ValueError(f"resolution must be a multiple of {pixels}, got {resolution}")
        return resolution // pixels, resolution // pixels
