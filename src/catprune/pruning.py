"""The model-agnostic pruning mechanism: generation and step tracking, token gather/scatter, K/V caches.

How a pruned step runs, for any diffusion transformer whose blocks act on tokens one by one except in
attention: a hook after the image-token embedder keeps only the selected image tokens, so the blocks' own
forward code runs unchanged on K instead of N tokens; the adapter's attention processors recompute K and
V for the selected tokens only and attend over a per-block :class:`KVCache` that holds them for all image
tokens; a hook after the output projection puts the new outputs of the selected tokens into the previous
step's output. Everything model-specific (which modules, which attention, the token grid, the cost) comes
from the model's adapter (``catprune.adapters``), which this module knows only through
:class:`ModelFacts`.

A step may take several transformer calls, "passes" (Flux's true CFG: a conditional and an unconditional
call under diffusers' ``cache_context("cond")`` / ``("uncond")``): each pass keeps its own K/V caches and
previous output, and all passes of a step recompute the tokens the first pass selected.

After every denoising step the state hands a :class:`StepRecord` to the registered observers
(:meth:`PruningState.add_observer`): tools read what pruning did from there, never from the state.
"""

from __future__ import annotations

import contextlib
import enum
import inspect
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from .config import CATPruningConfig
from .strategies import TokenSelector


class StepMode(enum.Enum):
    FULL = "full"
    """The unpatched computation (steps before t0 - 1, and auxiliary calls such as skip-layer guidance)."""
    FILL = "fill"
    """A full step that also fills the K/V caches: step t0 - 1."""
    PRUNED = "pruned"
    """Only the selected image tokens go through the blocks."""


class CallKind(enum.Enum):
    """How a denoising call relates to the previous one."""

    GENERATION = "generation"
    """The first step of a new generation."""
    STEP = "step"
    """The next step of the current generation."""
    PASS = "pass"
    """Another pass of the current step, under a cache context not yet seen in it (true CFG's "uncond")."""


@dataclass
class GenerationStats:
    """What pruning did during one generation (one denoising loop)."""

    steps: int = 0
    pruned_steps: int = 0
    image_tokens: int = 0
    kept_tokens: int = 0
    text_tokens: int = 0
    macs: int = 0
    """Transformer MACs of this generation's steps, from the layer shapes (see ``ModelAdapter.step_macs``)."""
    full_macs: int = 0
    """The same steps without pruning."""

    @property
    def macs_fraction(self) -> float:
        return self.macs / self.full_macs if self.full_macs else 1.0


@dataclass(frozen=True)
class StepPlan:
    """What one denoising step (a counted transformer call) does, decided before it runs."""

    step: int
    """0-based index of the step in its generation."""
    mode: StepMode
    rows: int
    """Batch rows of the call (prompts x 2 under CFG)."""
    height: int
    width: int
    num_kept: int
    """K, the image tokens recomputed at a pruned step."""
    text_tokens: int
    refresh: bool = False
    """A fill step after t0 (``refresh_steps``): the caches already hold this generation's values."""
    keeps_output: bool = False
    """Whether the step's output tokens are kept for the next pruned step (from the fill step on)."""

    @property
    def num_tokens(self) -> int:
        return self.height * self.width


@dataclass(frozen=True)
class StepRecord:
    """One denoising step as pruning ran it, handed to observers right after the call.

    Tensors stay on the model's device and are not copied (an observer that keeps them beyond the call
    copies them; reading them on the host is the observer's choice and cost). "Prompt rows": one row per
    prompt, the conditional half under CFG.
    """

    step: int
    mode: StepMode
    height: int
    width: int
    """The image token grid (N = height * width tokens, raster order)."""
    indices: torch.Tensor | None
    """(P, K) int64 tokens recomputed at a pruned step, prompt rows; None at full and fill steps."""
    noise: torch.Tensor
    """(P, N, C) the noise channels of the step's output tokens, prompt rows: what the next selection sees."""
    reference: torch.Tensor | None
    """(P, N, C) the reference noise n_t0 (the output of step t0 - 2), once it exists."""
    cluster_labels: torch.Tensor | None
    """(P, N) int64 cluster of each token, once a clustering strategy (``cat``) has clustered."""


Observer = Callable[[StepRecord], None]


class ModelFacts(Protocol):
    """What the mechanism needs from a model's adapter (``catprune.adapters.ModelAdapter``)."""

    embedder: str
    output_projection: str
    token_arguments: tuple[str, ...]
    cfg_batch: int

    def token_grid(self, model: torch.nn.Module, arguments: dict[str, Any]) -> tuple[int, int]: ...

    def text_tokens(self, arguments: dict[str, Any]) -> int: ...

    def noise_tokens(self, model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor: ...

    def is_auxiliary_call(self, arguments: dict[str, Any]) -> bool: ...

    def step_macs(
        self, model: torch.nn.Module, image_queries: int, image_tokens: int, text_tokens: int, pruned: bool
    ) -> int: ...

    def processors(self, model: torch.nn.Module, state: PruningState) -> Iterable[CachingProcessor]: ...

    def hooks(self, model: torch.nn.Module, state: PruningState) -> list[Any]: ...


class TokenHistory:
    """The values of a per-token tensor (B, N, ...) at the last two times each token was computed, for a
    first-order extrapolation in time of the tokens not recomputed (``kv_extrapolation``,
    ``output_extrapolation``). The current values live with the caller; this keeps the previous ones and
    both times, all on the device (no host reads)."""

    def __init__(self) -> None:
        self.previous: torch.Tensor | None = None
        """(B, N, ...) each token's values at its computation before the last."""
        self.last_time: torch.Tensor | None = None
        """(B, N) float32: when each token was last computed."""
        self.previous_time: torch.Tensor | None = None
        """(B, N) float32: when it was computed before that (equal to ``last_time``: no slope yet)."""

    def record_all(self, current: torch.Tensor | None, time: torch.Tensor, computed: torch.Tensor) -> None:
        """Every token is computed at ``time`` (B,): a fill or refresh step. ``current`` (the values from
        before, or None at a generation's fill step) becomes the previous values; ``computed`` the shape."""
        rows, tokens = computed.shape[:2]
        now = time[:, None].expand(rows, tokens)  # (B, N)
        if current is None or self.previous is None or self.previous.shape != current.shape:
            self.previous = computed.detach().clone()
            self.last_time, self.previous_time = now.clone(), now.clone()
            return
        self.previous.copy_(current)
        self.previous_time.copy_(self.last_time)
        self.last_time.copy_(now)

    def record(self, current: torch.Tensor, indices: torch.Tensor, time: torch.Tensor) -> None:
        """Tokens ``indices`` (B, K) are recomputed at ``time`` (B,); call before ``current`` (B, N, ...)
        is overwritten at them."""
        index = indices.view(*indices.shape, *(1,) * (current.dim() - 2)).expand(
            *indices.shape, *current.shape[2:]
        )  # (B, K, ...)
        self.previous.scatter_(1, index, current.gather(1, index))
        self.previous_time.scatter_(1, indices, self.last_time.gather(1, indices))
        self.last_time.scatter_(1, indices, time[:, None].expand_as(indices).to(self.last_time.dtype))

    def extrapolate(self, current: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        """``current`` (B, N, ...), each token as last computed, moved to ``time`` (B,) along the line
        through its last two computations; tokens computed at ``time`` and tokens with one computation
        only are returned as they are."""
        span = self.last_time - self.previous_time  # (B, N)
        safe_span = torch.where(span != 0, span, torch.ones_like(span))
        coefficient = torch.where(span != 0, (time[:, None] - self.last_time) / safe_span, 0.0)  # (B, N)
        coefficient = coefficient.view(*coefficient.shape, *(1,) * (current.dim() - 2)).to(current.dtype)
        return current + coefficient * (current - self.previous)  # (B, N, ...)

    def release(self) -> None:
        self.previous = self.last_time = self.previous_time = None


@dataclass
class PassBuffers:
    """What one pass of a step (see the module docstring) keeps from step to step, besides K/V caches."""

    output: torch.Tensor | None = None
    """(B, N, p*p*C) its output tokens at the latest step, from the fill step on: what pruned steps reuse
    (one tensor, updated in place)."""
    history: TokenHistory | None = None
    """The output tokens' history (``output_extrapolation``)."""


class KVCache:
    """Keys and values of one attention layer for every token, reused by the tokens not recomputed.

    Layout: ``(B, L, heads, head_dim)``: the N image tokens (raster order) and ``extra`` rows (the text
    tokens of a joint attention, rewritten at every step), after the image tokens or, with
    ``extra_first``, before them, in the order the model attends over them (SD3: image first; Flux: text
    first), so that the fill step computes exactly what the model computes. With ``extrapolate`` the image
    tokens' K/V also keep a :class:`TokenHistory`, and :meth:`attention_inputs` moves the ones not
    recomputed to the current time.
    """

    def __init__(self, extra_first: bool = False, extrapolate: bool = False) -> None:
        self.extra_first = extra_first
        self.key: torch.Tensor | None = None
        self.value: torch.Tensor | None = None
        self.num_extra = 0
        self.histories = (TokenHistory(), TokenHistory()) if extrapolate else None
        """Histories of the image tokens' keys and values, with ``extrapolate``."""

    def image_rows(self, tensor: torch.Tensor, num_image: int) -> torch.Tensor:
        """The image tokens' rows (B, N, h, d) of a tensor in this layout (a view)."""
        start = self.num_extra if self.extra_first else 0
        return tensor[:, start : start + num_image]

    def extra_rows(self, tensor: torch.Tensor, num_image: int) -> torch.Tensor:
        """The extra rows (B, T, h, d) of a tensor in this layout (a view)."""
        return tensor[:, : self.num_extra] if self.extra_first else tensor[:, num_image:]

    def fill(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        extra: int = 0,
        time: torch.Tensor | None = None,
        refresh: bool = False,
    ) -> None:
        """All N image tokens' K/V (B, N, h, d) at ``time`` (B,), at the fill step or a ``refresh`` step
        (which keeps the extrapolation history going); ``extra`` rows go with them."""
        shape = (key.shape[0], key.shape[1] + extra, *key.shape[2:])
        if self.key is None or (self.key.shape, self.key.dtype, self.key.device) != (
            shape,
            key.dtype,
            key.device,
        ):
            self.key = key.new_empty(shape)  # (B, N + extra, h, d)
            self.value = key.new_empty(shape)  # (B, N + extra, h, d)
            refresh = False
        self.num_extra = extra
        num_image = key.shape[1]
        if self.histories is not None:
            assert time is not None
            pairs = zip(self.histories, (self.key, self.value), (key, value), strict=True)
            for history, cached, new in pairs:
                previous = self.image_rows(cached, num_image) if refresh else None
                history.record_all(previous, time, new)
        self.image_rows(self.key, num_image).copy_(key)
        self.image_rows(self.value, num_image).copy_(value)

    def update(
        self,
        indices: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        num_image: int,
        time: torch.Tensor | None = None,
    ) -> None:
        """The recomputed image tokens' K/V (B, K, h, d) at ``time`` (B,), written at their positions
        ``indices`` (B, K)."""
        index = indices[:, :, None, None].expand_as(key)  # (B, K, h, d)
        if self.histories is not None:
            assert time is not None
            for history, cached in zip(self.histories, (self.key, self.value), strict=True):
                history.record(self.image_rows(cached, num_image), indices, time)
        self.image_rows(self.key, num_image).scatter_(1, index, key)
        self.image_rows(self.value, num_image).scatter_(1, index, value)

    def attention_inputs(self, num_image: int, time: Tensor | None) -> tuple[Tensor, Tensor]:
        """The K and V to attend over: the cache, with the image tokens extrapolated to ``time`` when the
        cache keeps histories (new tensors then; the cache itself keeps the computed values)."""
        if self.histories is None:
            return self.key, self.value
        assert time is not None
        moved = []
        for history, cached in zip(self.histories, (self.key, self.value), strict=True):
            tensor = cached.clone()  # (B, N + extra, h, d)
            image = self.image_rows(tensor, num_image)
            image.copy_(history.extrapolate(image, time))
            moved.append(tensor)
        return moved[0], moved[1]

    def write_extra(self, key: torch.Tensor, value: torch.Tensor, num_image: int) -> None:
        """The extra rows (B, T, h, d)."""
        self.extra_rows(self.key, num_image).copy_(key)
        self.extra_rows(self.value, num_image).copy_(value)

    def keep(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Hold K/V that do not change within a generation as they are (a cross-attention's text)."""
        self.key, self.value = key, value

    @property
    def empty(self) -> bool:
        return self.key is None

    def release(self) -> None:
        self.key = self.value = None
        for history in self.histories or ():
            history.release()

    def nbytes(self) -> int:
        previous = [history.previous for history in self.histories or ()]
        tensors = [t for t in (self.key, self.value, *previous) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


PROCESSOR_INPUTS = ("encoder_hidden_states", "attention_mask", "image_rotary_emb")
"""The inputs of diffusers' attention processors after ``hidden_states``, in their positional order."""


class CachingProcessor:
    """Base of the adapters' attention processors: full steps run the layer's original processor untouched,
    the fill step and pruned steps run :meth:`attend` (the adapter's), with :attr:`cache` to keep K/V in
    (one per pass of a step, see :attr:`PruningState.pass_key`, switched by :meth:`enter_pass` before the
    call, so that a compiled layer reads the same attribute in every pass).

    ``extra_first``: the layer attends over [extra (text) tokens, image tokens] (Flux) rather than
    [image, extra] (SD3): its caches and attention keep the model's order (see :class:`KVCache`)."""

    def __init__(self, attention: torch.nn.Module, state: PruningState, extra_first: bool = False) -> None:
        self.attention = attention
        self.original = attention.processor
        self.state = state
        self.extra_first = extra_first
        self.caches: dict[str | None, KVCache] = {}
        """The K/V cache of each pass."""
        self.cache: KVCache | None = None
        """The current pass's K/V cache."""

    def enter_pass(self, key: str | None) -> None:
        """Make pass ``key``'s cache the current one (created empty the first time)."""
        if key not in self.caches:
            extrapolate = self.state.config.kv_extrapolation == "linear"
            self.caches[key] = KVCache(self.extra_first, extrapolate)
        self.cache = self.caches[key]

    def store(self, key: torch.Tensor, value: torch.Tensor, extra: int = 0) -> None:
        """Image tokens' K/V (B, n, h, d) of the call: all N at a fill or refresh step (``extra`` rows go
        with them), the selected ones at a pruned step."""
        state = self.state
        assert self.cache is not None
        if state.mode is StepMode.FILL:
            assert state.plan is not None
            self.cache.fill(key, value, extra, state.time, state.plan.refresh)
        else:
            self.cache.update(state.indices, key, value, state.num_tokens, state.time)

    def cached(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The K and V to attend over (see :meth:`KVCache.attention_inputs`)."""
        assert self.cache is not None
        return self.cache.attention_inputs(self.state.num_tokens, self.state.time)

    def reset(self) -> None:
        """Forget one generation: its caches are freed and the next fill step allocates them again, so that
        every generation runs the same code (compiled blocks then find the same path in each one)."""
        self.release()

    def release(self) -> None:
        self.caches.clear()
        self.cache = None

    def cache_bytes(self) -> int:
        return sum(cache.nbytes() for cache in self.caches.values())

    def __call__(self, attn: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.state.mode is StepMode.FULL:
            return self.original(attn, hidden_states, *args, **kwargs)
        # diffusers' attention layers pass these positionally (FluxAttention) or by name (Attention).
        inputs = dict(zip(PROCESSOR_INPUTS, args, strict=False)) | kwargs
        context, mask, rotary = (inputs.get(name) for name in PROCESSOR_INPUTS)
        return self.attend(attn, hidden_states, context, mask, rotary)

    def attend(
        self, attn: Any, tokens: Tensor, context: Tensor | None, mask: Tensor | None, rotary: Any
    ) -> Any:
        """The layer's output at the fill step and at pruned steps: ``tokens`` (B, n, D) are what goes
        through the block (the image tokens, or Flux's single stream), ``context`` the other input (text)
        and ``mask`` its mask, ``rotary`` the rotary embedding (cos, sin) where the model has one."""
        raise NotImplementedError


class _GenerationClock:
    """Tells how each denoising call relates to the previous one (:class:`CallKind`).

    Applied to a pipeline, the pipeline's scheduler tells (:meth:`watch`): every pipeline call resets it
    (``set_timesteps``), so a call while its step index is None is a generation's first step, and a call
    that finds the index where the previous call left it is another pass of the same step (under a new
    cache context) or a call from something that does not use the scheduler (an error). The scheduler is a
    shared component: every pipeline built from the same components (``from_pipe``) is followed alike,
    whichever runs. Otherwise a generation starts on :meth:`begin` (explicit), when the batch or token grid
    changes, or, for a bare transformer that nobody starts explicitly, when the timestep does not decrease
    (one host read per call); a call under a cache context not yet seen in the step is another pass."""

    def __init__(self) -> None:
        self.explicit = False
        """Set once a caller starts generations with :meth:`begin`; from then on timesteps are not read."""
        self.cfg: bool | None = None
        self.scheduler: Any = None
        self.last_position: tuple[int | None, int] | None = None
        """The watched scheduler's (step index, identity of its timesteps) at the latest call."""
        self.forget()

    def watch(self, scheduler: Any) -> None:
        """Follow ``scheduler``'s step index (a diffusers scheduler: ``step_index``)."""
        self.scheduler = scheduler

    def forget(self) -> None:
        self.shape: tuple[int, int, int] | None = None
        self.last_timestep: float | None = None
        self.contexts: set[str | None] = set()
        """The cache contexts of the current step's passes."""

    def begin(self, cfg: bool | None) -> None:
        self.forget()
        self.explicit = True
        self.cfg = cfg

    def advance(self, shape: tuple[int, int, int], timestep: Any, context: str | None) -> CallKind:
        new_shape = self.shape is not None and shape != self.shape
        self.shape = shape
        another_pass = context is not None and bool(self.contexts) and context not in self.contexts
        if self.scheduler is not None:
            # A new loop replaces the scheduler's timesteps; each step advances its index.
            position = (self.scheduler.step_index, id(self.scheduler.timesteps))
            if position == self.last_position and not new_shape:
                if not another_pass:
                    raise RuntimeError(
                        "CAT pruning: the transformer was called twice while the scheduler of the pipeline "
                        "it was applied to neither stepped nor restarted: another pipeline with its own "
                        "scheduler (or a loop of your own) is driving it. Call remove_cat_pruning on the "
                        "first pipeline and apply_cat_pruning on the one you run."
                    )
                self.contexts.add(context)
                return CallKind.PASS
            self.last_position = position
            self.contexts = {context}
            return CallKind.GENERATION if new_shape or position[0] is None else CallKind.STEP
        if another_pass and not new_shape:
            self.contexts.add(context)
            return CallKind.PASS
        self.contexts = {context}
        if new_shape:
            return CallKind.GENERATION
        if self.explicit or timestep is None:
            return CallKind.STEP
        # One scalar host read per call; pipelines avoid it (their scheduler tells, see above).
        value = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        new = self.last_timestep is not None and value >= self.last_timestep
        self.last_timestep = value
        return CallKind.GENERATION if new else CallKind.STEP


class PruningState:
    """Pruning of one transformer: the current generation's step plan, selection, previous output and
    statistics, shared by the hooks and the attention processors.

    A generation starts when the pipeline's scheduler starts a new loop (applied to a pipeline), when the
    timestep does not decrease (applied to a bare transformer), when the batch or the token grid changes,
    or on an explicit :meth:`begin_generation` or :meth:`reset`. A step's further passes (see the module
    docstring) are told apart by the cache context the caller names (``model.cache_context(name)``).
    """

    def __init__(self, config: CATPruningConfig, adapter: ModelFacts, model: torch.nn.Module) -> None:
        self.config = config
        self.adapter = adapter
        self.model = model
        self.selector = TokenSelector(config)
        self.processors: list[CachingProcessor] = []
        self.forced_indices: torch.Tensor | None = None
        self.expected_steps: Callable[[], int | None] | None = None
        """Tells at a generation's first step how many steps it will have, where the caller knows (a
        pipeline does): a generation too short to reach ``start_step`` is then warned about, once."""
        self._warned_unpruned = False
        self._warned_refresh = False
        self.declared_steps: int | None = None
        """The number of steps a caller gave :meth:`begin_generation` (used where no pipeline tells)."""
        self.hook_handles: list[Any] = []
        """The module hooks :func:`attach` installed (removed by :func:`detach`)."""
        self.checks: list[Callable[[], None]] = []
        """Run at every generation's first step: each raises when something combined with pruning since
        it was applied cannot work with it (see ``catprune.integration``)."""
        self.clock = _GenerationClock()
        self._observers: list[Observer] = []
        self._signature = inspect.signature(model.forward)
        self._macs_memo: dict[tuple[int, int, int, bool], int] = {}
        self.context: str | None = None
        """The cache context the caller runs the current call under (diffusers' ``cache_context``)."""
        self.reset()

    def reset(self) -> None:
        """Forget everything about the current generation (and free its attention caches)."""
        self.step = 0
        """Steps counted in the current generation (the next step's index)."""
        self.plan: StepPlan | None = None
        """The latest call's plan; None for a call that is not a denoising step (and before the first)."""
        self.indices: torch.Tensor | None = None
        """(B, K) the tokens recomputed at the latest pruned step (chosen by its first pass)."""
        self.pass_key: str | None = None
        """The current pass's cache context: keys its K/V caches and previous output."""
        self.passes: dict[str | None, PassBuffers] = {}
        """Each pass's buffers."""
        self.current: PassBuffers | None = None
        """The current pass's buffers (switched before the call: compiled code reads one attribute)."""
        self.first_pass = True
        """Whether the current call is its step's first pass (the one that selects and is observed)."""
        self.attention_map: torch.Tensor | None = None
        """(P, M, M) attention probabilities of the latest step, kept only for attention strategies."""
        self.time: torch.Tensor | None = None
        """(B,) float32 timestep of the latest call, kept when an extrapolation option needs it."""
        self.refresh: frozenset[int] = frozenset()
        """The generation's ``refresh_steps``, counted from its start."""
        self._step_output: torch.Tensor | None = None
        self.attention_macs = 0
        """MACs of the latest call's attention-map capture (attention strategies), added at its end."""
        self.clock.forget()
        self.selector.reset()
        for processor in self.processors:
            processor.reset()
        self.stats = GenerationStats()

    # --- the public controls

    def begin_generation(self, cfg: bool | None = None, steps: int | None = None) -> None:
        """Start a new generation explicitly; ``cfg`` says whether the batch is [uncond..., cond...] pairs
        (None: as ``config.row_pairing`` says), ``steps`` how many steps it has (for ``refresh_steps``
        counted from the end). Applied to a pipeline, its scheduler starts generations and tells both."""
        self.reset()
        self.declared_steps = steps
        self.clock.begin(cfg)

    def release_caches(self) -> None:
        """End the current generation and free its attention caches (K/V of every image token per block:
        1.2 GiB for SD3-medium at 1024x1024 with CFG); the next generation allocates them again. For
        between generations, when other work needs the memory; ``stats`` keep the generation's counts."""
        stats = self.stats
        self.reset()
        self.stats = stats
        for processor in self.processors:
            processor.release()

    def force_indices(self, indices: torch.Tensor | None) -> None:
        """For measurement: pruned steps recompute ``indices`` (B, K) int64, K = ``config.num_kept(N)``,
        instead of the selector's choice (None: the selector again); kept across :meth:`reset`.

        Counting MACs on the ``meta`` device (no data to select from) and timing a pruned step without its
        selection need it."""
        self.forced_indices = indices

    def add_observer(self, observer: Observer) -> Callable[[], None]:
        """Call ``observer(record)`` after every denoising step; returns a function that removes it."""
        self._observers.append(observer)
        return lambda: self._observers.remove(observer)

    # --- what the processors and hooks read

    @property
    def mode(self) -> StepMode:
        """The latest call's mode (FULL for calls that are not denoising steps)."""
        return StepMode.FULL if self.plan is None else self.plan.mode

    @property
    def last_output(self) -> torch.Tensor | None:
        """The current pass's output tokens at the latest step (None before the fill step)."""
        return None if self.current is None else self.current.output

    @property
    def outputs(self) -> dict[str | None, torch.Tensor]:
        """Each pass's output tokens at the latest step (from the fill step on)."""
        return {key: buffers.output for key, buffers in self.passes.items() if buffers.output is not None}

    @property
    def num_tokens(self) -> int:
        assert self.plan is not None
        return self.plan.num_tokens

    @property
    def paired_rows(self) -> bool:
        """Whether the batch is ``[uncond..., cond...]`` with one selection per prompt shared by both rows."""
        if self.clock.cfg is not None:
            return self.clock.cfg
        return self.config.row_pairing == "cfg"

    def prompt_half(self, tensor: torch.Tensor) -> torch.Tensor:
        """The rows that drive selection: one per prompt, the conditional half under CFG."""
        if not self.paired_rows:
            return tensor
        if tensor.shape[0] % 2:
            raise ValueError(
                f"row pairing 'cfg' needs an even batch [uncond..., cond...], got {tensor.shape[0]} rows"
            )
        return tensor[tensor.shape[0] // 2 :]

    # --- one call

    def begin_step(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict]:
        """Plan the call; at a pruned step, its per-token arguments (ControlNet residuals) are gathered
        at the selected tokens like the image tokens themselves. Returns the call's arguments."""
        bound = self._signature.bind_partial(*args, **kwargs)
        arguments = bound.arguments
        if self.adapter.is_auxiliary_call(arguments):
            self.plan = None
            return args, kwargs
        height, width = self.adapter.token_grid(self.model, arguments)
        rows = arguments["hidden_states"].shape[0]
        kind = self.clock.advance((rows, height, width), arguments.get("timestep"), self.context)
        if kind is CallKind.GENERATION:
            shape = self.clock.shape
            self.reset()
            self.clock.shape = shape
            self.clock.contexts = {self.context}
            if self.clock.scheduler is not None:
                self.clock.cfg = self.adapter.cfg_batch == 2 and _is_cfg_batch(arguments["hidden_states"])
        self.first_pass = kind is not CallKind.PASS
        self._enter_pass(self.context)
        step = self.step if self.first_pass else self.step - 1
        if step == 0 and self.first_pass:
            for check in self.checks:
                check()
            self._plan_generation(self.expected_steps() if self.expected_steps else self.declared_steps)
        if self.config.kv_extrapolation == "linear" or self.config.output_extrapolation == "linear":
            self.time = _row_times(arguments.get("timestep"), rows, arguments["hidden_states"].device)
        mode = self._mode(step)
        start = self.config.start_step
        self.plan = StepPlan(
            step=step,
            mode=mode,
            rows=rows,
            height=height,
            width=width,
            num_kept=self.config.num_kept(height * width),
            text_tokens=self.adapter.text_tokens(arguments),
            refresh=mode is StepMode.FILL and step >= start,
            keeps_output=self.config.prune and step >= start - 1,
        )
        if mode is StepMode.PRUNED:
            if self.forced_indices is not None:
                self._hold_indices(self.forced_indices)
            elif self.first_pass:
                self._hold_indices(self._select())
            gathered = {
                name: [self.gather(tokens) for tokens in arguments[name]]
                for name in self.adapter.token_arguments
                if arguments.get(name) is not None
            }
            if gathered:
                arguments.update(gathered)
                return bound.args, bound.kwargs
        return args, kwargs

    def _enter_pass(self, key: str | None) -> None:
        """Point the state and every processor at pass ``key``'s buffers: Python work per processor, done
        only when the pass changes (once per generation, or per call under true CFG)."""
        if self.current is not None and key == self.pass_key:
            return
        self.pass_key = key
        self.current = self.passes.setdefault(key, PassBuffers())
        for processor in self.processors:
            processor.enter_pass(key)

    def _hold_indices(self, indices: torch.Tensor) -> None:
        """Copy a step's selection into the generation's index buffer: one address for every pruned step
        (what a captured CUDA graph reads from)."""
        if (
            self.indices is None
            or self.indices.shape != indices.shape
            or self.indices.device != indices.device
        ):
            self.indices = torch.empty_like(indices)  # (B, K)
        self.indices.copy_(indices)

    def _plan_generation(self, steps: int | None) -> None:
        """At a generation's first step: resolve ``refresh_steps`` against its number of steps (if known)
        and warn, once, about a generation too short to prune."""
        refresh = {step if step >= 0 else (steps or 0) + step for step in self.config.refresh_steps}
        if steps is None and any(step < 0 for step in self.config.refresh_steps):
            refresh = {step for step in self.config.refresh_steps if step >= 0}
            if not self._warned_refresh:
                self._warned_refresh = True
                warnings.warn(
                    "CAT pruning: refresh_steps counted from the end need the number of steps; apply "
                    "pruning to a pipeline or call state.begin_generation(steps=...). They are ignored "
                    "(this is said once)",
                    stacklevel=3,
                )
        self.refresh = frozenset(refresh)
        if steps is None or self._warned_unpruned or not self.config.prune or steps > self.config.start_step:
            return
        self._warned_unpruned = True
        warnings.warn(
            f"CAT pruning: a generation of {steps} steps never reaches start_step "
            f"{self.config.start_step}, so it runs unpruned (this is said once); lower start_step in "
            "CATPruningConfig to prune short generations",
            stacklevel=3,
        )

    def _mode(self, step: int) -> StepMode:
        start = self.config.start_step
        if not self.config.prune or step < start - 1:
            return StepMode.FULL
        return StepMode.FILL if step == start - 1 or step in self.refresh else StepMode.PRUNED

    def end_step(self) -> None:
        plan = self.plan
        if plan is None:
            return
        stats, tokens, text = self.stats, plan.num_tokens, plan.text_tokens
        stats.macs += self.attention_macs
        self.attention_macs = 0
        full = plan.rows * self._step_macs(tokens, tokens, text, pruned=False)
        stats.full_macs += full
        stats.image_tokens, stats.text_tokens = tokens, text
        if plan.mode is StepMode.PRUNED:
            stats.kept_tokens = plan.num_kept
            stats.macs += plan.rows * self._step_macs(plan.num_kept, tokens, text, pruned=True)
        else:
            stats.macs += full
        if not self.first_pass:
            self._step_output = None
            return
        if self.config.prune and plan.step == self.config.start_step - 2:
            assert self._step_output is not None
            self.selector.set_reference(self._prompt_rows(self._step_output))
        stats.steps += 1
        stats.pruned_steps += plan.mode is StepMode.PRUNED
        self.step += 1
        if self._observers:
            self._notify(plan)
        self._step_output = None

    def _notify(self, plan: StepPlan) -> None:
        assert self._step_output is not None
        pruned = plan.mode is StepMode.PRUNED
        record = StepRecord(
            step=plan.step,
            mode=plan.mode,
            height=plan.height,
            width=plan.width,
            indices=self.prompt_half(self.indices).clone() if pruned else None,  # the buffer changes
            noise=self._prompt_rows(self._step_output),
            reference=self.selector.reference,
            cluster_labels=self.selector.cluster_labels,
        )
        for observer in list(self._observers):
            observer(record)

    def _step_macs(self, queries: int, tokens: int, text: int, pruned: bool) -> int:
        """Per-sample MACs of a call, memoised: walking the modules every step would cost host time."""
        key = (queries, tokens, text, pruned)
        if key not in self._macs_memo:
            self._macs_memo[key] = self.adapter.step_macs(self.model, queries, tokens, text, pruned)
        return self._macs_memo[key]

    def _prompt_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """The output tokens that drive selection (see :meth:`prompt_half`), noise channels only."""
        return self.adapter.noise_tokens(self.model, self.prompt_half(tokens))

    def _select(self) -> torch.Tensor:
        assert self.last_output is not None and self.plan is not None
        indices = self.selector.select(
            self._prompt_rows(self.last_output),
            self.plan.height,
            self.plan.width,
            self.plan.num_kept,
            self.attention_map,
        )
        return torch.cat([indices, indices]) if self.paired_rows else indices

    def gather(self, tokens: torch.Tensor) -> torch.Tensor:
        """Keep the selected image tokens: (B, N, D) -> (B, K, D) at a pruned step."""
        if self.mode is not StepMode.PRUNED:
            return tokens
        return tokens.gather(1, self.indices[..., None].expand(-1, -1, tokens.shape[-1]))

    def scatter_output(self, tokens: torch.Tensor) -> torch.Tensor:
        """The transformer's output tokens (B, n, p*p*C): unselected tokens reuse the previous step's.

        Traced by ``torch.compile`` with the rest of the forward: it reads only the plan's mode and flags
        (the same few values in every generation) and updates the kept output in place (one address from
        the fill step on)."""
        plan = self.plan
        if plan is None:
            return tokens
        buffers = self.current
        assert buffers is not None
        previous = buffers.output
        history = None
        if self.config.output_extrapolation == "linear" and plan.mode is not StepMode.FULL:
            if buffers.history is None:
                buffers.history = TokenHistory()
            history = buffers.history
        if plan.mode is StepMode.PRUNED:
            assert previous is not None
            if history is not None:
                history.record(previous, self.indices, self.time)
            index = self.indices[..., None].expand(-1, -1, tokens.shape[-1])  # (B, K, p*p*C)
            tokens = previous.scatter(1, index, tokens.to(previous.dtype))  # (B, N, p*p*C)
        elif history is not None:  # the fill step or a refresh step: every token computed now
            history.record_all(previous if plan.refresh else None, self.time, tokens)
        if plan.keeps_output:
            if previous is None or previous.shape != tokens.shape or previous.dtype != tokens.dtype:
                buffers.output = tokens.clone()  # (B, N, p*p*C), the kept output's buffer
            else:
                previous.copy_(tokens)
        self._step_output = tokens  # read by end_step for a step's first pass only
        if history is not None and plan.mode is StepMode.PRUNED:
            return history.extrapolate(tokens, self.time)  # (B, N, p*p*C), what the scheduler steps with
        return tokens


def _row_times(timestep: Any, rows: int, device: torch.device) -> torch.Tensor:
    """A call's timestep as (rows,) float32 on the model's device (a device-side cast, no host read)."""
    if timestep is None:
        raise ValueError("CAT pruning: extrapolation needs the transformer call's timestep")
    time = torch.as_tensor(timestep, device=device, dtype=torch.float32).reshape(-1)
    return time.expand(rows) if time.numel() == 1 else time


def _is_cfg_batch(hidden_states: torch.Tensor) -> bool:
    """Whether a pipeline's batch is ``[uncond..., cond...]`` pairs, as diffusers pipelines build it under
    classifier-free guidance: both halves hold the same latents. One host read, at a generation's first
    step (a full step)."""
    rows = hidden_states.shape[0]
    return rows % 2 == 0 and torch.equal(hidden_states[: rows // 2], hidden_states[rows // 2 :])


def attached_state(model: torch.nn.Module) -> PruningState | None:
    """The pruning state of a transformer, or None when pruning is not applied to it."""
    return getattr(model, "_catprune_state", None)


def attach(model: torch.nn.Module, adapter: ModelFacts, config: CATPruningConfig) -> PruningState:
    """Install the hooks and processors on ``model``; everything is resolved before anything changes."""
    state = PruningState(config, adapter, model)
    state.processors = list(adapter.processors(model, state))
    embedder = model.get_submodule(adapter.embedder)
    projection = model.get_submodule(adapter.output_projection)
    # PyTorch's own module hooks, not a replaced ``forward``: accelerate's offload hooks and diffusers'
    # hook registry replace and restore ``forward`` on their own schedule, which would drop or revive ours.
    # The model's own hooks plan and account for each call in Python, outside ``torch.compile``: compiled
    # whole, the model's forward is one graph per step kind, entered after the plan is made.
    begin = torch.compiler.disable(lambda module, args, kwargs: state.begin_step(args, kwargs))
    end = torch.compiler.disable(lambda module, args, output: state.end_step())
    state.hook_handles = [
        model.register_forward_pre_hook(begin, with_kwargs=True),
        model.register_forward_hook(end),
        embedder.register_forward_hook(lambda module, args, output: state.gather(output)),
        projection.register_forward_hook(lambda module, args, output: state.scatter_output(output)),
        *adapter.hooks(model, state),
    ]
    for processor in state.processors:
        processor.attention.set_processor(processor)
    if hasattr(model, "cache_context"):
        model.cache_context = _named_contexts(model.cache_context, state)
    model._catprune_state = state
    return state


def _named_contexts(cache_context: Callable[..., Any], state: PruningState) -> Callable[..., Any]:
    """diffusers' ``model.cache_context(name)``, also telling ``state`` which pass the calls under it are."""

    @contextlib.contextmanager
    def named_context(name: str, **kwargs: Any) -> Iterator[None]:
        outer, state.context = state.context, name
        try:
            with cache_context(name, **kwargs):
                yield
        finally:
            state.context = outer

    return named_context


def detach(model: torch.nn.Module) -> None:
    """Exact inverse of :func:`attach`: the original processors come back and the module hooks go."""
    state = attached_state(model)
    if state is None:
        return
    for processor in state.processors:
        processor.attention.set_processor(processor.original)
    for handle in state.hook_handles:
        handle.remove()
    # A forward compiled whole with the hooks in it may outlive them (dynamo does not guard on module
    # hooks): with no plan, its traced hooks are the identity and its processors' original ones run.
    # ``stats`` keep the last generation's counts.
    state.release_caches()
    if "cache_context" in vars(model):
        del model.cache_context
    del model._catprune_state
