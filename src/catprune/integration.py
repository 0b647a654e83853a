"""``apply_cat_pruning`` / ``remove_cat_pruning``: CAT pruning on a diffusers pipeline or transformer."""

from __future__ import annotations

import warnings
import weakref
from typing import Any

from diffusers.utils.torch_utils import is_compiled_module
from torch import nn

from .adapters import adapter_for
from .compatibility import check_before_apply, check_not_compiled_whole, generation_checks
from .config import CATPruningConfig
from .engine import PruningEngine, attach, attach_expert, attached_engine, detach


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


def apply_cat_pruning(target: Any, config: CATPruningConfig | None = None) -> PruningEngine:
    """Turn CAT pruning on for a pipeline (``StableDiffusion3Pipeline``, ...) or its transformer.

    Important args:
        target: the pipeline (recommended: its scheduler, looked up on it at every call, then tells when a
            generation and a step start, for every pipeline sharing it, e.g. made with ``from_pipe``) or its
            transformer.
        config: :class:`CATPruningConfig`; its defaults are the paper's (keep 30% of the tokens from step 8).

    Returns the pruning engine: ``.stats`` describes the current (or last) generation, ``.reset()`` starts
    a new one by hand. Raises TypeError for an unsupported model, ValueError for an unknown token-choice
    strategy, and RuntimeError when pruning is already
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
    if attached_engine(transformer) is not None:
        raise RuntimeError(
            f"CAT pruning is already applied to this {type(transformer).__name__}; "
            "call remove_cat_pruning first to change its settings"
        )
    check_before_apply(transformer, adapter, config)
    experts = _experts(pipeline, adapter, config)
    if pipeline is not None:
        adapter.check_pipeline(pipeline)
    engine = attach(transformer, adapter, config)
    engine.checks.extend(generation_checks(transformer, engine))
    for expert in experts:
        attach_expert(engine, expert)
        engine.checks.extend(generation_checks(expert, engine))
    if pipeline is not None and hasattr(pipeline, "scheduler"):
        pipeline_ref = weakref.ref(pipeline)
        engine.tracker.scheduler = lambda: getattr(pipeline_ref(), "scheduler", None)
        engine.detect_cfg = True
    return engine


def _experts(pipeline: Any | None, adapter: Any, config: CATPruningConfig) -> list[nn.Module]:
    """A pipeline's second expert (``transformer_2``: Wan 2.2 A14B's low-noise transformer, which takes
    over from ``transformer`` partway through the schedule), checked as the first one is; pruned by the
    same engine, so that a generation has one step count and one selection history."""
    expert = getattr(pipeline, "transformer_2", None) if pipeline is not None else None
    if not isinstance(expert, nn.Module):
        return []
    check_not_compiled_whole(expert)
    if type(adapter_for(expert)) is not type(adapter):
        raise TypeError(
            f"CAT pruning: the pipeline's two transformers differ ({type(pipeline.transformer).__name__}, "
            f"{type(expert).__name__}); one engine prunes experts of one class"
        )
    if attached_engine(expert) is not None:
        raise RuntimeError(
            f"CAT pruning is already applied to this pipeline's transformer_2 ({type(expert).__name__}); "
            "call remove_cat_pruning first to change its settings"
        )
    check_before_apply(expert, adapter, config)
    return [expert]


def remove_cat_pruning(target: Any) -> None:
    """Turn CAT pruning off: the model (and a pipeline's second expert) computes exactly as before
    ``apply_cat_pruning``.

    On a model without pruning it changes nothing and warns, as diffusers' ``disable_cache`` does: unlike
    applying twice (which raises, because the second settings would silently replace the first), nothing
    is lost, so cleanup code may call it unconditionally."""
    transformer = _split_target(target)[1]
    # ``torch.compile(transformer)`` (applied after pruning) wraps the module that carries the hooks.
    if not detach(transformer._orig_mod if is_compiled_module(transformer) else transformer):
        warnings.warn(
            f"CAT pruning is not applied to this {type(transformer).__name__}: nothing to remove "
            "(apply_cat_pruning turns it on)",
            stacklevel=2,
        )
