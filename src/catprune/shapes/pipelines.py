"""Pixel-space text-to-image pipelines for the shapes models: miniature SD3 and PixArt-Sigma.

Each pipeline drives the real diffusers transformer class with the sampler of its namesake, and batches
classifier-free guidance as diffusers' pipelines do (``encode_prompt`` once per call, then one
transformer call per step on ``[uncond..., cond...]``), so ``apply_cat_pruning`` treats them exactly as
it treats SD3 and PixArt-Sigma. Images are 3-channel pixels in [-1, 1]; there is no VAE.

Three models are shipped inside the package (:data:`SHIPPED_MODELS`): ``shapes-mmdit`` and
``shapes-pixart`` (32x32 pixels, a 16x16 token grid, the ``scenes`` caption grammar) and
``textures-mmdit`` (64x64 pixels, a 32x32 token grid, the ``textures`` grammar). A saved model's text
encoder holds its vocabulary, so :func:`prompt_grammar` tells the grammar of any saved shapes model
without loading its weights, and :func:`normalize_model_prompt` reads a prompt as that model's caption.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
)
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from PIL import Image

from ..adapters import ADAPTERS
from ..names import SHIPPED_MODELS as SHIPPED_MODELS
from .scenes import (
    PromptGrammarError,
)
from .scenes import normalize_prompt as normalize_shapes_prompt
from .text import ShapesTextEncoder
from .textures import PATTERNS, TEXTURES_GRAMMAR_LINE
from .textures import TEXTURES_GRAMMAR_HELP as TEXTURES_GRAMMAR_HELP
from .textures import normalize_prompt as normalize_textures_prompt

GRAMMARS: tuple[str, ...] = ("shapes", "textures")
"""The caption grammars of the shapes models: ``scenes``' (plain backgrounds) and ``textures``'."""


@dataclass
class TextConditioning:
    """Encoded prompts, rows ``[uncond..., cond...]`` under classifier-free guidance."""

    embeds: torch.Tensor
    pooled: torch.Tensor
    mask: torch.Tensor


class ShapesPipeline(DiffusionPipeline):
    """The shared sampling loop; subclasses call their transformer and say how to read its output."""

    transformer: Any
    scheduler: Any
    text_encoder: ShapesTextEncoder

    def __init__(
        self, transformer: Any, scheduler: Any, text_encoder: ShapesTextEncoder, guidance_scale: float
    ):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder)
        self.register_to_config(guidance_scale=guidance_scale)

    @property
    def image_size(self) -> int:
        return int(self.transformer.config.sample_size)

    def encode_prompt(
        self, prompt: str | Sequence[str], do_classifier_free_guidance: bool = True
    ) -> TextConditioning:
        """Encode prompts, preceded by as many empty (unconditional) prompts under guidance."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if do_classifier_free_guidance:
            prompts = [""] * len(prompts) + prompts
        embeds, pooled, mask = self.text_encoder.encode(prompts)
        return TextConditioning(embeds.to(self.transformer.dtype), pooled.to(self.transformer.dtype), mask)

    def model_output(
        self, sample: torch.Tensor, timestep: torch.Tensor, text: TextConditioning
    ) -> torch.Tensor:
        """The transformer's raw output for a batch (training reads all of it)."""
        raise NotImplementedError

    def prediction(self, output: torch.Tensor) -> torch.Tensor:
        """The part of the raw output the scheduler steps with."""
        return output

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        num_inference_steps: int = 28,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
    ) -> ImagePipelineOutput:
        """Generate images; ``output_type`` is "pil", "np" (uint8 NHWC) or "pt" (NCHW in [-1, 1])."""
        guidance = self.config.guidance_scale if guidance_scale is None else guidance_scale
        cfg = guidance > 1.0
        batch = 1 if isinstance(prompt, str) else len(prompt)
        text = self.encode_prompt(prompt, do_classifier_free_guidance=cfg)
        device, dtype = self.transformer.device, self.transformer.dtype
        shape = (batch, self.transformer.config.in_channels, self.image_size, self.image_size)
        if latents is None:
            latents = torch.randn(shape, generator=generator, device=generator.device if generator else "cpu")
        # DPM-Solver scales the initial noise (by 1 here); flow matching has no such attribute.
        sample = latents.to(device, dtype) * getattr(self.scheduler, "init_noise_sigma", 1.0)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([sample, sample]) if cfg else sample
            # Discrete Euler / Heun scale the input by the noise level; the others return it unchanged.
            scale = getattr(self.scheduler, "scale_model_input", None)
            model_input = scale(model_input, t) if scale is not None else model_input
            timestep = t.expand(model_input.shape[0])
            prediction = self.prediction(self.model_output(model_input, timestep, text))
            if cfg:
                uncond, cond = prediction.chunk(2)
                prediction = uncond + guidance * (cond - uncond)
            sample = self.scheduler.step(prediction, t, sample).prev_sample
        images = sample.float().clamp(-1, 1)
        if output_type == "pt":
            return ImagePipelineOutput(images=images)
        pixels = to_uint8(images)
        if output_type == "np":
            return ImagePipelineOutput(images=pixels)
        return ImagePipelineOutput(images=[Image.fromarray(p) for p in pixels])


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] to (B, H, W, 3) uint8."""
    scaled = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return scaled.permute(0, 2, 3, 1).cpu().numpy()


class ShapesMMDiTPipeline(ShapesPipeline):
    """SD3 in miniature: ``SD3Transformer2DModel`` (MMDiT), rectified flow sampled with Euler."""

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        text_encoder: ShapesTextEncoder,
        guidance_scale: float = 4.0,
    ):
        super().__init__(transformer, scheduler, text_encoder, guidance_scale)

    def model_output(
        self, sample: torch.Tensor, timestep: torch.Tensor, text: TextConditioning
    ) -> torch.Tensor:
        return self.transformer(
            hidden_states=sample,
            encoder_hidden_states=text.embeds,
            pooled_projections=text.pooled,
            timestep=timestep,
        ).sample


class ShapesPixArtPipeline(ShapesPipeline):
    """PixArt-Sigma in miniature: ``PixArtTransformer2DModel`` (epsilon + learned sigma), DPM-Solver++.

    As in diffusers' PixArt pipeline the ODE sampler uses the noise half of the output only.
    """

    def __init__(
        self,
        transformer: PixArtTransformer2DModel,
        scheduler: DPMSolverMultistepScheduler,
        text_encoder: ShapesTextEncoder,
        guidance_scale: float = 4.0,
    ):
        super().__init__(transformer, scheduler, text_encoder, guidance_scale)

    def model_output(
        self, sample: torch.Tensor, timestep: torch.Tensor, text: TextConditioning
    ) -> torch.Tensor:
        return self.transformer(
            sample,
            encoder_hidden_states=text.embeds,
            encoder_attention_mask=text.mask.to(text.embeds.dtype),
            timestep=timestep,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample

    def prediction(self, output: torch.Tensor) -> torch.Tensor:
        return ADAPTERS["pixart"].noise_prediction(self.transformer, output)


PIPELINE_CLASSES: dict[str, type[ShapesPipeline]] = {
    cls.__name__: cls for cls in (ShapesMMDiTPipeline, ShapesPixArtPipeline)
}


def shipped_model_path(name: str) -> Path:
    """Folder of a model shipped inside the package (one of :data:`SHIPPED_MODELS`)."""
    if name not in SHIPPED_MODELS:
        raise ValueError(f"unknown shipped model {name!r}; expected one of {', '.join(SHIPPED_MODELS)}")
    return Path(str(resources.files("catprune") / "models" / name))


def shapes_pipeline_class(path: str | Path) -> type[ShapesPipeline] | None:
    """The shapes pipeline class saved in a local pipeline folder, or None if it holds another pipeline."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return None
    return PIPELINE_CLASSES.get(json.loads(index.read_text()).get("_class_name"))


def is_shapes_model(model: str | Path) -> bool:
    """Whether ``model`` names a shipped shapes model or a folder holding a saved shapes pipeline."""
    return str(model) in SHIPPED_MODELS or shapes_pipeline_class(model) is not None


def load_shapes_pipeline(name_or_path: str | Path) -> ShapesPipeline:
    """Load a shipped model by name or a saved shapes pipeline folder (offline: nothing is downloaded)."""
    path = (
        shipped_model_path(str(name_or_path)) if str(name_or_path) in SHIPPED_MODELS else Path(name_or_path)
    )
    cls = shapes_pipeline_class(path)
    if cls is None:
        raise FileNotFoundError(f"no shapes pipeline (model_index.json of a shapes model) in {path}")
    pipe = cls.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def model_folder(name_or_path: str | Path) -> Path:
    """The folder of a shipped model's name, or the path itself."""
    name = str(name_or_path)
    return shipped_model_path(name) if name in SHIPPED_MODELS else Path(name_or_path)


def _component_config(model: str | Path, component: str) -> dict[str, Any]:
    """A saved shapes model's component config (``text_encoder``, ``transformer``), read without weights."""
    return json.loads((model_folder(model) / component / "config.json").read_text())


def prompt_grammar(model: str | Path) -> str | None:
    """The caption grammar of a shapes model (one of :data:`GRAMMARS`), None for any other model.

    Read from the saved text encoder's vocabulary (nothing is loaded): ``textures`` when it has the
    backdrop pattern words, ``shapes`` otherwise.
    """
    if not is_shapes_model(model):
        return None
    vocabulary = _component_config(model, "text_encoder").get("vocabulary") or ()
    return "textures" if set(PATTERNS) <= set(vocabulary) else "shapes"


def model_image_size(model: str | Path) -> int:
    """The side in pixels of a shapes model's images (32 or 64 for the shipped ones), read from its config."""
    return int(_component_config(model, "transformer")["sample_size"])


class TexturesPromptGrammarError(PromptGrammarError):
    """A prompt outside the textures grammar; ``str()`` is one line that shows that grammar."""

    def __str__(self) -> str:
        return f"{self.args[0]}; {TEXTURES_GRAMMAR_LINE}"


def normalize_model_prompt(prompt: str, grammar: str) -> str:
    """The canonical caption of ``prompt`` in ``grammar`` (:func:`prompt_grammar`), or PromptGrammarError
    (one line: the problem, then the grammar)."""
    if grammar == "shapes":
        return normalize_shapes_prompt(prompt)
    if grammar != "textures":
        raise ValueError(f"unknown grammar {grammar!r}; expected one of {', '.join(GRAMMARS)}")
    try:
        return normalize_textures_prompt(prompt)
    except PromptGrammarError as error:
        raise TexturesPromptGrammarError(error.args[0]) from None
