"""Per-model adapters: which modules a transformer class has and which attention is which."""

from __future__ import annotations

from torch import nn

from .base import ModelAdapter
from .pixart import PixArtAdapter
from .sd3 import SD3Adapter

ADAPTERS: tuple[ModelAdapter, ...] = (SD3Adapter(), PixArtAdapter())


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter of ``model``'s class, or a TypeError naming the supported classes."""
    for adapter in ADAPTERS:
        if isinstance(model, adapter.model_class):
            return adapter
    supported = ", ".join(adapter.model_class.__name__ for adapter in ADAPTERS)
    raise TypeError(
        f"CAT pruning does not support {type(model).__name__}; supported transformers: {supported}"
    )


__all__ = ["ADAPTERS", "ModelAdapter", "PixArtAdapter", "SD3Adapter", "adapter_for"]
