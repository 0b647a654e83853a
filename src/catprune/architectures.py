"""Public architecture configs of the supported transformers, and the pipeline facts that set their cost.

MACs can be counted and speed can be timed without any checkpoint: :meth:`Architecture.build` makes a
model on the ``meta`` device (shapes only, no memory) or with random weights. A local diffusers folder
(a pipeline with ``transformer/config.json``, or a transformer folder) works the same way through
:func:`load_architecture`; :func:`resolve_architecture` takes either a name or a path.

The constructor kwargs are those published with each checkpoint (``/shared/reference/model-configs.md``);
the text-token counts are what each pipeline feeds the transformer by default.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import nn

Family = Literal["sd3", "pixart"]


@dataclass(frozen=True)
class FamilyFacts:
    """What every model of one transformer class shares: its class and its pipeline's loop."""

    model_class: type[nn.Module]
    scheduler_class: type[SchedulerMixin]
    scheduler_config: Mapping[str, Any]
    default_text_tokens: int
    default_steps: int
    guidance_scale: float


FAMILIES: dict[Family, FamilyFacts] = {
    # StableDiffusion3Pipeline: 77 CLIP tokens (CLIP-L + CLIP-G, padded to T5's width) + 256 T5 tokens.
    "sd3": FamilyFacts(SD3Transformer2DModel, FlowMatchEulerDiscreteScheduler, {"shift": 3.0}, 333, 28, 7.0),
    # PixArtSigmaPipeline: max_sequence_length=300 T5 tokens, through cross-attention only.
    "pixart": FamilyFacts(PixArtTransformer2DModel, DPMSolverMultistepScheduler, {}, 300, 20, 4.5),
}

TEXT_TOKENS_BY_PIPELINE = {
    "StableDiffusion3Pipeline": 333,
    "PixArtSigmaPipeline": 300,
    "PixArtAlphaPipeline": 120,
}
"""Text tokens reaching the transformer, for a local pipeline folder whose ``model_index.json`` names it."""


@dataclass(frozen=True)
class Architecture:
    """A transformer config plus the pipeline facts that matter for its cost.

    ``config`` holds the constructor kwargs; ``text_tokens`` is how many text tokens a pipeline call feeds
    the transformer; ``cfg_batch`` the rows per prompt under classifier-free guidance.
    """

    name: str
    family: Family
    config: Mapping[str, Any]
    text_tokens: int
    default_steps: int
    scheduler_config: Mapping[str, Any] = field(default_factory=dict)
    vae_scale_factor: int = 8
    cfg_batch: int = 2
    weights: Path | None = None
    """The transformer folder of a local model (its weights can be loaded), None for a named architecture."""

    @property
    def facts(self) -> FamilyFacts:
        return FAMILIES[self.family]

    @property
    def model_class(self) -> type[nn.Module]:
        return self.facts.model_class

    @property
    def latent_channels(self) -> int:
        return int(self.config["in_channels"])

    @property
    def guidance_scale(self) -> float:
        return self.facts.guidance_scale

    def with_layers(self, num_layers: int | None) -> Architecture:
        """The same architecture cut to ``num_layers`` blocks (width kept); None keeps it whole."""
        if num_layers is None:
            return self
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        name = f"{self.name} ({num_layers} layers)"
        return dataclasses.replace(self, name=name, config={**self.config, "num_layers": num_layers})

    def build(
        self, device: torch.device | str = "meta", dtype: torch.dtype | None = None, seed: int = 0
    ) -> nn.Module:
        """The transformer in eval mode: on ``meta`` it has shapes but no data (instant, no memory); on a real
        device it has random weights, seeded by ``seed`` (it reseeds torch's global generator)."""
        if torch.device(device).type != "meta":
            torch.manual_seed(seed)
        with torch.device(device):
            model = self.model_class.from_config(dict(self.config))
        if dtype is not None:
            # nn.Module.to: diffusers' override warns about fp32-only modules, which concern checkpoints only.
            nn.Module.to(model, dtype=dtype)
        return model.eval()

    def load(self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
        """The transformer with the local folder's weights, in eval mode."""
        if self.weights is None:
            raise ValueError(
                f"{self.name} is a named architecture without weights: build it with random weights"
            )
        return self.model_class.from_pretrained(self.weights, torch_dtype=dtype).to(device).eval()

    def make_scheduler(self) -> SchedulerMixin:
        return self.facts.scheduler_class.from_config(
            {**self.facts.scheduler_config, **self.scheduler_config}
        )

    def latent_shape(self, batch: int, resolution: int) -> tuple[int, int, int, int]:
        """The latent (batch, C, H/8, W/8) of a square ``resolution`` image."""
        patch = int(self.config["patch_size"])
        if resolution % (self.vae_scale_factor * patch):
            raise ValueError(
                f"resolution must be a multiple of {self.vae_scale_factor * patch} for {self.name}, "
                f"got {resolution}"
            )
        side = resolution // self.vae_scale_factor
        return batch, self.latent_channels, side, side

    def image_tokens(self, resolution: int) -> int:
        side = self.latent_shape(1, resolution)[-1] // int(self.config["patch_size"])
        return side * side

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

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(shape, generator=generator, device=device, dtype=dtype)

        config = model.config
        if self.family == "sd3":
            return {
                "encoder_hidden_states": randn(rows, self.text_tokens, config.joint_attention_dim),
                "pooled_projections": randn(rows, config.pooled_projection_dim),
            }
        micro_conditions: dict[str, torch.Tensor | None] = {"resolution": None, "aspect_ratio": None}
        if model.use_additional_conditions:  # PixArt-alpha's pipeline passes the image size
            size = torch.full((rows, 2), float(resolution), device=device, dtype=dtype)
            micro_conditions = {
                "resolution": size,
                "aspect_ratio": torch.ones(rows, 1, device=device, dtype=dtype),
            }
        return {
            "encoder_hidden_states": randn(rows, self.text_tokens, config.caption_channels),
            "encoder_attention_mask": torch.ones(rows, self.text_tokens, device=device, dtype=dtype),
            "added_cond_kwargs": micro_conditions,
        }

    def noise_prediction(self, output: torch.Tensor) -> torch.Tensor:
        """The channels the scheduler steps with (PixArt's learned sigma doubles the output channels)."""
        if output.shape[1] == 2 * self.latent_channels:
            return output[:, : self.latent_channels]
        return output


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
_PIXART_SIGMA = {
    "sample_size": 128,
    "num_layers": 28,
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": 8,
    "patch_size": 2,
    "attention_bias": True,
    "cross_attention_dim": 1152,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "caption_channels": 4096,
    "interpolation_scale": 2,
    "use_additional_conditions": False,
}

ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture("sd3-medium", "sd3", _SD3_MEDIUM, text_tokens=333, default_steps=28),
        Architecture(
            "sd3.5-medium",
            "sd3",
            {
                **_SD3_MEDIUM,
                "pos_embed_max_size": 384,
                "dual_attention_layers": tuple(range(13)),
                "qk_norm": "rms_norm",
            },
            text_tokens=333,
            default_steps=28,
        ),
        Architecture(
            "sd3.5-large",
            "sd3",
            {
                **_SD3_MEDIUM,
                "num_layers": 38,
                "num_attention_heads": 38,
                "caption_projection_dim": 2432,
                "qk_norm": "rms_norm",
            },
            text_tokens=333,
            default_steps=28,
        ),
        Architecture("pixart-sigma", "pixart", _PIXART_SIGMA, text_tokens=300, default_steps=20),
        Architecture(
            "pixart-alpha",
            "pixart",
            {**_PIXART_SIGMA, "use_additional_conditions": True},
            text_tokens=120,
            default_steps=20,
        ),
    )
}


def _family_of(class_name: str) -> Family:
    for family, facts in FAMILIES.items():
        if facts.model_class.__name__ == class_name:
            return family
    supported = ", ".join(facts.model_class.__name__ for facts in FAMILIES.values())
    raise ValueError(f"unsupported transformer class {class_name!r}; supported: {supported}")


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
    family = _family_of(config.get("_class_name", ""))
    facts = FAMILIES[family]
    config = dict(facts.model_class.load_config(folder))

    text_tokens = facts.default_text_tokens
    scheduler_config: dict[str, Any] = {}
    if folder != root:
        index = root / "model_index.json"
        if index.is_file():
            pipeline = json.loads(index.read_text()).get("_class_name", "")
            text_tokens = TEXT_TOKENS_BY_PIPELINE.get(pipeline, text_tokens)
        if (root / "scheduler" / "scheduler_config.json").is_file():
            scheduler_config = dict(facts.scheduler_class.load_config(root / "scheduler"))
    return Architecture(
        root.name or str(root),
        family,
        config,
        text_tokens=text_tokens,
        default_steps=facts.default_steps,
        scheduler_config=scheduler_config,
        weights=folder,
    )


def resolve_architecture(name_or_path: str | Path) -> Architecture:
    """A named architecture (``sd3-medium``, ...) or the one of a local diffusers folder."""
    if str(name_or_path) in ARCHITECTURES:
        return ARCHITECTURES[str(name_or_path)]
    if Path(name_or_path).exists():
        return load_architecture(name_or_path)
    names = ", ".join(ARCHITECTURES)
    raise ValueError(f"unknown model {str(name_or_path)!r}: not a local diffusers folder, nor one of {names}")
