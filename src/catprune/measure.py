"""Measuring CAT pruning: MACs counted by running the real forward, and helpers for timing it.

MACs are counted, not derived from a formula: the model is built on the ``meta`` device (shapes, no
data, no memory), pruning is applied, and one full, one fill and one pruned transformer call run under
``torch.utils.flop_counter.FlopCounterMode`` (MACs = FLOPs / 2). The meta device has no data to select
tokens from, so the pruned call recomputes a given index set (``PruningEngine.force_indices``); its cost
does not depend on which tokens are chosen. The selection itself runs on real CPU tensors of the right
shapes, counted separately (see :func:`count_selection`).

``docs/measurement.md`` says what each figure counts and how they compare with the paper's.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from torch.utils.weak import WeakTensorKeyDictionary

from .architectures import Architecture
from .config import CATPruningConfig
from .engine import PruningEngine
from .integration import apply_cat_pruning
from .names import COMPILE_MODES as COMPILE_MODES
from .selection import Grid
from .strategies import TokenSelector

PAPER_MACS: dict[tuple[str, int], tuple[float, float]] = {
    ("sd3-medium", 28): (168.28e12, 90.28e12),
    ("sd3-medium", 50): (300.50e12, 136.70e12),
    ("pixart-sigma", 28): (120.68e12, 60.08e12),
    ("pixart-sigma", 50): (215.40e12, 88.24e12),
}
"""The paper's Tables 2 and 3 (full, CAT) per generation: 1024x1024, alpha 0.3, t0 8, CFG, one prompt."""


def _cpu_attention_flops(
    query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any
) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_counter() -> FlopCounterMode:
    """FlopCounterMode that also counts the CPU's fused attention kernel, which it has no formula for
    (on ``meta`` attention falls back to the math path and is counted as two batched matmuls)."""
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}
    return FlopCounterMode(display=False, custom_mapping=mapping)


@dataclass(frozen=True)
class StepMacs:
    """Counted MACs of one transformer call (all rows of the batch)."""

    macs: int
    attention_macs: int
    """Of ``macs``: the attention products QK^T and AV; the rest is linear layers and the patch embedding."""

    @property
    def without_attention(self) -> int:
        return self.macs - self.attention_macs


class KnownMetaValues(TorchDispatchMode):
    """Meta tensors filled with one known value (made by ``full``, ``zeros``, ``ones``... and carried
    through copies, views, comparisons with a number, negations, ``all`` and ``any``), so that a model's
    own host reads of such tensors have an answer on ``meta``: ``item()`` (``if torch.all(x == 0)``) gives
    the value, a boolean mask that is all true or all false selects every row or none. HunyuanVideo 1.5
    reads both in ``forward`` (whether the image embeddings are zero; the text masks joining its text
    sequences). A read of any other meta tensor still fails, as on plain ``meta``; :attr:`reads` counts the
    answered ones."""

    CARRIED = frozenset(
        (
            "_to_copy", "clone", "alias", "detach", "lift_fresh", "view", "_unsafe_view", "reshape", "expand",
            "unsqueeze", "squeeze", "slice", "select", "unbind", "split", "index", "repeat", "t", "permute",
            "transpose",
        )
    )  # fmt: skip
    """Ops whose output holds the values of their first input."""

    def __init__(self) -> None:
        super().__init__()
        self.values = WeakTensorKeyDictionary()
        self.reads = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense" and args[0] in self.values:
            self.reads += 1
            return self.values[args[0]]
        if name == "index" and args[0].is_meta:
            args = (args[0], [self._mask_rows(index) for index in args[1]])
        out = func(*args, **kwargs)
        value = self._value(name, args, kwargs)
        if value is not None:
            for tensor in out if isinstance(out, tuple | list) else (out,):
                if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                    self.values[tensor] = value
        return out

    def _mask_rows(self, index: torch.Tensor | None) -> torch.Tensor | None:
        """A known boolean mask (S,) as the rows it selects: all S or none."""
        if index is None or index.dtype != torch.bool or index not in self.values:
            return index
        self.reads += 1
        return torch.arange(index.numel() if self.values[index] else 0, device=index.device)

    def _value(self, name: str, args: tuple, kwargs: dict) -> Any:
        """The one value of an op's output, where its inputs make it known."""
        if name in ("full", "full_like", "fill"):
            return args[1]
        if name in ("zeros", "zeros_like", "new_zeros"):
            return 0
        if name in ("ones", "ones_like", "new_ones"):
            return 1
        known = self.values.get(args[0]) if args and isinstance(args[0], torch.Tensor) else None
        if known is None:
            return None
        if name in self.CARRIED:
            return known
        if name in ("all", "any"):
            return bool(known)
        if name in ("bitwise_not", "logical_not"):
            return not known
        if name in ("eq", "ne") and not isinstance(args[1], torch.Tensor):
            return (known == args[1]) == (name == "eq")
        return None


def count_call(model: torch.nn.Module, **inputs: Any) -> StepMacs:
    """Count one forward call of ``model``.

    FlopCounterMode attributes every FLOP to the modules it runs in. Outside the leaf layers (linear,
    convolution, normalisation) the transformers compute only the attention products, in their attention
    processors, so those FLOPs are the attention share.
    """
    counter = flop_counter()
    with torch.inference_mode(), counter:
        model(**inputs, return_dict=False)
    per_module = counter.get_flop_counts()
    root = type(model).__name__
    in_layers = sum(
        sum(per_module.get(f"{root}.{name}", {}).values())
        for name, module in model.named_modules()
        if name and next(module.children(), None) is None
    )
    total = counter.get_total_flops()
    return StepMacs(total // 2, (total - in_layers) // 2)


@dataclass(frozen=True)
class SelectionCost:
    """Element operations of the token selection (one per element an aten op reads or writes, the largest
    of its tensors; views are free), counted on real CPU tensors; see :func:`count_selection`."""

    clustering_step: int
    """The first selection: relative noise, KMeans (k-means++ and the Lloyd iterations), graph pooling."""
    later_step: int
    """Each later selection: relative noise, cluster max-pooling, ranking, staleness counts."""
    matmul_macs: int
    """What FlopCounterMode counts of both (it counts matmuls and convolutions only; selection has none)."""
    noise_shape: tuple[int, int, int]

    def per_generation(self, pruned_steps: int) -> int:
        """Element operations of the selections of a generation: one clustering step, then later steps."""
        return self.clustering_step + (pruned_steps - 1) * self.later_step if pruned_steps else 0


CACHE_DTYPES = {"float32": 4, "bfloat16": 2, "float8": 1}
"""Bytes per element of the dtypes a cache's size is reported in."""


def engine_cache_elements(state: PruningEngine) -> int:
    """Elements the engine's caches hold now (every pass's K/V of every layer, and output tokens)."""
    kv = (cache for processor in state.processors for cache in processor.caches.values())
    tensors = [t for cache in kv for t in (cache.key, cache.value) if t is not None]
    tensors += [output.tokens for output in state.outputs.values() if output.tokens is not None]
    return sum(t.numel() for t in tensors)


@dataclass(frozen=True)
class MacsReport:
    """MACs of full and CAT generations of one architecture at one setting."""

    architecture: Architecture
    parameters: int
    resolution: int
    cfg: bool
    rows: int
    """Samples per transformer call: prompts x 2 under classifier-free guidance."""
    image_tokens: int
    kept_tokens: int
    text_tokens: int
    steps: int
    start_step: int
    keep_ratio: float
    full_step: StepMacs
    fill_step: StepMacs
    """Step t0 - 1: full computation that also fills the K/V caches."""
    pruned_step: StepMacs
    analytic_full_step: int
    """``adapter.step_macs`` from the layer shapes, for comparison with the counted figures."""
    analytic_pruned_step: int
    cache_elements: int = 0
    """Elements of the caches one pass keeps (every attention layer's K/V, the output tokens), at
    :attr:`rows` rows: read from the caches the counted fill step allocated (meta tensors)."""
    passes: int = 1
    """Passes per step, each with its own caches: 2 where CFG is a second call (Wan)."""
    switch_step: int | None = None
    """Where a second expert takes over (Wan 2.2 A14B): a pruned step there is a fill step of its caches."""

    def cache_bytes(self) -> dict[str, int]:
        """The caches of a generation (all its passes) in bytes, by storage dtype."""
        elements = self.cache_elements * self.passes
        return {name: elements * size for name, size in CACHE_DTYPES.items()}

    @property
    def step_counts(self) -> tuple[int, int, int]:
        """(full, fill, pruned) steps of a CAT generation."""
        full = min(self.steps, self.start_step - 1)
        fill = int(self.steps >= self.start_step)
        if self.switch_step is not None and self.start_step <= self.switch_step < self.steps:
            fill += 1  # the second expert fills its own caches
        return full, fill, self.steps - full - fill

    def _generation(self, macs: Callable[[StepMacs], int]) -> tuple[int, int]:
        full, fill, pruned = self.step_counts
        cat = full * macs(self.full_step) + fill * macs(self.fill_step) + pruned * macs(self.pruned_step)
        return self.passes * self.steps * macs(self.full_step), self.passes * cat

    @property
    def full_macs(self) -> int:
        return self._generation(lambda step: step.macs)[0]

    @property
    def cat_macs(self) -> int:
        return self._generation(lambda step: step.macs)[1]

    @property
    def ratio(self) -> float:
        return self.cat_macs / self.full_macs

    @property
    def without_attention(self) -> tuple[int, int]:
        """(full, CAT) MACs per generation leaving out attention products: how the paper counts."""
        return self._generation(lambda step: step.without_attention)

    def by_start_step(self) -> list[tuple[int, int, float]]:
        """(start_step, pruned steps, ratio CAT / full) for every start_step that prunes at least one of the
        generation's steps (2 .. steps - 1), at this keep ratio: what a few-step model (FLUX.1-schnell,
        FLUX.2-klein) could save, whose default schedule never reaches the default t0. The fill step is
        counted as in :attr:`ratio` (a pruned step's cost does not depend on t0)."""
        rows = []
        for start_step in range(2, self.steps):
            other = dataclasses.replace(self, start_step=start_step)
            rows.append((start_step, other.step_counts[2], other.ratio))
        return rows

    def paper(self) -> tuple[float, float] | None:
        """The paper's (full, CAT) MACs for this setting, if it reports it."""
        paper_setting = (
            self.resolution == 1024
            and self.keep_ratio == 0.3
            and self.start_step == 8
            and self.cfg
            and self.rows == self.architecture.cfg_batch
        )
        return PAPER_MACS.get((self.architecture.name, self.steps)) if paper_setting else None


def count_macs(
    architecture: Architecture,
    resolution: int = 1024,
    steps: int = 28,
    keep_ratio: float = 0.3,
    start_step: int = 8,
    batch: int = 1,
    cfg: bool = True,
    kept_multiple: int = 1,
) -> MacsReport:
    """Count the MACs of full and CAT generations of ``batch`` prompts (see the module docstring)."""
    if steps < 1 or batch < 1:
        raise ValueError(f"steps and batch must be >= 1, got {steps} and {batch}")
    config = CATPruningConfig(keep_ratio=keep_ratio, start_step=start_step, kept_multiple=kept_multiple)
    rows = batch * (architecture.cfg_batch if cfg else 1)
    model = architecture.build("meta")
    # Counting needs one call of each kind: FULL (step 0), FILL (step 1), PRUNED (step 2).
    state = apply_cat_pruning(model, CATPruningConfig(keep_ratio=keep_ratio, start_step=2))
    state.begin_generation(cfg and architecture.cfg_batch == 2)
    num_tokens = architecture.image_tokens(resolution)
    num_kept = config.num_kept(num_tokens)
    state.force_indices(torch.arange(num_kept, device="meta").expand(rows, num_kept))

    with torch.device("meta"), KnownMetaValues():  # the model's own reads of its inputs' values
        latents = torch.zeros(architecture.latent_shape(rows, resolution))
        inputs = {
            **architecture.adapter.call_inputs(latents, torch.full((rows,), 500.0)),
            **architecture.conditioning(model, rows, resolution),
        }
        full, fill, pruned = (count_call(model, **inputs) for _ in range(3))
    text = architecture.text_tokens
    adapter = state.adapter
    fixed = state.context.fixed_tokens if state.context is not None else 0
    """Tokens never pruned after the image's (Z-Image's text): counted with the queries, as the engine's
    counter does."""
    return MacsReport(
        architecture=architecture,
        parameters=sum(parameter.numel() for parameter in model.parameters()),
        resolution=resolution,
        cfg=cfg,
        rows=rows,
        image_tokens=num_tokens,
        kept_tokens=num_kept,
        text_tokens=text,
        steps=steps,
        start_step=start_step,
        keep_ratio=keep_ratio,
        full_step=full,
        fill_step=fill,
        pruned_step=pruned,
        analytic_full_step=rows
        * adapter.step_macs(model, num_tokens + fixed, num_tokens + fixed, text, False),
        analytic_pruned_step=rows
        * adapter.step_macs(model, num_kept + fixed, num_tokens + fixed, text, True),
        cache_elements=engine_cache_elements(state),
        passes=architecture.cfg_calls if cfg else 1,
        switch_step=architecture.expert_switch_step(steps),
    )


class _ElementOps(TorchDispatchMode):
    """Counts one operation per element of the largest tensor each aten op reads or writes (views free)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            values = [*args, *(kwargs or {}).values(), *(out if isinstance(out, tuple | list) else (out,))]
            tensors = [
                t for value in values for t in (value if isinstance(value, tuple | list) else (value,))
            ]
            self.ops += max((t.numel() for t in tensors if isinstance(t, torch.Tensor)), default=0)
        return out


def count_selection(
    architecture: Architecture, resolution: int, batch: int, config: CATPruningConfig
) -> SelectionCost:
    """Count CAT's token selection for ``batch`` prompts on real CPU tensors of the shapes it gets: one
    row per prompt (under CFG it looks at the conditional half only), the token grid of ``resolution``,
    the noise channels of each output token (p * p * C)."""
    model = architecture.build("meta")
    adapter = architecture.adapter
    height, width = adapter.image_grid(architecture.shape_config, resolution)
    output_channels = model.get_submodule(adapter.scatter_point).out_features  # p*p*C_out per token
    noise = adapter.noise_tokens(model, torch.empty(1, 1, output_channels, device="meta"))  # (1, 1, p*p*C)
    shape = (batch, height * width, noise.shape[-1])
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(shape, generator=generator)
    selector = TokenSelector(config)
    selector.set_reference(reference)
    num_kept = config.num_kept(height * width)
    counts, matmuls = [], flop_counter()
    with torch.inference_mode(), matmuls:
        for _ in range(2):
            noise = reference + 0.1 * torch.randn(shape, generator=generator)
            counter = _ElementOps()
            with counter:
                selector.select(noise, Grid(height, width), num_kept)
            counts.append(counter.ops)
    return SelectionCost(counts[0], counts[1], matmuls.get_total_flops() // 2, shape)


def shared_weight_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A second module tree over the same parameters and buffers: pruning applied to one leaves the other
    untouched, so full and CAT runs alternate in one process without a second copy of the weights."""
    shared = {id(tensor): tensor for tensor in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, shared)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """``fn()`` and its wall time in seconds, with the device's queued work included (synchronised)."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


class SelectionTimer:
    """Times every ``state.selector.select`` call of a pruned model without adding host syncs: CUDA events
    around each call on a GPU (read after the generation), the wall clock on the CPU."""

    def __init__(self, state: PruningEngine, device: torch.device) -> None:
        self.device = device
        self.selector = state.selector
        self.select = self.selector.select
        self._spans: list[tuple[Any, Any]] = []
        self.selector.select = self._timed_select

    def _now(self) -> Any:
        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _timed_select(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        start = self._now()
        indices = self.select(*args, **kwargs)
        self._spans.append((start, self._now()))
        return indices

    def seconds(self) -> float:
        """Total time of the calls since the last :meth:`clear`."""
        if self.device.type != "cuda":
            return sum(end - start for start, end in self._spans)
        synchronize(self.device)
        return sum(start.elapsed_time(end) for start, end in self._spans) / 1000

    def clear(self) -> None:
        self._spans = []


BUSY_CPU_SHARE = 0.8
"""A single-threaded timing that got less than this share of a core ran on a busy machine."""


def alternating_medians(
    calls: Mapping[str, Callable[[], float]], repeats: int
) -> tuple[dict[str, float], float]:
    """Run the ``calls`` in turn, ``repeats`` rounds (A, B, A, B...), each returning its own seconds: the
    median of each, and the CPU time this process got per second of wall time and torch thread (1.0: it
    ran unhindered; on a CPU shared with other work, less). Alternating spreads a change of the
    machine's load over every call alike."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        for name, call in calls.items():
            seconds[name].append(call())
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    return medians, cpu / (wall * torch.get_num_threads())


def machine_load() -> tuple[float | None, int | None]:
    """(1-minute load average, CPU count) of the machine, None where the platform cannot tell. The load
    counts this process's own threads too."""
    try:
        load: float | None = os.getloadavg()[0]
    except (AttributeError, OSError):  # no getloadavg (Windows) or no load figure
        load = None
    return load, os.cpu_count()


def busy_note(cpu_share: float) -> str:
    """A note for CPU timings: empty when they ran unhindered, else that the machine was busy and how.

    ``cpu_share`` is :func:`alternating_medians`'s: on one thread it shows directly whether other work
    took the core (the load average lags by a minute); with several threads, whose serial parts leave
    some idle anyway, the load average against the cores decides."""
    load, cores = machine_load()
    loaded = load is not None and cores is not None and load > cores
    if torch.get_num_threads() == 1:
        if cpu_share >= BUSY_CPU_SHARE:
            return ""
        note = f"the machine was busy: the timed runs got {cpu_share:.0%} of a CPU core"
    elif not loaded:
        return ""
    else:
        note = "the machine was busy"
    return note + (f" (load average {load:.1f} on {cores} cores)" if load is not None else "")


def denoise(
    model: torch.nn.Module,
    architecture: Architecture,
    latents: torch.Tensor,
    conditioning: dict[str, Any],
    steps: int,
    cfg: bool,
    uncond_conditioning: dict[str, Any] | None = None,
) -> torch.Tensor:
    """The denoising loop as the diffusers pipeline runs it (fresh scheduler timesteps, guidance, learned-
    sigma split, scheduler step); no text encoding, no VAE. CFG as the family runs it: one batch
    ``[uncond..., cond...]`` (``cfg_batch`` 2), or a conditional then an unconditional call per step
    (``cfg_calls`` 2, under ``cache_context("cond")``/``("uncond")`` where the model has it, as Wan's and
    HunyuanVideo's pipelines call it), the second with ``uncond_conditioning`` (default: the same)."""
    scheduler = architecture.make_scheduler()
    scheduler.set_timesteps(steps, device=latents.device)
    batched = cfg and architecture.cfg_batch == 2  # guidance-distilled models take the guidance as an input
    two_calls = cfg and not batched and architecture.cfg_calls == 2

    def call(model_input: torch.Tensor, timestep: torch.Tensor, name: str, extra: dict[str, Any]) -> Any:
        has_context = two_calls and hasattr(model, "cache_context")
        with model.cache_context(name) if has_context else contextlib.nullcontext():
            inputs = architecture.adapter.call_inputs(model_input, timestep)
            return architecture.adapter.call_output(model(**inputs, **extra, return_dict=False)[0])

    for t in scheduler.timesteps:
        model_input = torch.cat([latents, latents]) if batched else latents
        if hasattr(scheduler, "scale_model_input"):
            model_input = scheduler.scale_model_input(model_input, t)
        timestep = t[None].to(latents.device).expand(model_input.shape[0])
        output = call(model_input, timestep, "cond", conditioning)
        if batched:
            uncond, cond = output.chunk(2)
            output = uncond + architecture.guidance_scale * (cond - uncond)
        elif two_calls:
            uncond = call(model_input, timestep, "uncond", uncond_conditioning or conditioning)
            output = uncond + architecture.guidance_scale * (output - uncond)
        noise = architecture.noise_prediction(model, output)
        latents = scheduler.step(noise, t, latents, return_dict=False)[0]
    return latents


"""How ``catprune bench`` compiles both models: not at all, every block (regional), the whole model."""


def compile_model(
    model: torch.nn.Module, architecture: Architecture, how: str, cuda_graphs: bool = False
) -> None:
    """Compile as diffusers users do, with ``fullgraph=True`` (the first call compiles): ``regional``, every
    transformer block; ``full``, the whole model (``model.compile``, after ``apply_cat_pruning``: pruning's
    plan is made in the model's hooks, outside the graphs). ``cuda_graphs``: inductor's
    ``mode="reduce-overhead"`` (CUDA graphs of the compiled graphs)."""
    if how not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {how!r}")
    options: dict[str, Any] = {"fullgraph": True, **({"mode": "reduce-overhead"} if cuda_graphs else {})}
    if how == "full":
        model.compile(**options)
    elif how == "regional":
        for name in architecture.adapter.blocks:
            for block in model.get_submodule(name):
                block.compile(**options)
