"""The tokens each pruned step recomputes: chosen by the configured strategy, held at one address."""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import CATPruningConfig
from ..strategies import TokenSelector
from .plan import GenerationPlan


class Selections:
    """Runs the token selector over a generation and holds each pruned step's choice in one index buffer
    (the address a captured CUDA graph reads from)."""

    def __init__(self, config: CATPruningConfig) -> None:
        self.selector = TokenSelector(config)
        """Looks the strategy up: an unknown name is refused here."""
        self.indices: Tensor | None = None
        """(B, K) int64 the latest pruned step's tokens, sorted: the generation's index buffer."""
        self.skipped: Tensor | None = None
        """(B, 0) the tokens of a step ``skip_every`` skips: none."""
        self.forced: Tensor | None = None
        """(B, K) tokens every pruned step recomputes instead of the selector's choice (measurement)."""

    def choose(self, noise: Tensor, plan: GenerationPlan, num_kept: int, attention: Tensor | None) -> Tensor:
        """The prompt rows' latest noise (P, N, C) -> the step's (B, K) tokens, in the buffer."""
        if self.forced is not None:
            return self.hold(self.forced)
        indices = self.selector.select(noise, plan.layout.grid, num_kept, attention)  # (P, K)
        return self.hold(plan.row_layout.all_rows(indices))  # (B, K)

    def skip(self, rows: int, device: torch.device) -> Tensor:
        """A skipped step's (B, 0) tokens: none recomputed, the selection history and the index buffer
        left as they are (the pruned steps' buffer keeps its address)."""
        if self.skipped is None or self.skipped.shape[0] != rows or self.skipped.device != device:
            self.skipped = torch.empty(rows, 0, dtype=torch.long, device=device)  # (B, 0)
        return self.skipped

    def hold(self, indices: Tensor) -> Tensor:
        buffer = self.indices
        if buffer is None or buffer.shape != indices.shape or buffer.device != indices.device:
            buffer = self.indices = torch.empty_like(indices)  # (B, K)
        return buffer.copy_(indices)

    def take_rows(self, rows: slice) -> None:
        """Keep only batch rows ``rows`` (CFG truncation)."""
        if self.indices is not None:
            self.indices = self.indices[rows].clone()
        self.skipped = None

    def reset(self) -> None:
        self.selector.reset()
        self.indices = self.skipped = None
