"""catprune: CAT Pruning (cluster-aware token pruning) for diffusion transformers in diffusers.

from catprune import apply_cat_pruning
apply_cat_pruning(pipe)  # SD3 / SD3.5 / PixArt pipelines; remove_cat_pruning(pipe) undoes it

The exported names are loaded on first use (PEP 562), so ``import catprune`` and the command line's
``--help`` do not pay for importing torch and diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import CATPruningConfig
    from .engine import GenerationStats, PruningEngine
    from .integration import apply_cat_pruning, remove_cat_pruning

__all__ = ["CATPruningConfig", "GenerationStats", "PruningEngine", "apply_cat_pruning", "remove_cat_pruning"]
__version__ = "0.1.0"

_EXPORTS = {
    "CATPruningConfig": "catprune.config",
    "GenerationStats": "catprune.engine",
    "PruningEngine": "catprune.engine",
    "apply_cat_pruning": "catprune.integration",
    "remove_cat_pruning": "catprune.integration",
}
"""Each exported name -> the module that defines it."""


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
