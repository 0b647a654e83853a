"""Token-choice strategies at equal budget, by name, and the per-generation selector that runs them.

A strategy is one small function: it gets a :class:`SelectionInput` (the latest noise, the relative
noise, the staleness counts, the step...) and returns exactly K distinct token indices per prompt,
sorted, as a (P, K) int64 tensor; it must treat rows independently. ``"cat"`` is the paper's method;
the others are its ablations and baselines (same keep ratio, start step and cache-and-reuse mechanism).
A strategy registered with ``needs_attention=True`` also gets one block's attention map of the latest
step (``SelectionInput.attention``); the mechanism computes it only for such strategies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .selection import (
    Grid,
    cluster_adjacency,
    cluster_max_pool,
    cluster_ranks,
    effective_num_clusters,
    first_selection,
    graph_pool,
    kmeans,
    later_selection,
    positional_encoding,
    relative_noise,
    take_first,
    top_cluster_quotas,
    update_selection_counts,
)

if TYPE_CHECKING:
    from .config import CATPruningConfig


@dataclass
class SelectionInput:
    """What a strategy sees before a pruned step (one row per prompt)."""

    noise: torch.Tensor
    """(P, N, C) the latest output's noise channels."""
    delta: torch.Tensor
    """(P, N, C) float32 relative noise n_t - n_t0."""
    scores: torch.Tensor
    """(P, N) float32 L2 norm of ``delta`` over channels."""
    counts: torch.Tensor
    """(P, N) EWMA selection counts (zeros before the first pruned step)."""
    pruned_step: int
    """0 at the first pruned step (t0), 1 at the next..."""
    grid: Grid
    num_kept: int
    config: CATPruningConfig
    memory: dict[str, Any] = field(default_factory=dict)
    """Per-generation scratch space of the strategy (CAT keeps its clusters there)."""
    attention: torch.Tensor | None = None
    """(P, M, M) float32 head-averaged attention probabilities of one block at the latest step, over the
    N image tokens (first, raster order) and the text tokens of a joint attention; given only to
    strategies registered with ``needs_attention=True``."""


Strategy = Callable[[SelectionInput], torch.Tensor]
STRATEGIES: dict[str, Strategy] = {}
ATTENTION_STRATEGIES: set[str] = set()
"""Names of the strategies that read an attention map (computing one costs an extra N x N product)."""


def register_strategy(name: str, *, needs_attention: bool = False) -> Callable[[Strategy], Strategy]:
    """Decorator: make a strategy selectable by ``CATPruningConfig(strategy=name)``; ``needs_attention``
    asks the mechanism for an attention map before each selection."""

    def register(strategy: Strategy) -> Strategy:
        STRATEGIES[name] = strategy
        if needs_attention:
            ATTENTION_STRATEGIES.add(name)
        return strategy

    return register


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown token-choice strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name]


@register_strategy("cat")
def cluster_aware(inputs: SelectionInput) -> torch.Tensor:
    """The paper's CAT selection: clusters once (KMeans on noise + positional encoding, graph-pooled
    scores, best clusters first), then noise from the best clusters with staleness balance plus the
    globally stalest tokens."""
    memory, config = inputs.memory, inputs.config
    if "labels" not in memory:
        num_clusters = effective_num_clusters(inputs.grid.num_tokens, config.num_clusters)
        encoding = positional_encoding(inputs.grid, inputs.noise.shape[-1], inputs.noise.device)
        features = config.cluster_feature_scale * inputs.noise.float() + encoding
        labels = kmeans(features, num_clusters, config.kmeans_iterations, config.seed)
        pooled, occupied = cluster_max_pool(inputs.delta, labels, num_clusters)
        adjacency = cluster_adjacency(labels, inputs.grid, num_clusters)
        ranks = cluster_ranks(graph_pool(pooled, adjacency), occupied)
        num_noise = round(config.noise_fraction * inputs.num_kept)
        memory.update(
            labels=labels,
            num_clusters=num_clusters,
            quotas=top_cluster_quotas(num_noise, num_clusters, inputs.noise.device),
        )
        return first_selection(inputs.scores, labels, ranks, num_clusters, inputs.num_kept)
    labels, num_clusters = memory["labels"], memory["num_clusters"]
    features, occupied = cluster_max_pool(inputs.delta, labels, num_clusters)
    ranks = cluster_ranks(features, occupied)
    return later_selection(
        inputs.scores, inputs.counts, labels, ranks, num_clusters, inputs.num_kept, memory["quotas"]
    )


@register_strategy("noise")
def largest_relative_noise(inputs: SelectionInput) -> torch.Tensor:
    """Ablation (paper Fig. 4): the K tokens with the largest relative noise, nothing else."""
    return take_first([-inputs.scores], inputs.num_kept)


@register_strategy("noise+balance")
def noise_and_staleness(inputs: SelectionInput) -> torch.Tensor:
    """Ablation (paper Fig. 6, column 1): the noise share by relative noise, the rest the stalest tokens;
    no clusters."""
    num_noise = round(inputs.config.noise_fraction * inputs.num_kept)
    by_noise = take_first([-inputs.scores], num_noise)
    chosen = torch.zeros_like(inputs.scores, dtype=torch.long).scatter_(1, by_noise, 1)
    return take_first([1 - chosen, inputs.counts, -inputs.scores], inputs.num_kept)


@register_strategy("rows")
def consecutive_rows(inputs: SelectionInput) -> torch.Tensor:
    """Ablation (paper Fig. 6, column 3): consecutive tokens in raster order (whole rows), in turn."""
    num_tokens = inputs.grid.num_tokens
    start = inputs.pruned_step * inputs.num_kept
    window = (start + torch.arange(inputs.num_kept, device=inputs.scores.device)) % num_tokens
    return window.sort().values.expand(inputs.scores.shape[0], -1)


@register_strategy("random")
def uniformly_random(inputs: SelectionInput) -> torch.Tensor:
    """Baseline: K tokens drawn uniformly at each step (seeded by the config seed and the step)."""
    generator = torch.Generator().manual_seed(inputs.config.seed * 100_003 + inputs.pruned_step)
    draws = torch.rand(inputs.grid.num_tokens, generator=generator).to(inputs.scores.device)
    return take_first([draws.expand_as(inputs.scores)], inputs.num_kept)


ATEDM_ITERATIONS = 10
"""Power iterations of the weighted PageRank; the ranking of the top tokens is stable after a few."""


def weighted_pagerank(attention: torch.Tensor, iterations: int = ATEDM_ITERATIONS) -> torch.Tensor:
    """AT-EDM's token importance (Wang et al., CVPR 2024): (P, M, M) row-stochastic attention -> (P, M).

    The attention map is read as a weighted directed graph, query i giving weight A[i, j] to key j; a
    token is important when important tokens attend to it: s <- A^T s from the uniform vector. The
    rows of A sum to one, so s stays a distribution. Generalized to a joint attention (SD3) by taking
    the text tokens as nodes of the same graph.
    """
    scores = torch.full(attention.shape[:2], 1.0 / attention.shape[1], device=attention.device)
    for _ in range(iterations):
        scores = torch.einsum("pij,pi->pj", attention, scores)
    return scores


@register_strategy("at-edm", needs_attention=True)
def attention_pagerank(inputs: SelectionInput) -> torch.Tensor:
    """Baseline (paper Sec. 4.1): AT-EDM's selection with CAT's cache-and-reuse: the K image tokens with
    the largest weighted-PageRank importance over the latest attention map, ties to the stalest. Without a
    map (the selection core used alone) every token is equally important and staleness decides."""
    num_tokens = inputs.grid.num_tokens
    if inputs.attention is None:
        importance = torch.zeros_like(inputs.scores)
    else:
        importance = weighted_pagerank(inputs.attention.float())[:, :num_tokens]
    return take_first([-importance, inputs.counts], inputs.num_kept)


class TokenSelector:
    """Runs a strategy over one generation and keeps what it needs between steps.

    ``set_reference`` takes the output of step t0 - 2; each ``select`` takes the latest output (noise
    channels, one row per prompt) and returns the indices to recompute at the next step, then updates
    the EWMA staleness counts.
    """

    def __init__(self, config: CATPruningConfig) -> None:
        self.config = config
        self.strategy = get_strategy(config.strategy)
        self.reset()

    def reset(self) -> None:
        self.reference: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        self.pruned_step = 0
        self.memory: dict[str, Any] = {}

    def set_reference(self, noise: torch.Tensor) -> None:
        self.reference = noise.detach().clone()

    @property
    def cluster_labels(self) -> torch.Tensor | None:
        """(P, N) cluster of each token, once a clustering strategy has clustered (it keeps them in its
        memory under ``"labels"``); None otherwise."""
        return self.memory.get("labels")

    @property
    def needs_attention(self) -> bool:
        return self.config.strategy in ATTENTION_STRATEGIES

    def select(
        self,
        noise: torch.Tensor,
        grid: Grid,
        num_kept: int,
        attention: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(P, N, C) latest noise (and, for a strategy that needs it, (P, M, M) attention) -> (P, K) int64
        token indices, sorted."""
        if self.reference is None:
            raise RuntimeError("TokenSelector.select called before set_reference")
        delta, scores = relative_noise(noise, self.reference)
        if self.counts is None:
            self.counts = torch.zeros_like(scores)
        inputs = SelectionInput(
            noise,
            delta,
            scores,
            self.counts,
            self.pruned_step,
            grid,
            num_kept,
            self.config,
            self.memory,
            attention,
        )
        indices = self.strategy(inputs)
        self.counts = update_selection_counts(self.counts, indices, self.config.ewma_decay)
        self.pruned_step += 1
        return indices
