"""A generation's plan: what its first call fixes, and which of its steps run full, fill or pruned."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import CATPruningConfig
from .context import RowLayout, StepMode, TokenLayout


@dataclass
class GenerationPlan:
    """The generation under way: its rows, token layout and CFG row pairs (fixed by its first call; CFG
    truncation drops the unconditional rows), its refresh steps, and the current step's index."""

    config: CATPruningConfig
    rows: int
    layout: TokenLayout
    row_layout: RowLayout
    refresh_steps: frozenset[int]
    """Its ``refresh_steps``, counted from its start."""
    step: int = 0

    @property
    def mode(self) -> StepMode:
        """The current step's mode: full before t0 - 1, fill at t0 - 1 and at refresh steps, pruned after."""
        step, start = self.step, self.config.start_step
        if not self.config.prune or step < start - 1:
            return StepMode.FULL
        return StepMode.FILL if step == start - 1 or step in self.refresh_steps else StepMode.PRUNED

    @property
    def keeps_output(self) -> bool:
        """Whether the step's output is kept for the next pruned step (from the fill step on)."""
        return self.config.prune and self.step >= self.config.start_step - 1

    def drops_unconditional_rows(self, layout: TokenLayout, rows: int) -> bool:
        """Whether a call with ``layout`` and ``rows`` is this generation's after CFG truncation: the
        pipeline stops guiding and passes the conditional rows only."""
        return layout == self.layout and self.row_layout.paired and 2 * rows == self.rows

    def drop_unconditional_rows(self) -> slice:
        """Go on with the conditional rows only; returns which rows of the batch they were."""
        half = self.rows // 2
        kept = slice(0, half) if self.row_layout.cond_first else slice(half, self.rows)
        self.rows, self.row_layout = half, self.row_layout.unpaired()
        return kept


def refresh_steps(config: CATPruningConfig, steps: int | None) -> tuple[frozenset[int], str | None]:
    """``config.refresh_steps`` counted from a generation's start, and a warning where the ones counted
    from the end cannot be resolved (the number of steps is unknown) and are ignored."""
    if steps is None and any(step < 0 for step in config.refresh_steps):
        warning = (
            "CAT pruning: refresh_steps counted from the end need the number of steps; apply pruning to a "
            "pipeline or call state.begin_generation(steps=...). They are ignored (this is said once)"
        )
        return frozenset(step for step in config.refresh_steps if step >= 0), warning
    return frozenset(step if step >= 0 else (steps or 0) + step for step in config.refresh_steps), None


def too_short_warning(config: CATPruningConfig, steps: int | None) -> str | None:
    """The warning for a generation that never reaches ``start_step`` (None when it does or is unknown)."""
    if steps is None or not config.prune or steps > config.start_step:
        return None
    return (
        f"CAT pruning: a generation of {steps} step{'s' * (steps != 1)} never reaches start_step "
        f"{config.start_step}, so it runs unpruned (this is said once); lower start_step in CATPruningConfig "
        "to prune short generations (a few-step model's: 'catprune macs --model NAME --steps N' lists the "
        "saving at each start_step; docs/measurement.md, 'Few-step models', says what to check)"
    )
