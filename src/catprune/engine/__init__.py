"""The step engine: the model-agnostic mechanism of CAT pruning (see ``engine.py``).

``context``: what one call is (:class:`StepContext`, published in a :class:`StepSlot`); ``tracker``: which
generation, step and pass a call belongs to; ``caches``: K/V caches, output caches and the processors'
base; ``records``: statistics and observers' step records; ``engine``: the engine and its hooks;
``parallel``: pruning under diffusers' context parallelism.
"""

from ..selection import Grid
from .caches import CachingProcessor, KVCache, OutputCache, PassKey, TokenHistory
from .context import AttentionCapture, RowLayout, StepContext, StepMode, StepSlot, TokenLayout
from .engine import PruningEngine, PruningFacts, attach, attach_expert, attached_engine, detach
from .parallel import ParallelPlan
from .records import GenerationStats, MacCounter, Observer, StepRecord
from .tracker import CallKind, NamedContext, StepTracker

__all__ = [
    "AttentionCapture",
    "CachingProcessor",
    "CallKind",
    "GenerationStats",
    "Grid",
    "KVCache",
    "MacCounter",
    "NamedContext",
    "Observer",
    "OutputCache",
    "ParallelPlan",
    "PassKey",
    "PruningEngine",
    "PruningFacts",
    "RowLayout",
    "StepContext",
    "StepMode",
    "StepRecord",
    "StepSlot",
    "StepTracker",
    "TokenHistory",
    "TokenLayout",
    "attach",
    "attach_expert",
    "attached_engine",
    "detach",
]
