"""What one transformer call is, as the hooks and attention processors see it: an immutable
:class:`StepContext`, published in a :class:`StepSlot` before the call.

Processors and the hooks traced with the model's forward read nothing else: under ``torch.compile`` they
read the context's mode and two flags, its index buffer and timestep tensors, and the per-generation sizes,
so dynamo compiles one graph per kind of step and never one per step index.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..selection import Grid


class StepMode(enum.Enum):
    FULL = "full"
    """The unpatched computation (steps before t0 - 1, and auxiliary calls such as skip-layer guidance)."""
    FILL = "fill"
    """A full step that also fills the K/V caches: step t0 - 1 (and refresh steps)."""
    PRUNED = "pruned"
    """Only the selected image tokens go through the blocks."""


@dataclass(frozen=True)
class TokenLayout:
    """How the token sequence at the adapter's gather point is laid out: the image tokens of ``grid`` (the
    ones pruning selects from), then ``fixed_tokens`` that are never pruned (a reference image's tokens,
    appended by editing pipelines such as Flux.1 Kontext: recomputed at every step, like text tokens)."""

    grid: Grid
    fixed_tokens: int = 0


@dataclass(frozen=True)
class RowLayout:
    """How the batch rows of a call relate: each row its own prompt, or classifier-free-guidance pairs
    (two halves, conditional and unconditional, in the order the pipeline builds them) whose conditional
    row drives one selection shared by both."""

    paired: bool = False
    cond_first: bool = False
    """``[cond..., uncond...]`` (Z-Image) rather than diffusers' usual ``[uncond..., cond...]``."""

    def prompt_rows(self, tensor: Tensor) -> Tensor:
        """(B, ...) -> (P, ...): the rows that drive selection, one per prompt (the conditional half)."""
        if not self.paired:
            return tensor
        if tensor.shape[0] % 2:
            raise ValueError(f"CFG row pairs need an even batch, got {tensor.shape[0]} rows")
        half = tensor.shape[0] // 2
        return tensor[:half] if self.cond_first else tensor[half:]

    def all_rows(self, prompt_tensor: Tensor) -> Tensor:
        """(P, ...) -> (B, ...): a per-prompt tensor for every row of the batch."""
        return torch.cat([prompt_tensor, prompt_tensor]) if self.paired else prompt_tensor

    def unpaired(self) -> RowLayout:
        """The layout once the unconditional rows are dropped (CFG truncation)."""
        return RowLayout()


@dataclass(frozen=True)
class TokenShard:
    """This process's place among the P processes that share a sequence under diffusers' context parallelism
    (see ``catprune.engine.parallel``): each holds a contiguous 1/P of the tokens at full steps, and
    recomputes a contiguous 1/P of the sorted selected tokens at pruned steps."""

    rank: int
    world: int
    """P, the processes that share the sequence."""
    splits_text: bool = False
    """Whether each process holds 1/P of the text tokens too (Flux's joint attention), not all of them."""

    def kept(self, num_kept: int, num_tokens: int) -> int:
        """K rounded up to a multiple of P (at most N, itself a multiple of P): the same share on every
        process keeps the shapes static."""
        return min(num_tokens, -(-num_kept // self.world) * self.world)


@dataclass(frozen=True)
class StepContext:
    """One transformer call of a generation, decided before it runs."""

    step: int
    """0-based index of the denoising step in its generation."""
    pass_key: tuple[str | None, int]
    """Which pass of the step: (cache context name or None, how many calls of that name came before)."""
    first_pass: bool
    """Whether this call is its step's first pass (the one that selects and is observed)."""
    mode: StepMode
    rows: int
    """Batch rows of the call (prompts x 2 under CFG as one batch)."""
    row_layout: RowLayout
    layout: TokenLayout
    num_kept: int
    """K, the image tokens recomputed at a pruned step."""
    text_tokens: int
    indices: Tensor | None = field(default=None, compare=False)
    """(B, K) int64 image tokens recomputed at a pruned step, sorted: one buffer for every pruned step of a
    generation (the address a captured CUDA graph reads)."""
    timestep: Tensor | None = field(default=None, compare=False)
    """(B,) float32 timestep of the call, where an extrapolation option needs it."""
    refreshing: bool = False
    """A fill step after t0 (``refresh_steps``): the caches already hold this generation's values."""
    keeps_output: bool = False
    """Whether the step's output tokens are kept for the next pruned step (from the fill step on)."""
    cache_bytes: int = 0
    """The estimated bytes of one pass's K/V caches (every caching layer, at the model's dtype): named by
    the error raised when the fill step cannot allocate them."""
    shard: TokenShard | None = None
    """This process's share of the tokens under context parallelism (None: one process holds them all)."""

    def __post_init__(self) -> None:
        if self.shard is not None and self.layout.fixed_tokens:
            raise ValueError(
                "CAT pruning: tokens that are never pruned (a reference image's, Flux Kontext) are not "
                "supported under context parallelism"
            )

    @property
    def grid(self) -> Grid:
        return self.layout.grid

    @property
    def num_tokens(self) -> int:
        """N, the image tokens of the grid."""
        return self.layout.grid.num_tokens

    @property
    def fixed_tokens(self) -> int:
        return self.layout.fixed_tokens

    @property
    def num_queries(self) -> int:
        """Image tokens that go through the blocks: K at a pruned step, N otherwise."""
        return self.num_kept if self.mode is StepMode.PRUNED else self.num_tokens

    @property
    def local_indices(self) -> Tensor:
        """(B, K) the selected tokens at a pruned step; under context parallelism (B, K / P), this
        process's contiguous share of them (a view)."""
        assert self.indices is not None
        if self.shard is None:
            return self.indices
        share = self.num_kept // self.shard.world
        return self.indices[:, self.shard.rank * share : (self.shard.rank + 1) * share]

    @property
    def local_text_tokens(self) -> int:
        """The text tokens in this process's sequence: all of them, or its 1/P where context parallelism
        splits the text."""
        split = self.shard is not None and self.shard.splits_text
        return self.text_tokens // self.shard.world if split else self.text_tokens

    def gather(self, tokens: Tensor, lead: int = 0) -> Tensor:
        """Per-token tensor (B, lead + N + R, ...) -> (B, lead + K + R, ...) at a pruned step: the ``lead``
        rows (text, where a sequence starts with it) and the R fixed tokens stay, the image tokens are the
        selected ones of each row (under context parallelism this process's share of them, K / P)."""
        if self.mode is not StepMode.PRUNED:
            return tokens
        indices = self.local_indices  # (B, K) or (B, K / P)
        image = tokens[:, lead : lead + self.num_tokens]  # (B, N, ...)
        index = indices.view(*indices.shape, *(1,) * (tokens.dim() - 2))  # (B, K, 1...)
        selected = image.gather(1, index.expand(-1, -1, *tokens.shape[2:]))  # (B, K, ...)
        if lead == 0 and self.fixed_tokens == 0:
            return selected
        rest = tokens[:, lead + self.num_tokens :]  # (B, R, ...)
        return torch.cat([tokens[:, :lead], selected, rest], dim=1)  # (B, lead + K + R, ...)

    def gather_table(self, table: Tensor, lead: int = 0) -> Tensor:
        """A table shared by all rows (lead + N + R, d), such as a rotary embedding's cos or sin, -> each
        row's (B, lead + K + R, d) at a pruned step."""
        if self.mode is not StepMode.PRUNED:
            return table
        assert self.indices is not None
        rows = self.indices.shape[0]
        return self.gather(table.expand(rows, *table.shape), lead)


@dataclass
class AttentionCapture:
    """Where the capturing processor of an attention strategy (AT-EDM) leaves the latest map."""

    map: Tensor | None = None
    """(P, M, M) head-averaged attention probabilities of the prompt rows at the latest step."""
    macs: int = 0
    """MACs of the latest capture (the extra Q K^T product), added to the generation's count."""


class StepSlot:
    """The current call's :class:`StepContext`, the one thing processors and traced hooks read (None
    before the first call, at auxiliary calls and once pruning is removed: everything runs unpatched)."""

    def __init__(self) -> None:
        self.context: StepContext | None = None
        self.capture = AttentionCapture()

    @property
    def mode(self) -> StepMode:
        return StepMode.FULL if self.context is None else self.context.mode
