"""What pruning did, for the tools: one :class:`StepRecord` per denoising step for observers, and the
generation's :class:`GenerationStats`, counted by :class:`MacCounter` from each call's context."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from .context import StepContext, StepMode


@dataclass
class GenerationStats:
    """What pruning did during one generation (one denoising loop)."""

    steps: int = 0
    pruned_steps: int = 0
    skipped_steps: int = 0
    """Pruned steps that recomputed no image token (``skip_every``)."""
    image_tokens: int = 0
    kept_tokens: int = 0
    text_tokens: int = 0
    macs: int = 0
    """Transformer MACs of this generation's calls, from the layer shapes (the adapter's cost model); 0
    for an adapter without one."""
    full_macs: int = 0
    """The same calls without pruning."""

    @property
    def macs_fraction(self) -> float:
        return self.macs / self.full_macs if self.full_macs else 1.0


@dataclass(frozen=True)
class StepRecord:
    """One denoising step as pruning ran it, handed to observers right after its first pass.

    Tensors stay on the model's device and are not copied (an observer that keeps them beyond the call
    copies them; reading them on the host is the observer's choice and cost). "Prompt rows": one row per
    prompt, the conditional half under CFG.
    """

    step: int
    mode: StepMode
    height: int
    width: int
    """The image token grid (N = frames * height * width tokens, raster order)."""
    indices: torch.Tensor | None
    """(P, K) int64 tokens recomputed at a pruned step, prompt rows; None at full and fill steps."""
    noise: torch.Tensor
    """(P, N, C) the noise channels of the step's output tokens, prompt rows: what the next selection sees."""
    reference: torch.Tensor | None
    """(P, N, C) the reference noise n_t0 (the output of step t0 - 2), once it exists."""
    cluster_labels: torch.Tensor | None
    """(P, N) int64 cluster of each token, once a clustering strategy (``cat``) has clustered."""
    frames: int = 1


Observer = Callable[[StepRecord], None]


class CostModel(Protocol):
    def step_macs(
        self, model: torch.nn.Module, image_queries: int, image_tokens: int, text_tokens: int, pruned: bool
    ) -> int: ...


class MacCounter:
    """Counts each call's MACs into :class:`GenerationStats` from its context, with the adapter's cost
    model (per sample, memoised: walking the modules every call would cost host time). Every pass counts;
    a step counts once."""

    def __init__(self, cost: CostModel | None, model: torch.nn.Module) -> None:
        self.cost, self.model = cost, model
        self.memo: dict[tuple[int, int, int, bool], int] = {}
        self.stats = GenerationStats()

    def count_call(self, context: StepContext, extra_macs: int = 0) -> None:
        stats, tokens, text = self.stats, context.num_tokens + context.fixed_tokens, context.text_tokens
        stats.image_tokens, stats.text_tokens = context.num_tokens, text
        if self.cost is None:
            return
        full = context.rows * self._macs(tokens, tokens, text, pruned=False)
        stats.full_macs += full
        if context.mode is StepMode.PRUNED:
            queries = context.num_kept + context.fixed_tokens
            stats.macs += context.rows * self._macs(queries, tokens, text, pruned=True)
        else:
            stats.macs += full
        stats.macs += extra_macs

    def count_step(self, context: StepContext) -> None:
        self.stats.steps += 1
        if context.mode is StepMode.PRUNED:
            self.stats.pruned_steps += 1
            if context.num_kept:
                self.stats.kept_tokens = context.num_kept
            else:
                self.stats.skipped_steps += 1

    def _macs(self, queries: int, tokens: int, text: int, pruned: bool) -> int:
        key = (queries, tokens, text, pruned)
        if key not in self.memo:
            self.memo[key] = self.cost.step_macs(self.model, queries, tokens, text, pruned)
        return self.memo[key]
