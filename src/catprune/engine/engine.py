"""The step engine: pruning of one transformer, one call at a time.

How a pruned step runs, for any diffusion transformer whose blocks act on tokens one by one except in
attention: a hook after the adapter's gather point keeps only the selected image tokens, so the blocks' own
forward code runs unchanged on K instead of N tokens; the adapter's attention processors recompute K and V
for those tokens only and attend over a per-layer :class:`KVCache` that holds them for all tokens; a hook
after the scatter point puts the new outputs of the selected tokens into the pass's :class:`OutputCache`.

Before each call the engine asks the :class:`StepTracker` which generation, step and pass the call belongs
to, plans it (:class:`GenerationPlan`), has :class:`Selections` choose the tokens at a pruned step's first
pass, and publishes an immutable :class:`StepContext` in the :class:`StepSlot` that processors and hooks
read. After the call the :class:`MacCounter` counts it and observers get a :class:`StepRecord` per step.
Everything about a model comes from its adapter (``catprune.adapters``), which the engine knows only
through :class:`PruningFacts`.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

import torch
from torch import Tensor

from ..config import EXTRAPOLATION_ORDERS, CATPruningConfig
from ..errors import CacheMemoryError
from ..formatting import format_count
from ..strategies import TokenSelector
from .caches import CachingProcessor, OutputCache, PassKey, cache_memory_message
from .context import RowLayout, StepContext, StepMode, StepSlot, TokenLayout, TokenShard
from .parallel import ParallelPlan, parallelize
from .plan import GenerationPlan, refresh_steps, too_short_warning
from .records import GenerationStats, MacCounter, Observer, StepRecord
from .selections import Selections
from .tracker import Call, CallKind, NamedContext, StepTracker

logger = logging.getLogger("catprune")


class PruningFacts(Protocol):
    """What the engine needs from a model's adapter: the required part of ``catprune.adapters``'
    contract (``PruningAdapter``)."""

    token_arguments: tuple[str, ...]
    cond_first: bool
    context_parallel: ParallelPlan | None

    def token_layout(self, model: torch.nn.Module, arguments: dict[str, Any]) -> TokenLayout: ...

    def batch_rows(self, arguments: dict[str, Any]) -> int: ...

    def call_latents(self, arguments: dict[str, Any]) -> Tensor: ...

    def call_timestep(self, arguments: dict[str, Any]) -> Any: ...

    def text_tokens(self, arguments: dict[str, Any]) -> int: ...

    def noise_tokens(self, model: torch.nn.Module, tokens: Tensor) -> Tensor: ...

    def is_auxiliary_call(self, arguments: dict[str, Any]) -> bool: ...

    def processors(
        self, model: torch.nn.Module, slot: StepSlot, capture_attention: bool
    ) -> Iterable[CachingProcessor]: ...

    def install(
        self, model: torch.nn.Module, slot: StepSlot, scatter: Callable[[Tensor], Tensor]
    ) -> list[Any]: ...


class PruningEngine:
    """CAT pruning of one transformer: returned by ``apply_cat_pruning``.

    A generation starts when the tracker says so (see ``catprune.engine.tracker``), when the token layout
    or the batch changes (except CFG truncation: the conditional rows keep their selection and caches), or
    on :meth:`begin_generation` / :meth:`reset`.
    """

    def __init__(self, config: CATPruningConfig, adapter: PruningFacts, model: torch.nn.Module) -> None:
        self.config = config
        self.adapter = adapter
        self.model = model
        self.selections = Selections(config)
        self.slot = StepSlot()
        self.tracker = StepTracker()
        self.counter = MacCounter(adapter if hasattr(adapter, "step_macs") else None, model)  # type: ignore[arg-type]
        self.processors: list[CachingProcessor] = []
        """The caching processors of the model being called."""
        self.experts: dict[torch.nn.Module, list[CachingProcessor]] = {}
        """Every model pruned and its processors: the one, or the experts of a pipeline that hands a
        generation from one to the next (Wan 2.2 A14B), sharing one tracker and one selection history."""
        self.hook_handles: list[Any] = []
        """The module hooks :func:`attach` installed (removed by :func:`detach`)."""
        self.checks: list[Callable[[], None]] = []
        """Run at every generation's first call: each raises when something combined with pruning since it
        was applied cannot work with it (see ``catprune.compatibility``)."""
        self.detect_cfg = False
        """Whether a generation's first call tells if the batch is CFG pairs (applied to a pipeline)."""
        self.declared: tuple[bool | None, int | None] = (None, None)
        """(CFG pairs, steps) as :meth:`begin_generation` was told."""
        self.plan: GenerationPlan | None = None
        self.outputs: dict[PassKey, OutputCache] = {}
        """Each pass's output cache."""
        self.output: OutputCache | None = None
        """The current pass's (switched before the call: compiled code reads one attribute)."""
        self.call_output: Tensor | None = None
        """(B, N, C) the current call's output tokens, every image token as computed (read at its end)."""
        self.shard: TokenShard | None = None
        """This process's share of the tokens under diffusers' context parallelism (``parallel.py``)."""
        self._observers: list[Observer] = []
        self._warned: set[str] = set()
        self._signature = inspect.signature(model.forward)
        self.cache_dtype = getattr(torch, config.cache_dtype) if config.cache_dtype else None
        """The K/V caches' storage dtype (``config.cache_dtype``; None: the model's)."""

    # --- the public controls

    @property
    def stats(self) -> GenerationStats:
        """What pruning did in the current (or last) generation."""
        return self.counter.stats

    @property
    def context(self) -> StepContext | None:
        """The latest call's context (None for a call that is not a denoising step, and before the first)."""
        return self.slot.context

    @property
    def mode(self) -> StepMode:
        return self.slot.mode

    @property
    def indices(self) -> Tensor | None:
        """(B, K) the latest pruned step's tokens (the generation's index buffer)."""
        return self.selections.indices

    @property
    def selector(self) -> TokenSelector:
        return self.selections.selector

    def reset(self) -> None:
        """Forget the current generation (and free its caches); the next call starts a new one."""
        self._forget()
        self.tracker.restart()

    def begin_generation(self, cfg: bool | None = None, steps: int | None = None) -> None:
        """Start a new generation explicitly; ``cfg`` says whether the batch is CFG row pairs (None: as
        ``config.row_pairing`` says), ``steps`` how many steps it has (for ``refresh_steps`` counted from
        the end). Applied to a pipeline, its scheduler starts generations and tells both."""
        self._forget()
        self.declared = (cfg, steps)
        self.tracker.begin()

    def release_caches(self) -> None:
        """End the current generation and free its caches (K/V of every image token per layer: 1.2 GiB
        for SD3-medium at 1024x1024 with CFG); ``stats`` keep the generation's counts."""
        stats = self.stats
        self.reset()
        self.counter.stats = stats

    def force_indices(self, indices: Tensor | None) -> None:
        """For measurement: pruned steps recompute ``indices`` (B, K) int64, K = ``config.num_kept(N)``,
        instead of the selector's choice (None: the selector again); kept across :meth:`reset`.

        Counting MACs on the ``meta`` device (no data to select from) and timing a pruned step without its
        selection need it."""
        self.selections.forced = indices

    def add_observer(self, observer: Observer) -> Callable[[], None]:
        """Call ``observer(record)`` after every denoising step; returns a function that removes it."""
        self._observers.append(observer)
        return lambda: self._observers.remove(observer)

    # --- one call: the model's pre-hook, the scatter hook, the model's post-hook

    def begin_call(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], model: torch.nn.Module | None = None
    ) -> tuple[tuple[Any, ...], dict]:
        """Plan the call (of ``model``, one of :attr:`experts`; None: the current one) and publish its
        context; at a pruned step, its per-token arguments (ControlNet residuals) are gathered at the
        selected tokens. Returns the call's arguments."""
        bound = self._signature.bind_partial(*args, **kwargs)
        arguments = bound.arguments
        if self.adapter.is_auxiliary_call(arguments):
            self.slot.context = None
            return args, kwargs
        if model is not None and model is not self.model:
            self._switch_expert(model)
        call, plan = self._locate(arguments)
        context = self._plan_call(call, plan, arguments)
        self.slot.context = context
        self.call_output = None
        if context.mode is not StepMode.PRUNED:
            return args, kwargs
        gathered = {
            name: _gather_each(context, arguments[name])
            for name in self.adapter.token_arguments
            if arguments.get(name) is not None
        }
        arguments.update(gathered)
        return (bound.args, bound.kwargs) if gathered else (args, kwargs)

    def scatter(self, output: Tensor) -> Tensor:
        """The output tokens at the scatter point (B, n + R, C): unselected image tokens reuse the pass's
        previous output (traced by ``torch.compile`` with the forward)."""
        context = self.slot.context
        if context is None:
            return output
        assert self.output is not None
        returned, self.call_output = self.output.complete(output, context)
        return returned

    def end_call(self) -> None:
        context = self.slot.context
        if context is None:
            return
        self.counter.count_call(context, self.slot.capture.macs)
        self.slot.capture.macs = 0
        if not context.first_pass:
            return
        if self.config.prune and context.step == self.config.start_step - 2:
            self.selector.set_reference(self._prompt_noise(self._call_output(context)))
        self.counter.count_step(context)
        if self._observers:
            self._notify(context)

    # --- planning

    def _locate(self, arguments: dict[str, Any]) -> tuple[Call, GenerationPlan]:
        """Which generation, step and pass the call is; starts the generation or steps it."""
        layout = self.adapter.token_layout(self.model, arguments)
        rows = self.adapter.batch_rows(arguments)
        call = self.tracker.classify(self.adapter.call_timestep(arguments))
        plan = self.plan
        if call.kind is not CallKind.GENERATION and plan is not None:
            if plan.drops_unconditional_rows(layout, rows):
                self._take_rows(plan.drop_unconditional_rows())
            elif (layout, rows) != (plan.layout, plan.rows):
                self.tracker.restart()
                call = self.tracker.classify(self.adapter.call_timestep(arguments))
        if call.kind is CallKind.GENERATION or plan is None:
            plan = self._start_generation(arguments, rows, layout)
        elif call.kind is CallKind.STEP:
            plan.step += 1
        return call, plan

    def _start_generation(self, arguments: dict[str, Any], rows: int, layout: TokenLayout) -> GenerationPlan:
        self._forget()
        for check in self.checks:
            check()
        steps = self.tracker.expected_steps() or self.declared[1]
        refresh, refresh_warning = refresh_steps(self.config, steps)
        for key, message in (("refresh", refresh_warning), ("short", too_short_warning(self.config, steps))):
            if message is not None and key not in self._warned:
                self._warned.add(key)
                warnings.warn(message, stacklevel=6)
        self.plan = GenerationPlan(self.config, rows, layout, self._row_layout(arguments), refresh)
        return self.plan

    def _row_layout(self, arguments: dict[str, Any]) -> RowLayout:
        """CFG pairs as declared (``begin_generation``), detected (a pipeline's first call: both halves hold
        the same latents, one host read at a full step; in the order the adapter declares), or as
        ``config.row_pairing`` says."""
        declared = self.declared[0]
        if declared is None and self.detect_cfg:
            paired = _is_cfg_batch(self.adapter.call_latents(arguments))
            return RowLayout(paired, paired and self.adapter.cond_first)
        paired = self.config.row_pairing != "none" if declared is None else declared
        return RowLayout(paired, paired and self.config.row_pairing == "cfg-cond-first")

    def _plan_call(self, call: Call, plan: GenerationPlan, arguments: dict[str, Any]) -> StepContext:
        self._enter_pass(call.pass_key)
        assert self.output is not None
        mode = plan.mode
        if mode is StepMode.PRUNED and self.output.tokens is None:
            mode = StepMode.FILL  # a pass first seen after the fill step fills its own caches now
        first_pass = call.kind is not CallKind.PASS
        skipped = mode is StepMode.PRUNED and self.config.skips(plan.step)
        num_kept = 0 if skipped else self.config.num_kept(plan.layout.grid.num_tokens)
        if self.shard is not None:
            num_kept = self.shard.kept(num_kept, plan.layout.grid.num_tokens)
        indices = self.selections.indices
        if skipped:
            indices = self.selections.skip(plan.rows, self.output.tokens.device)
        elif mode is StepMode.PRUNED and first_pass:
            noise = self._prompt_noise(self.output.tokens)
            indices = self.selections.choose(noise, plan, num_kept, self.slot.capture.map)
        rows = plan.rows
        cache_bytes = self._cache_bytes(rows, plan.layout) if mode is StepMode.FILL else 0
        if mode is StepMode.FILL and self.output.tokens is None:  # the pass allocates its caches now
            self._check_cache_memory(cache_bytes)
        return StepContext(
            step=plan.step,
            pass_key=call.pass_key,
            first_pass=first_pass,
            mode=mode,
            rows=rows,
            row_layout=plan.row_layout,
            layout=plan.layout,
            num_kept=num_kept,
            text_tokens=self.adapter.text_tokens(arguments),
            indices=indices if mode is StepMode.PRUNED else None,
            timestep=self._timesteps(arguments, rows),
            refreshing=mode is StepMode.FILL and plan.step >= self.config.start_step,
            keeps_output=plan.keeps_output,
            cache_bytes=cache_bytes,
            shard=self.shard,
        )

    def _cache_bytes(self, rows: int, layout: TokenLayout) -> int:
        """One pass's K/V caches in bytes: keys and values of every image (and fixed) token in every
        caching layer, in ``cache_dtype`` or the model's dtype (the rows every step recomputes, such as
        text, left out, and float8's per-token scales: one number per head width, 0.08% at width 5120)."""
        parameter = next(self.model.parameters(), None)
        size = parameter.element_size() if parameter is not None else 4
        if self.cache_dtype is not None:
            size = self.cache_dtype.itemsize
        tokens = layout.grid.num_tokens + layout.fixed_tokens
        widths = sum(_attention_width(processor.attention) for processor in self.processors)
        if self.shard is not None:  # each process caches its share of the heads
            widths //= self.shard.world
        return 2 * rows * tokens * widths * size

    def _check_cache_memory(self, required: int) -> None:
        """Before a pass's first fill step: log the caches' size once, and on a CUDA device refuse in one
        line when they cannot fit in its free memory."""
        if "cache size" not in self._warned:
            self._warned.add("cache size")
            logger.info(
                "CAT pruning: the K/V caches take about %s per pass (%d layers)",
                format_count(required, "B"),
                len(self.processors),
            )
        parameter = next(self.model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            # Caches freed earlier (a previous generation's, or the previous expert's at a switch) stay
            # reserved by PyTorch's allocator, which reuses them: free for this allocation too.
            free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            if required > free:
                raise CacheMemoryError(cache_memory_message(required, device, free))

    def _enter_pass(self, key: PassKey) -> None:
        """Point the scatter and every processor at pass ``key``'s caches: Python work per processor, done
        only when the pass changes (once per generation, or per call under true CFG)."""
        if self.output is not None and self.outputs.get(key) is self.output:
            return
        extrapolate = EXTRAPOLATION_ORDERS[self.config.output_extrapolation]
        self.output = self.outputs.setdefault(key, OutputCache(extrapolate))
        for processor in self.processors:
            processor.enter_pass(key)

    def _switch_expert(self, model: torch.nn.Module) -> None:
        """The pipeline hands the generation to another expert (Wan 2.2 A14B: the low-noise one, partway
        through the schedule). The previous expert's K/V caches are of no use to this one (its weights
        differ) and it never runs again in the generation, so they are freed now; the outputs are
        forgotten, so that each pass's next pruned step is a fill step of the new expert's caches (and the
        peak memory is one expert's caches). The generation, its steps, and its selection history (the
        reference noise n_t0, the tokens' staleness) go on."""
        for processor in self.processors:
            processor.release()
        self.model, self.processors = model, self.experts[model]
        self.outputs.clear()
        self.output = None

    def _take_rows(self, rows: slice) -> None:
        """Keep only batch rows ``rows`` in every cache and buffer (CFG truncation)."""
        for cache in (*self.processors, *self.outputs.values(), self.selections):
            cache.take_rows(rows)

    def _timesteps(self, arguments: dict[str, Any], rows: int) -> Tensor | None:
        """The call's timestep as (rows,) float32 on the model's device (a device-side cast, no host
        read), where an extrapolation option needs it."""
        if self.config.kv_extrapolation == self.config.output_extrapolation == "none":
            return None
        timestep = self.adapter.call_timestep(arguments)
        if timestep is None:
            raise ValueError("CAT pruning: extrapolation needs the transformer call's timestep")
        device = self.adapter.call_latents(arguments).device
        time = torch.as_tensor(timestep, device=device, dtype=torch.float32).reshape(-1)
        return time.expand(rows) if time.numel() == 1 else time

    # --- after the call

    def _prompt_noise(self, tokens: Tensor) -> Tensor:
        """Output tokens (B, N, C) -> the noise channels of the prompt rows (P, N, C_noise)."""
        assert self.plan is not None
        return self.adapter.noise_tokens(self.model, self.plan.row_layout.prompt_rows(tokens))

    def _call_output(self, context: StepContext) -> Tensor:
        if self.call_output is None:
            raise RuntimeError(
                f"CAT pruning: the call of step {context.step} never reached the adapter's scatter point"
            )
        return self.call_output

    def _notify(self, context: StepContext) -> None:
        grid, indices = context.grid, context.indices
        if indices is not None:
            indices = context.row_layout.prompt_rows(indices).clone()  # the buffer changes
        record = StepRecord(
            step=context.step,
            mode=context.mode,
            height=grid.height,
            width=grid.width,
            indices=indices,
            noise=self._prompt_noise(self._call_output(context)),
            reference=self.selector.reference,
            cluster_labels=self.selector.cluster_labels,
            frames=grid.frames,
        )
        for observer in list(self._observers):
            observer(record)

    def _forget(self) -> None:
        """Free one generation's caches and start its statistics afresh."""
        self.plan = None
        self.outputs.clear()
        self.output = None
        self.call_output = None
        self.slot.capture.map = None
        self.slot.capture.macs = 0
        self.selections.reset()
        for processor in self.processors:
            processor.release()
        self.counter.stats = GenerationStats()


def _attention_width(attention: torch.nn.Module) -> int:
    """Channels of an attention layer's keys (all heads)."""
    return int(getattr(attention, "inner_dim", None) or attention.to_k.out_features)


def _gather_each(context: StepContext, tensors: Any) -> Any:
    """A sequence of per-token tensors (B, N + R, ...) (Flux's ControlNet residuals), or a mapping of them
    by block (Z-Image's), each gathered at the selected tokens."""
    if isinstance(tensors, Mapping):
        return {key: context.gather(value) for key, value in tensors.items()}
    return [context.gather(value) for value in tensors]


def _is_cfg_batch(hidden_states: Tensor) -> bool:
    """Whether a pipeline's batch is CFG pairs: both halves hold the same latents. One host read, at a
    generation's first call (a full step)."""
    rows = hidden_states.shape[0]
    return rows % 2 == 0 and torch.equal(hidden_states[: rows // 2], hidden_states[rows // 2 :])


def attached_engine(model: torch.nn.Module) -> PruningEngine | None:
    """The pruning engine of a transformer, or None when pruning is not applied to it."""
    return getattr(model, "_catprune_engine", None)


def attach(model: torch.nn.Module, adapter: PruningFacts, config: CATPruningConfig) -> PruningEngine:
    """Install the hooks and processors on ``model``; everything is resolved before anything changes."""
    engine = PruningEngine(config, adapter, model)
    attach_expert(engine, model)
    engine.processors = engine.experts[model]
    return engine


def attach_expert(engine: PruningEngine, model: torch.nn.Module) -> None:
    """Install ``engine``'s hooks and processors on ``model`` (the engine's own model, or another expert
    of the same class that a pipeline calls in turn within one generation)."""
    processors = list(engine.adapter.processors(model, engine.slot, engine.selector.needs_attention))
    engine.shard, parallel_handles = parallelize(
        model, engine.adapter.context_parallel, engine.slot, processors
    )
    if engine.shard is not None and engine.config.skip_every:
        raise RuntimeError("CAT pruning: skip_every is not supported under context parallelism")
    for processor in processors:
        processor.extrapolate = EXTRAPOLATION_ORDERS[engine.config.kv_extrapolation]
        processor.cache_dtype = engine.cache_dtype
    # PyTorch's own module hooks, not a replaced ``forward``: accelerate's offload hooks and diffusers'
    # hook registry replace and restore ``forward`` on their own schedule, which would drop or revive ours.
    # The model's own hooks plan and account for each call in Python, outside ``torch.compile``: compiled
    # whole, the model's forward is one graph per step kind, entered after the plan is made.
    begin = torch.compiler.disable(lambda module, args, kwargs: engine.begin_call(args, kwargs, module))
    end = torch.compiler.disable(lambda module, args, output: engine.end_call())
    engine.hook_handles += [
        model.register_forward_pre_hook(begin, with_kwargs=True),
        model.register_forward_hook(end),
        *engine.adapter.install(model, engine.slot, engine.scatter),
        *parallel_handles,
    ]
    for processor in processors:
        processor.attention.set_processor(processor)
    if hasattr(model, "cache_context"):
        model.cache_context = _named_contexts(model.cache_context, engine.tracker)
    model._catprune_engine = engine
    engine.experts[model] = processors


def _named_contexts(cache_context: Callable[..., Any], tracker: StepTracker) -> Callable[..., Any]:
    """diffusers' ``model.cache_context(name, **kwargs)``, also telling the tracker what it says."""

    @contextlib.contextmanager
    def named_context(name: str, **kwargs: Any) -> Iterator[None]:
        outer = tracker.named
        tracker.named = NamedContext(name, kwargs.get("step_index"), kwargs.get("num_inference_steps"))
        try:
            with cache_context(name, **kwargs):
                yield
        finally:
            tracker.named = outer

    return named_context


def detach(model: torch.nn.Module) -> bool:
    """Exact inverse of :func:`attach`: the original processors come back and the module hooks go.
    Every expert the engine prunes is restored. Returns whether pruning was applied."""
    engine = attached_engine(model)
    if engine is None:
        return False
    for processor in (processor for processors in engine.experts.values() for processor in processors):
        processor.attention.set_processor(processor.original)
    for handle in engine.hook_handles:
        handle.remove()
    # A forward compiled whole with the hooks in it may outlive them (dynamo does not guard on module
    # hooks): with no context, its traced hooks are the identity and its processors' original ones run.
    # ``stats`` keep the last generation's counts.
    engine.release_caches()
    engine.slot.context = None
    for expert in engine.experts:
        if "cache_context" in vars(expert):
            del expert.cache_context
        del expert._catprune_engine
    return True
