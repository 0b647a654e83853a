"""Token selection of CAT Pruning: pure, batched tensor functions.

Every function works on a batch of P independent samples (one per prompt), on any device, with static
shapes and no host-device synchronisation, so that a pruned step can be captured by torch.compile or
CUDA graphs. Rows never interact: a prompt gets the same selection alone or in a batch.

Shapes: P samples, N tokens on a ``frames x height x width`` grid (:class:`Grid`; frames = 1 for an
image), C noise channels, k clusters, K kept tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Grid:
    """A token grid: N = frames * height * width tokens in raster order (frames = 1 for images)."""

    height: int
    width: int
    frames: int = 1

    @property
    def num_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def axes(self) -> tuple[int, ...]:
        """The extents of the axes positions vary along: (height, width), with frames first for video."""
        return (self.frames, self.height, self.width) if self.frames > 1 else (self.height, self.width)


MIN_TOKENS_PER_CLUSTER = 8
"""Clamp rule for small grids: at most ``N // 8`` clusters (and at least one), so that every cluster
has room for several tokens; SD3 at 1024x1024 (N = 4096) keeps the authors' 20."""

TOP_CLUSTER_SHARES = (3, 2, 1)
"""Relative shares of the noise budget given to the best, second and third cluster (authors' code)."""

FIRST_SELECTION_QUOTA_DIVISOR = 10
"""At the clustering step each cluster gives at most K // 10 tokens, best clusters first (authors' code)."""


def relative_noise(noise: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The relative noise n_t - n_t0 (P, N, C) and its per-token L2 norm over channels (P, N), float32."""
    delta = noise.float() - reference.float()
    return delta, delta.norm(dim=-1)


def positional_encoding(grid: Grid, channels: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The paper's Eq. 3: token (i, j) gets i / h in the first half of the channels and j / w in the rest;
    on a video grid, token (f, i, j) gets f / F, i / h and j / w in three near-equal parts.

    Returns (N, channels) float32, tokens in raster order.
    """
    axes = grid.axes
    widths = [channels // len(axes)] * len(axes)
    widths[-1] = channels - sum(widths[:-1])
    parts = []
    for axis, (extent, width) in enumerate(zip(axes, widths, strict=True)):
        position = torch.arange(extent, device=device, dtype=torch.float32) / extent  # (extent,)
        shape = [1] * len(axes)
        shape[axis] = extent
        parts.append(position.view(*shape, 1).expand(*axes, width))  # (*axes, width)
    return torch.cat(parts, dim=-1).reshape(grid.num_tokens, channels)


def effective_num_clusters(num_tokens: int, requested: int) -> int:
    """The number of clusters actually used: ``min(requested, max(1, N // MIN_TOKENS_PER_CLUSTER))``."""
    return max(1, min(requested, num_tokens // MIN_TOKENS_PER_CLUSTER))


def _squared_distances(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(P, N, D) x (P, k, D) -> (P, N, k), elementwise: every row is computed alone (batch invariant)."""
    return (points[:, :, None, :] - centroids[:, None, :, :]).square().sum(-1)


def kmeans(features: torch.Tensor, num_clusters: int, iterations: int, seed: int) -> torch.Tensor:
    """Batched KMeans with k-means++ initialisation; returns labels (P, N) int64.

    The k-means++ draws come from one seeded CPU generator and are shared by all rows (inverse-CDF
    sampling), so a sample's clustering does not depend on the batch it is in nor on the device.
    A fixed number of Lloyd iterations keeps it free of host syncs; an empty cluster keeps its centroid.
    """
    points = features.float()
    num_samples, num_tokens, dim = points.shape
    draws = torch.rand(num_clusters, generator=torch.Generator().manual_seed(seed)).to(points.device)

    first = (draws[0] * num_tokens).long().clamp(max=num_tokens - 1).expand(num_samples, 1)
    centroids = [points.gather(1, first[..., None].expand(num_samples, 1, dim))]
    closest = _squared_distances(points, centroids[0]).squeeze(-1)
    for draw in draws[1:]:
        cumulative = closest.cumsum(dim=1)
        target = draw * cumulative[:, -1:]
        chosen = torch.searchsorted(cumulative, target).clamp(max=num_tokens - 1)
        centroid = points.gather(1, chosen[..., None].expand(num_samples, 1, dim))
        centroids.append(centroid)
        closest = torch.minimum(closest, _squared_distances(points, centroid).squeeze(-1))
    centers = torch.cat(centroids, dim=1)

    ones = torch.ones(num_samples, num_tokens, device=points.device)
    for _ in range(iterations):
        labels = _squared_distances(points, centers).argmin(dim=-1)
        sums = torch.zeros_like(centers).scatter_add_(1, labels[..., None].expand(-1, -1, dim), points)
        counts = torch.zeros(num_samples, num_clusters, device=points.device).scatter_add_(1, labels, ones)
        centers = torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], centers)
    return _squared_distances(points, centers).argmin(dim=-1)


def cluster_adjacency(labels: torch.Tensor, grid: Grid, num_clusters: int) -> torch.Tensor:
    """Clusters are adjacent where any of their tokens are neighbours on the grid (4 on an image, 6 on a
    video grid): (P, k, k) bool."""
    cells = labels.view(-1, *grid.axes)  # (P, [F,] H, W)
    firsts, seconds = [], []
    for axis in range(cells.dim() - 1, 0, -1):  # width, height, then frames
        length = cells.shape[axis]
        firsts.append(cells.narrow(axis, 0, length - 1).flatten(1))
        seconds.append(cells.narrow(axis, 1, length - 1).flatten(1))
    first, second = torch.cat(firsts, dim=1), torch.cat(seconds, dim=1)  # (P, pairs)
    flat = torch.zeros(cells.shape[0], num_clusters * num_clusters, dtype=torch.bool, device=labels.device)
    flat.scatter_(1, first * num_clusters + second, True)
    flat.scatter_(1, second * num_clusters + first, True)
    eye = torch.eye(num_clusters, dtype=torch.bool, device=labels.device)
    return flat.view(-1, num_clusters, num_clusters) & ~eye


def cluster_max_pool(
    values: torch.Tensor, labels: torch.Tensor, num_clusters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise max of token features per cluster: (P, N, C) -> features (P, k, C), occupied (P, k).

    Empty clusters get zero features and ``occupied = False``.
    """
    num_samples, _, channels = values.shape
    index = labels[..., None].expand(-1, -1, channels)
    pooled = torch.full(
        (num_samples, num_clusters, channels), float("-inf"), device=values.device, dtype=torch.float32
    ).scatter_reduce(1, index, values.float(), reduce="amax", include_self=True)
    occupied = torch.zeros(num_samples, num_clusters, dtype=torch.bool, device=values.device)
    occupied.scatter_(1, labels, True)
    return pooled.masked_fill(~occupied[..., None], 0.0), occupied


def graph_pool(features: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
    """One non-trainable graph pooling layer, as the authors' code computes it: sum + mean + max over each
    cluster's neighbours and itself, element-wise.

    Their layer is torch-geometric's ``SimpleConv(aggr=MultiAggregation(['mean', 'mean', 'max'],
    mode='sum'), combine_root='self_loop')``: self loops join the neighbourhood, and torch-geometric 2.3+
    files the two 'mean' entries under one name, so the aggregations are sum, mean and max (see
    docs/method.md). features (P, k, C), adjacency (P, k, k) bool without self loops -> (P, k, C).
    """
    eye = torch.eye(adjacency.shape[-1], dtype=torch.bool, device=adjacency.device)
    closed = adjacency | eye  # (P, k, k) neighbours and the cluster itself
    weights = closed.to(features.dtype)[..., None]  # (P, k, k, 1)
    total = (weights * features[:, None]).sum(dim=2)  # (P, k, C)
    mean = total / weights.sum(dim=2)  # (P, k, C): every cluster counts itself, so no division by zero
    largest = features[:, None].expand(-1, features.shape[1], -1, -1)  # (P, k, k, C) features of column j
    largest = largest.masked_fill(~closed[..., None], float("-inf")).amax(dim=2)  # (P, k, C)
    return total + mean + largest


def cluster_ranks(features: torch.Tensor, occupied: torch.Tensor) -> torch.Tensor:
    """Rank of each cluster by the L2 norm of its feature (0 = best; empty clusters last): (P, k) int64."""
    scores = features.norm(dim=-1).masked_fill(~occupied, float("-inf"))
    order = scores.argsort(dim=1, descending=True, stable=True)
    return _inverse_permutation(order)


def _inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def lexsort(keys: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-row permutation sorting by several keys, the first the most significant, each ascending."""
    order = keys[-1].argsort(dim=1, stable=True)
    for key in reversed(keys[:-1]):
        order = order.gather(1, key.gather(1, order).argsort(dim=1, stable=True))
    return order


def rank_within_clusters(
    labels: torch.Tensor, num_clusters: int, keys: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Rank of each token inside its own cluster when ordered by ``keys`` (ascending): (P, N) int64."""
    order = lexsort([labels, *keys])
    sizes = torch.zeros(labels.shape[0], num_clusters, dtype=torch.long, device=labels.device)
    sizes.scatter_add_(1, labels, torch.ones_like(labels))
    starts = sizes.cumsum(dim=1) - sizes
    sorted_rank = torch.arange(labels.shape[1], device=labels.device) - starts.gather(
        1, labels.gather(1, order)
    )
    return torch.empty_like(order).scatter_(1, order, sorted_rank)


def take_first(order_keys: Sequence[torch.Tensor], num_kept: int) -> torch.Tensor:
    """The ``num_kept`` tokens first in lexicographic order, returned sorted by position: (P, K)."""
    return lexsort(order_keys)[:, :num_kept].sort(dim=1).values


def first_selection(
    scores: torch.Tensor, labels: torch.Tensor, cluster_rank: torch.Tensor, num_clusters: int, num_kept: int
) -> torch.Tensor:
    """Clustering-step selection: clusters best first, from each its top ``K // 10`` tokens by relative
    noise, until K are taken (should the clusters run short, their next-best tokens follow)."""
    quota = max(1, num_kept // FIRST_SELECTION_QUOTA_DIVISOR)
    noise_rank = rank_within_clusters(labels, num_clusters, [-scores])
    beyond_quota = (noise_rank >= quota).long()
    return take_first([beyond_quota, cluster_rank.gather(1, labels), noise_rank], num_kept)


def top_cluster_quotas(
    num_noise_tokens: int, num_clusters: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the noise budget over the best clusters as 3 : 2 : 1; in every cluster after the first, half
    of its share goes to its least recently selected tokens.

    Returns (noise quota, staleness quota), each (k,) int64 indexed by cluster rank (zero past the third).
    """
    shares = TOP_CLUSTER_SHARES[:num_clusters]
    total = sum(shares)
    quotas = [num_noise_tokens * share // total for share in shares]
    quotas[0] += num_noise_tokens - sum(quotas)
    stale = [0] + [quota // 2 for quota in quotas[1:]]
    noise = [quota - s for quota, s in zip(quotas, stale, strict=True)]
    pad = [0] * (num_clusters - len(shares))
    return torch.tensor(noise + pad, device=device), torch.tensor(stale + pad, device=device)


def later_selection(
    scores: torch.Tensor,
    counts: torch.Tensor,
    labels: torch.Tensor,
    cluster_rank: torch.Tensor,
    num_clusters: int,
    num_kept: int,
    quotas: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Selection at the pruned steps after the clustering step: exactly K distinct tokens per sample.

    Tokens from the best clusters come first (``quotas`` from :func:`top_cluster_quotas`: by relative
    noise, with in-cluster staleness balance); the remaining ones are the globally stalest tokens (lowest
    EWMA selection count, ties broken by larger relative noise).
    """
    noise_quota, stale_quota = quotas
    token_cluster_rank = cluster_rank.gather(1, labels)
    noise_rank = rank_within_clusters(labels, num_clusters, [-scores])
    stale_rank = rank_within_clusters(labels, num_clusters, [counts, -scores])
    in_top_clusters = (noise_rank < noise_quota[token_cluster_rank]) | (
        stale_rank < stale_quota[token_cluster_rank]
    )
    return take_first([(~in_top_clusters).long(), counts, -scores], num_kept)


def update_selection_counts(counts: torch.Tensor, indices: torch.Tensor, decay: float) -> torch.Tensor:
    """EWMA of how often each token was selected (paper Eq. 2): f_t = decay * f_{t-1} + I_t."""
    selected = torch.zeros_like(counts).scatter_(1, indices, 1.0)
    return decay * counts + selected
