"""Transformer architectures for measurement: the adapters' public configs, or a local diffusers folder.

MACs can be counted and speed can be timed without any checkpoint: :meth:`Architecture.build` makes a
model on the ``meta`` device (shapes only, no memory) or with random weights. A local diffusers folder
(a pipeline with ``transformer/config.json``, or a transformer folder) works the same way through
:func:`load_architecture`; :func:`resolve_architecture` takes either a name or a path. Every fact about a
model family (class, configs, text tokens, scheduler, steps, guidance) comes from its adapter.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import nn

from .adapters import ADAPTERS, ModelAdapter, TensorFactory, adapter_for_class_name


@dataclass(frozen=True)
class Architecture:
    """A transformer config plus the pipeline facts that matter for its cost.

    ``family`` names the adapter; ``config`` holds the constructor kwargs; ``text_tokens`` is how many text
    tokens a pipeline call feeds the transformer.
    """

    name: str
    family: str
    config: Mapping[str, Any]
    text_tokens: int
    default_steps: int
    scheduler_config: Mapping[str, Any] = field(default_factory=dict)
    weights: Path | None = None
    """The transformer folder of a local model (its weights can be loaded), None for a named architecture."""
    vae_config: Mapping[str, Any] | None = None
    """A local pipeline's ``vae/config.json``; None: the family's published VAE (``adapter.vae_config``)."""
    frames: int | None = None
    """A video's frames (video families only; None: the pipeline's default)."""
    width: int | None = None
    """A video's width in pixels (video families only; None: the family's usual width for the height)."""
    model_cfg_calls: int | None = None
    """Calls per step under guidance where this model's differ from its family's (``PublicModel.cfg_calls``);
    None: the family's."""
    boundary_ratio: float | None = None
    """Two experts that take turns (Wan 2.2 A14B): the first runs the timesteps >= ``boundary_ratio`` x
    the scheduler's training timesteps; None: one transformer."""

    @property
    def adapter(self) -> ModelAdapter:
        return ADAPTERS[self.family]

    @property
    def model_class(self) -> type[nn.Module]:
        return self.adapter.model_class

    @property
    def guidance_scale(self) -> float:
        return self.adapter.guidance_scale

    @property
    def cfg_batch(self) -> int:
        """Rows per prompt in a call under guidance (2: CFG as one batch; 1: guidance-distilled)."""
        return self.adapter.cfg_batch

    @property
    def cfg_calls(self) -> int:
        """Calls per step under guidance (2: CFG as a second call, each pass with its own caches)."""
        return self.adapter.cfg_calls if self.model_cfg_calls is None else self.model_cfg_calls

    @property
    def shape_config(self) -> Mapping[str, Any]:
        """The config the adapter sizes latents and grids by: the model's, with ``num_frames`` and ``width``
        for a video of :attr:`frames` frames and :attr:`width` pixels."""
        video = {"num_frames": self.frames, "width": self.width}
        return {**self.config, **{key: value for key, value in video.items() if value is not None}}

    def pixel_size(self, resolution: int) -> tuple[int, int, int]:
        """(frames, height, width) of what is generated at ``resolution``: one frame of a square image,
        or a video's (``resolution`` is its height)."""
        if self.adapter.default_frames is None:
            return 1, resolution, resolution
        return self.adapter.video_size(self.shape_config, resolution)

    def size_label(self, resolution: int) -> str:
        """The image's size in pixels, or a video's size and frames, at ``resolution``."""
        frames, height, width = self.pixel_size(resolution)
        if self.adapter.default_frames is None:
            return f"{height}x{width}"
        return f"{height}x{width}, {frames} frames"

    def with_video(self, frames: int | None = None, width: int | None = None) -> Architecture:
        """The same architecture measured on videos of ``frames`` frames and ``width`` pixels (None: the
        pipeline's frames, the family's width for the height)."""
        if frames is None and width is None:
            return self
        if self.adapter.default_frames is None:
            option = "frames" if frames is not None else "a width"
            raise ValueError(
                f"{self.name} generates square images: {option} applies to video models only "
                "(give the image's side as --resolution)"
            )
        for name, value in (("frames", frames), ("width", width)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        return dataclasses.replace(
            self,
            frames=self.frames if frames is None else frames,
            width=self.width if width is None else width,
        )

    def with_layers(self, num_layers: int | None) -> Architecture:
        """The same architecture cut to ``num_layers`` blocks of each kind (width kept); None: whole."""
        if num_layers is None:
            return self
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        name = f"{self.name} ({num_layers} layers)"
        depth = dict.fromkeys(self.adapter.depth_keys, num_layers)
        return dataclasses.replace(self, name=name, config={**self.config, **depth})

    def build(
        self, device: torch.device | str = "meta", dtype: torch.dtype | None = None, seed: int = 0
    ) -> nn.Module:
        """The transformer in eval mode: on ``meta`` it has shapes but no data (instant, no memory); on a real
        device it has random weights, seeded by ``seed`` (it reseeds torch's global generator)."""
        return _random_module(self.model_class, self.config, device, dtype, seed)

    def load(self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
        """The transformer with the local folder's weights, in eval mode."""
        if self.weights is None:
            raise ValueError(
                f"{self.name} is a named architecture without weights: build it with random weights"
            )
        return self.model_class.from_pretrained(self.weights, torch_dtype=dtype).to(device).eval()

    def build_vae(
        self, resolution: int, device: torch.device | str, dtype: torch.dtype | None = None, seed: int = 0
    ) -> nn.Module:
        """The pipeline's VAE (``AutoencoderKL``: the local pipeline's config, else the family's) with random
        weights, in eval mode: what timing the decode needs (no checkpoint). Raises ValueError when its
        latent channels are not the transformer's."""
        config = dict(self.vae_config or self.adapter.vae_config)
        latents = torch.empty(self.latent_shape(1, resolution), device="meta")
        channels = self.adapter.latent_image(latents, resolution).shape[1]
        if config.get("latent_channels", 4) != channels:
            raise ValueError(
                f"{self.name}: its latents have {channels} channels but the VAE config "
                f"{config.get('latent_channels', 4)}; for a local transformer give its pipeline folder "
                "(with vae/config.json)"
            )
        return _random_module(AutoencoderKL, config, device, dtype, seed)

    def decode(self, vae: nn.Module, latents: torch.Tensor, resolution: int) -> torch.Tensor:
        """Images (B, 3, H, W) from a generation's final latents, as the pipeline decodes them."""
        config = vae.config
        image_latents = self.adapter.latent_image(latents, resolution)  # (B, C, H/8, W/8)
        image_latents = image_latents / config.scaling_factor + (config.shift_factor or 0.0)
        return vae.decode(image_latents, return_dict=False)[0]

    def make_scheduler(self) -> SchedulerMixin:
        adapter = self.adapter
        return adapter.scheduler_class.from_config({**adapter.scheduler_config, **self.scheduler_config})

    def expert_switch_step(self, steps: int) -> int | None:
        """The step at which the second expert takes over in a generation of ``steps`` (the first whose
        timestep is below the boundary, as diffusers' ``WanPipeline`` switches); None for one transformer
        or a switch after the last step."""
        if self.boundary_ratio is None:
            return None
        scheduler = self.make_scheduler()
        scheduler.set_timesteps(steps)
        boundary = self.boundary_ratio * scheduler.config.num_train_timesteps
        return next((step for step, t in enumerate(scheduler.timesteps) if t < boundary), None)

    def latent_shape(self, batch: int, resolution: int) -> tuple[int, ...]:
        """The latents of ``batch`` square images of ``resolution`` pixels, as the pipeline makes them."""
        try:
            return self.adapter.latent_shape(self.shape_config, batch, resolution)
        except ValueError as error:
            raise ValueError(f"{self.name}: {error}") from None

    def image_tokens(self, resolution: int) -> int:
        height, width = self.adapter.image_grid(self.shape_config, resolution)
        return height * width

    def conditioning(
        self,
        model: nn.Module,
        rows: int,
        resolution: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Any]:
        """Transformer kwargs besides the latents and timestep, with random prompt embeddings of the shapes
        the pipeline's text encoders give (text encoding itself is not part of the transformer's cost)."""
        make = TensorFactory(device, dtype, generator)
        return self.adapter.conditioning(model, rows, self.text_tokens, resolution, make)

    def noise_prediction(self, model: nn.Module, output: torch.Tensor) -> torch.Tensor:
        """The channels the scheduler steps with (PixArt's learned sigma doubles the output channels)."""
        return self.adapter.noise_prediction(model, output)


def _random_module(
    model_class: Any,
    config: Mapping[str, Any],
    device: torch.device | str,
    dtype: torch.dtype | None,
    seed: int,
) -> nn.Module:
    """A diffusers model from ``config`` in eval mode, random weights seeded by ``seed`` (torch's global
    generator is reseeded), or shapes only on ``meta``."""
    if torch.device(device).type != "meta":
        torch.manual_seed(seed)
    with torch.device(device):
        model = model_class.from_config(dict(config))
    if dtype is not None:
        # nn.Module.to: diffusers' override warns about fp32-only modules, which concern checkpoints only.
        nn.Module.to(model, dtype=dtype)
    return model.eval()


ARCHITECTURES: dict[str, Architecture] = {
    name: Architecture(
        name,
        adapter.family,
        public.config,
        public.text_tokens,
        public.default_steps or adapter.default_steps,
        model_cfg_calls=public.cfg_calls,
        scheduler_config=public.scheduler_config,
        boundary_ratio=public.boundary_ratio,
    )
    for adapter in ADAPTERS.values()
    for name, public in adapter.public_models.items()
}


def load_architecture(path: str | Path) -> Architecture:
    """The architecture of a local diffusers folder: a pipeline (its ``transformer/`` subfolder is read,
    and its ``scheduler/`` config if present) or a transformer folder (the family's default pipeline facts).
    Only configs are read; no weights are loaded."""
    root = Path(path)
    folder = root / "transformer" if (root / "transformer" / "config.json").is_file() else root
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"no diffusers transformer config (config.json or transformer/config.json) in {root}"
        )
    config = json.loads((folder / "config.json").read_text())
    adapter = adapter_for_class_name(config.get("_class_name", ""))
    config = dict(adapter.model_class.load_config(folder))

    text_tokens = adapter.default_text_tokens
    scheduler_config: dict[str, Any] = {}
    vae_config = None
    if folder != root:
        if (root / "vae" / "config.json").is_file():
            vae_config = dict(AutoencoderKL.load_config(root / "vae"))
        index = root / "model_index.json"
        if index.is_file():
            pipeline = json.loads(index.read_text()).get("_class_name", "")
            text_tokens = adapter.text_tokens_by_pipeline.get(pipeline, text_tokens)
        if (root / "scheduler" / "scheduler_config.json").is_file():
            scheduler_config = dict(adapter.scheduler_class.load_config(root / "scheduler"))
    return Architecture(
        root.name or str(root),
        adapter.family,
        config,
        text_tokens=text_tokens,
        default_steps=adapter.default_steps,
        scheduler_config=scheduler_config,
        weights=folder,
        vae_config=vae_config,
    )


def resolve_architecture(name_or_path: str | Path) -> Architecture:
    """A named architecture (``sd3-medium``, ...) or the one of a local diffusers folder."""
    if str(name_or_path) in ARCHITECTURES:
        return ARCHITECTURES[str(name_or_path)]
    if Path(name_or_path).exists():
        return load_architecture(name_or_path)
    names = ", ".join(ARCHITECTURES)
    raise ValueError(f"unknown model {str(name_or_path)!r}: not a local diffusers folder, nor one of {names}")
