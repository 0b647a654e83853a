"""Which generation, denoising step and pass each transformer call belongs to.

A *step* is one denoising step; a step may take several calls, *passes* (true CFG as two calls, named
``"cond"`` / ``"uncond"`` with diffusers' ``cache_context`` or not named at all, as Flux3's guider calls).
The tracker reads, in this order, what tells without guessing and without host reads:

1. an explicit :meth:`StepTracker.begin` (the caller starts a generation);
2. the step index that diffusers' ``cache_context(name, step_index=...)`` gives, where a pipeline gives it;
3. the scheduler of the pipeline pruning was applied to, looked up on the pipeline at every call (so a
   scheduler swapped on the pipeline is followed): ``set_timesteps`` at a pipeline call's start replaces
   its timesteps and clears its step index, and each ``scheduler.step`` advances the index;
4. otherwise the timestep itself (one host read per call): passes of a step share it, steps move it in one
   direction (decreasing or increasing: Z-Image counts up), and a move against that direction starts a
   new generation. A call that finds the pipeline's scheduler where the previous one left it is read the
   same way: another pass at the same timestep, or a loop that the scheduler does not drive.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .caches import PassKey


class CallKind(enum.Enum):
    """How a denoising call relates to the previous one."""

    GENERATION = "generation"
    """The first step of a new generation."""
    STEP = "step"
    """The next step of the current generation."""
    PASS = "pass"
    """Another pass of the current step."""


@dataclass(frozen=True)
class NamedContext:
    """What a caller says about a call through diffusers' ``model.cache_context(name, **kwargs)``."""

    name: str | None = None
    step_index: int | None = None
    num_inference_steps: int | None = None


@dataclass(frozen=True)
class Call:
    kind: CallKind
    pass_key: PassKey


class StepTracker:
    """Classifies each call (:meth:`classify`) as a new generation, the next step or another pass."""

    def __init__(self) -> None:
        self.scheduler: Callable[[], Any] | None = None
        """Returns the scheduler of the pipeline pruning was applied to (None: a bare transformer)."""
        self.explicit = False
        """Set once a caller starts generations with :meth:`begin`: timesteps are not read from then on."""
        self.named = NamedContext()
        """The cache context the current call runs under."""
        self.restart()

    def restart(self) -> None:
        """The next call starts a generation."""
        self.pending = True
        self.position: tuple[int, int, int | None] | None = None
        """The scheduler's (identity, identity of its timesteps, step index) at the current step."""
        self.context_step: int | None = None
        self.passes: dict[str | None, int] = {}
        """Calls of each context name in the current step."""
        self.step_timestep: Any = None
        """The timestep of the current step's first call, as passed."""
        self.step_value: float | None = None
        """Its value, once read."""
        self.direction = 0
        """+1 or -1 once two steps tell which way the timesteps move; 0 before."""
        self.scheduler_idle = False
        """The watched scheduler does not drive the current generation (another pipeline or a loop does)."""
        self.scheduler_moved = False
        """The watched scheduler stepped during the current generation: it drives it."""

    def begin(self) -> None:
        self.restart()
        self.explicit = True

    def classify(self, timestep: Any) -> Call:
        name = self.named.name
        kind = self._kind(timestep, name)
        if kind is not CallKind.PASS:
            self.passes = {}
            self.step_timestep, self.step_value = timestep, None
        count = self.passes.get(name, 0)
        self.passes[name] = count + 1
        return Call(kind, (name, count))

    def _kind(self, timestep: Any, name: str | None) -> CallKind:
        fresh_name = name is not None and bool(self.passes) and name not in self.passes
        if self.pending:
            self.pending = False
            self.position = self._scheduler_position()
            self.context_step = self.named.step_index
            return CallKind.GENERATION
        if self.named.step_index is not None:
            return self._by_context_step(self.named.step_index, name)
        position = self._scheduler_position()
        if position is not None and position != self.position:
            restarted = self.position is None or position[:2] != self.position[:2] or position[2] is None
            self.position, self.scheduler_idle, self.direction = position, False, 0
            self.scheduler_moved = not restarted
            return CallKind.GENERATION if restarted else CallKind.STEP
        if fresh_name:
            return CallKind.PASS
        if (self.explicit and position is None) or timestep is None:
            return CallKind.STEP
        return self._by_timestep(_value(timestep), position is not None)

    def _by_context_step(self, index: int, name: str | None) -> CallKind:
        previous, self.context_step = self.context_step, index
        if previous is None or index < previous:
            return CallKind.GENERATION
        if index > previous:
            return CallKind.STEP
        return CallKind.GENERATION if name in self.passes and name is not None else CallKind.PASS

    def _by_timestep(self, value: float, scheduler_watched: bool) -> CallKind:
        """One host read: the call's timestep against its step's."""
        if self.step_value is None:
            self.step_value = None if self.step_timestep is None else _value(self.step_timestep)
        previous = self.step_value
        if previous is None or value == previous:
            return CallKind.PASS
        moving = 1 if value > previous else -1
        if scheduler_watched and not self.scheduler_idle:
            # The pipeline's scheduler did not move, yet the timestep did: a loop that it does not drive
            # (another pipeline's scheduler, a bare loop). A new generation if the scheduler drove the
            # previous steps; this generation's second step if it never moved since the generation began.
            self.scheduler_idle = True
            if self.scheduler_moved:
                self.direction = 0
                return CallKind.GENERATION
        if self.direction in (0, moving):
            self.direction = moving
            return CallKind.STEP
        self.direction = 0
        return CallKind.GENERATION

    def _scheduler_position(self) -> tuple[int, int, int | None] | None:
        scheduler = self.scheduler() if self.scheduler is not None else None
        if scheduler is None or not hasattr(scheduler, "step_index"):
            return None
        return id(scheduler), id(getattr(scheduler, "timesteps", None)), scheduler.step_index

    def expected_steps(self) -> int | None:
        """Denoising steps of the generation under way, where the caller tells: the cache context's
        ``num_inference_steps``, or the pipeline's scheduler (its timesteps after the begin index:
        img2img's strength cut)."""
        if self.named.num_inference_steps is not None:
            return self.named.num_inference_steps
        scheduler = self.scheduler() if self.scheduler is not None else None
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is None or self.scheduler_idle:
            return None
        begin = getattr(scheduler, "begin_index", None) or 0
        return (len(timesteps) - begin) // getattr(scheduler, "order", 1)


def _value(timestep: Any) -> float:
    """A call's timestep as a float (a host read for a tensor)."""
    if isinstance(timestep, torch.Tensor):
        return float(timestep.flatten()[0])
    return float(timestep)
