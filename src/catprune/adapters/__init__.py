"""Per-model adapters and their one registry: a new model is one adapter file, plus its import and its
class in the tuple registered below."""

from __future__ import annotations

from torch import nn

from .base import Catalogue, CostModel, ModelAdapter, PruningAdapter, PublicModel, TensorFactory
from .chroma import ChromaAdapter
from .flux import FluxAdapter
from .flux2 import Flux2Adapter
from .flux3 import Flux3Adapter
from .hunyuanvideo15 import HunyuanVideo15Adapter
from .pixart import PixArtAdapter
from .qwenimage import QwenImageAdapter
from .sd3 import SD3Adapter
from .unsupported import MATRIX, unsupported_reason
from .wan import WanAdapter
from .zimage import ZImageAdapter

ADAPTERS: dict[str, PruningAdapter] = {}
"""Registered adapters by family name."""


def register_adapter(adapter_class: type[PruningAdapter]) -> PruningAdapter:
    """Check that ``adapter_class`` says everything its parts require (the pruning part always, the cost
    model and catalogue where it declares them), then register an instance.

    Raises TypeError naming what is missing, so that an incomplete adapter fails here rather than at the
    first pruned step."""
    parts = [part for part in (PruningAdapter, CostModel, Catalogue) if issubclass(adapter_class, part)]
    if PruningAdapter not in parts:
        raise TypeError(f"adapter {adapter_class.__name__} is not a PruningAdapter")
    required = [name for part in parts for name in part.REQUIRED]
    missing = [name for name in required if not hasattr(adapter_class, name)]
    abstract = sorted(getattr(adapter_class, "__abstractmethods__", ()))
    if missing or abstract:
        what = [*(f"attribute {name}" for name in missing), *(f"method {name}()" for name in abstract)]
        raise TypeError(f"adapter {adapter_class.__name__} does not define {', '.join(what)}")
    if adapter_class.family in ADAPTERS:
        raise ValueError(f"an adapter for family {adapter_class.family!r} is already registered")
    adapter = adapter_class()
    ADAPTERS[adapter.family] = adapter
    return adapter


for _adapter_class in (
    SD3Adapter,
    PixArtAdapter,
    FluxAdapter,
    ChromaAdapter,
    QwenImageAdapter,
    Flux2Adapter,
    ZImageAdapter,
    Flux3Adapter,
    WanAdapter,
    HunyuanVideo15Adapter,
):
    register_adapter(_adapter_class)


def adapter_for(model: nn.Module) -> PruningAdapter:
    """The adapter of ``model``'s class, or a TypeError naming the supported classes."""
    # The most specific registered class wins: an adapter for a subclass overrides its base's.
    for cls in type(model).__mro__:
        for adapter in ADAPTERS.values():
            if adapter.model_class is cls:
                return adapter
    supported = ", ".join(adapter.model_class.__name__ for adapter in ADAPTERS.values())
    name = type(model).__name__
    raise TypeError(
        f"CAT pruning does not support {name}: {unsupported_reason(name)}. Supported transformers: "
        f"{supported}; {MATRIX} lists every diffusers transformer and why it is or is not supported"
    )


def adapter_for_class_name(class_name: str) -> PruningAdapter:
    """The adapter of a transformer class named in a saved config (``_class_name``)."""
    for adapter in ADAPTERS.values():
        if adapter.model_class.__name__ == class_name:
            return adapter
    supported = ", ".join(adapter.model_class.__name__ for adapter in ADAPTERS.values())
    raise ValueError(f"unsupported transformer class {class_name!r}; supported: {supported}")


__all__ = [
    "ADAPTERS",
    "Catalogue",
    "ChromaAdapter",
    "CostModel",
    "Flux2Adapter",
    "Flux3Adapter",
    "FluxAdapter",
    "HunyuanVideo15Adapter",
    "ModelAdapter",
    "PixArtAdapter",
    "PruningAdapter",
    "PublicModel",
    "QwenImageAdapter",
    "SD3Adapter",
    "TensorFactory",
    "WanAdapter",
    "ZImageAdapter",
    "adapter_for",
    "adapter_for_class_name",
    "register_adapter",
]
