"""``apply_cat_pruning`` / ``remove_cat_pruning``: CAT pruning on a diffusers pipeline or transformer."""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn

from .adapters import adapter_for
from .config import CATPruningConfig
from .pruning import PruningState, attach, attached_state, detach


def _split_target(target: Any) -> tuple[Any | None, nn.Module]:
    """(pipeline or None, transformer) for a pipeline with a ``transformer`` component or a bare model."""
    transformer = getattr(target, "transformer", None)
    if isinstance(transformer, nn.Module) and not isinstance(target, nn.Module):
        return target, transformer
    if isinstance(target, nn.Module):
        return None, target
    raise TypeError(
        f"apply_cat_pruning takes a diffusers pipeline with a transformer or the transformer itself, "
        f"got {type(target).__name__}"
    )


def apply_cat_pruning(target: Any, config: CATPruningConfig | None = None) -> PruningState:
    """Turn CAT pruning on for a pipeline (``StableDiffusion3Pipeline``, ...) or its transformer.

    Important args:
        target: the pipeline (recommended: it then knows when a generation starts and whether CFG is on)
            or its transformer.
        config: :class:`CATPruningConfig`; its defaults are the paper's (keep 30% of the tokens from step 8).

    Returns the pruning state: ``.stats`` describes the current (or last) generation, ``.reset()`` starts
    a new one by hand. Raises TypeError for an unsupported model and RuntimeError when pruning is already
    applied; nothing is changed when it raises.
    """
    config = config if config is not None else CATPruningConfig()
    if not isinstance(config, CATPruningConfig):
        raise TypeError(f"config must be a CATPruningConfig, got {type(config).__name__}")
    pipeline, transformer = _split_target(target)
    adapter = adapter_for(transformer)
    if attached_state(transformer) is not None:
        raise RuntimeError(
            f"CAT pruning is already applied to this {type(transformer).__name__}; "
            "call remove_cat_pruning first to change its settings"
        )
    state = attach(transformer, adapter, config)
    if pipeline is not None:
        _watch_prompt_encoding(pipeline, state)
        state.expected_steps = functools.partial(_steps_under_way, pipeline)
    return state


def remove_cat_pruning(target: Any) -> None:
    """Turn CAT pruning off: the model computes exactly as before ``apply_cat_pruning`` (a no-op if off)."""
    pipeline, transformer = _split_target(target)
    if pipeline is not None:
        pipeline.__dict__.pop("encode_prompt", None)
    detach(transformer)


def _steps_under_way(pipeline: Any) -> int | None:
    """Denoising steps of the pipeline call under way, read at its first step: diffusers pipelines record
    them in ``_num_timesteps`` before the loop (SD3, Flux: after img2img's strength cut), others leave
    them in their scheduler's timesteps."""
    steps = getattr(pipeline, "_num_timesteps", None)
    if steps is None:
        timesteps = getattr(getattr(pipeline, "scheduler", None), "timesteps", None)
        steps = None if timesteps is None else len(timesteps)
    return steps


def _watch_prompt_encoding(pipeline: Any, state: PruningState) -> None:
    """Every pipeline call encodes its prompt once before denoising: that starts a generation, and its
    ``do_classifier_free_guidance`` argument says whether the batch holds [uncond..., cond...] pairs."""
    encode_prompt = pipeline.encode_prompt
    signature = inspect.signature(encode_prompt)
    parameter = signature.parameters.get("do_classifier_free_guidance")
    default_cfg = bool(parameter.default) if parameter is not None else False

    @functools.wraps(encode_prompt)
    def encode_prompt_and_begin_generation(*args: Any, **kwargs: Any) -> Any:
        arguments = signature.bind_partial(*args, **kwargs).arguments
        state.begin_generation(bool(arguments.get("do_classifier_free_guidance", default_cfg)))
        return encode_prompt(*args, **kwargs)

    pipeline.encode_prompt = encode_prompt_and_begin_generation
