"""``apply_cat_pruning`` / ``remove_cat_pruning``: CAT pruning on a diffusers pipeline or transformer."""

from __future__ import annotations

import functools
from typing import Any

from diffusers.utils.torch_utils import is_compiled_module
from torch import nn

from .adapters import adapter_for
from .compatibility import check_before_apply, check_not_compiled_whole, generation_checks
from .config import CATPruningConfig
from .pruning import PruningState, attach, attached_state, detach


def _split_target(target: Any) -> tuple[Any | None, nn.Module]:
    """(pipeline or None, transformer) for a pipeline with a ``transformer`` component or a bare model; the
    transformer as given (``torch.compile(transformer)``'s wrapper stays a wrapper)."""
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
        target: the pipeline (recommended: its scheduler then tells when a generation starts, for every
            pipeline sharing it, e.g. made with ``from_pipe``) or its transformer.
        config: :class:`CATPruningConfig`; its defaults are the paper's (keep 30% of the tokens from step 8).

    Returns the pruning state: ``.stats`` describes the current (or last) generation, ``.reset()`` starts
    a new one by hand. Raises TypeError for an unsupported model and RuntimeError when pruning is already
    applied or the model carries something pruning cannot be combined with (an IP-Adapter or another
    non-default attention processor, a diffusers cache: see ``catprune.compatibility``, which also checks
    at every generation's first step for what was added later); nothing is changed when it raises.
    """
    config = config if config is not None else CATPruningConfig()
    if not isinstance(config, CATPruningConfig):
        raise TypeError(f"config must be a CATPruningConfig, got {type(config).__name__}")
    pipeline, transformer = _split_target(target)
    check_not_compiled_whole(transformer)
    adapter = adapter_for(transformer)
    if attached_state(transformer) is not None:
        raise RuntimeError(
            f"CAT pruning is already applied to this {type(transformer).__name__}; "
            "call remove_cat_pruning first to change its settings"
        )
    check_before_apply(transformer, adapter, config)
    state = attach(transformer, adapter, config)
    state.checks.extend(generation_checks(transformer, state))
    scheduler = getattr(pipeline, "scheduler", None)
    if hasattr(scheduler, "step_index"):
        state.clock.watch(scheduler)
        state.expected_steps = functools.partial(_steps_under_way, scheduler)
    return state


def remove_cat_pruning(target: Any) -> None:
    """Turn CAT pruning off: the model computes exactly as before ``apply_cat_pruning`` (a no-op if off)."""
    transformer = _split_target(target)[1]
    # ``torch.compile(transformer)`` (applied after pruning) wraps the module that carries the hooks.
    detach(transformer._orig_mod if is_compiled_module(transformer) else transformer)


def _steps_under_way(scheduler: Any) -> int | None:
    """Denoising steps of the loop under way, read at its first step from the scheduler: its timesteps
    after the begin index (img2img's strength cut)."""
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None:
        return None
    return (len(timesteps) - (getattr(scheduler, "begin_index", None) or 0)) // getattr(scheduler, "order", 1)
