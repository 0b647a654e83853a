"""What a user could pick instead of CAT at equal compute: a better solver, or one of diffusers' caches.

``catprune frontier`` (:mod:`catprune.frontier`) compares pruned settings with the unpruned model at fewer
steps. This module adds the other choices, each as rows of the same table, on the same prompts, seeds and
reference:

- **solvers** (:data:`SOLVERS`): ``euler``, ``unipc``, ``dpm++2m`` and ``heun`` as scheduler swaps built
  from the pipeline's own scheduler config (:func:`make_scheduler`): flow-matching versions for a
  flow-matching pipeline (SD3, the MMDiT toys), the discrete-time versions with the same betas and
  prediction type for an epsilon-prediction one (PixArt). Heun calls the model twice per step (2N - 1
  calls for N steps), and its MACs count every call. A solver's fewer-steps curve is rows
  ``solver=NAME,steps=N``; CAT on that solver is ``cat,solver=NAME,steps=N,field=value...``.
- **diffusers' caches** (:data:`CACHES`): FirstBlockCache, TaylorSeer (its default identifiers, and its
  "lite" mode that forecasts the whole model's output), MagCache (calibrated per model first, on the first
  prompt at the reference steps: :func:`calibrate_magcache`), FasterCache and PAB, applied with the
  ``apply_*`` hook functions (or ``enable_cache`` where the transformer is a ``CacheMixin``), each swept
  over its knob (:data:`CACHES`' ``values``). Rows ``CACHE,KNOB=VALUE,steps=N``.

MACs of a cache row are **counted from what ran** (:class:`MacMeter`): forward hooks on the transformer's
linear and convolution layers that catprune's cost model counts (everything but the adaLN and timestep
embeddings) add ``tokens x in x out`` each time a layer actually runs, and a wrapper around every
attention processor adds the attention products ``2 x rows x queries x keys x width`` each time one runs.
A cache that skips a block, an attention or a whole call skips those layers, so its MACs fall by exactly
what it skipped. For a generation without caches this count equals the cost model's
(``tests/test_peers.py``). Solver rows and CAT rows are counted by the pruning engine (every call).

A peer that diffusers refuses or that fails on a model class is not skipped: :func:`probe` runs each
family's first setting on the first prompt and turns an exception into an error row that the table,
CSV and plot report (:func:`error_rows`).

Quality beside PSNR/SSIM (:func:`sharpness`): the Laplacian (high-frequency) energy of an image relative
to its reference image's, in percent: 100 as sharp as the full image, below 100 blurrier, above 100
noisier. "Blurry but close" has a high PSNR and a sharpness well below 100.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .adapters import adapter_for
from .config import CATPruningConfig
from .engine import GenerationStats
from .evaluation import REFERENCE, Variant
from .measure import timed
from .names import PEER_SWEEPS, SOLVER_NAMES
from .runtime import Generation, run_generation

SOLVERS: tuple[str, ...] = SOLVER_NAMES
"""Solvers by name (:func:`make_scheduler`)."""
CALLS_PER_STEP: dict[str, int] = {"heun": 2}
"""Model calls per step (Heun: two, less one at the last step); others one."""

SOLVER_KIND, CAT_SOLVER_KIND, CACHE_KIND, ERROR_KIND = "solver", "cat-solver", "cache", "error"
"""Row kinds this module adds to the frontier's (reference, fewer steps, cat)."""


# --- solvers -------------------------------------------------------------------------------------------


def is_flow_matching(scheduler: Any) -> bool:
    """Whether a scheduler samples a flow-matching (rectified-flow) model: a ``FlowMatch*`` scheduler or
    one configured with flow sigmas / flow prediction."""
    config = scheduler.config
    return (
        type(scheduler).__name__.startswith("FlowMatch")
        or bool(config.get("use_flow_sigmas"))
        or config.get("prediction_type") == "flow_prediction"
    )


def flow_shift(scheduler: Any) -> float:
    """The timestep shift of a flow-matching scheduler (``shift`` or ``flow_shift``)."""
    config = scheduler.config
    return float(config.get("shift", config.get("flow_shift", 1.0)) or 1.0)


def make_scheduler(base: Any, solver: str) -> Any:
    """A scheduler for ``solver`` that samples the same model as ``base`` (the pipeline's own scheduler).

    Flow-matching models: ``euler`` FlowMatchEulerDiscreteScheduler, ``heun`` FlowMatchHeunDiscreteScheduler
    (same shift), ``unipc`` / ``dpm++2m`` UniPCMultistepScheduler / DPMSolverMultistepScheduler (order 2)
    with ``use_flow_sigmas``, ``prediction_type="flow_prediction"`` and ``flow_shift`` = the shift.
    Diffusion (epsilon / v) models: the discrete schedulers ``EulerDiscreteScheduler``,
    ``HeunDiscreteScheduler``, ``UniPCMultistepScheduler`` and ``DPMSolverMultistepScheduler``
    (``dpmsolver++``, order 2) built from ``base``'s config, so betas, prediction type and timestep
    spacing are the model's. Flow sigmas are never put on an epsilon model: its betas define its noise
    levels. A ValueError names the known solvers."""
    import diffusers

    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; known: {', '.join(SOLVERS)}")
    config = dict(base.config)
    if is_flow_matching(base):
        shift, train = flow_shift(base), int(config.get("num_train_timesteps", 1000))
        if solver == "euler":
            if isinstance(base, diffusers.FlowMatchEulerDiscreteScheduler):
                return diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
            return diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=train, shift=shift)
        if solver == "heun":
            return diffusers.FlowMatchHeunDiscreteScheduler(num_train_timesteps=train, shift=shift)
        flow = {
            "num_train_timesteps": train,
            "prediction_type": "flow_prediction",
            "use_flow_sigmas": True,
            "flow_shift": shift,
            "solver_order": 2,
        }
        if solver == "unipc":
            return diffusers.UniPCMultistepScheduler(**flow)
        return diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", **flow)
    classes = {
        "euler": diffusers.EulerDiscreteScheduler,
        "heun": diffusers.HeunDiscreteScheduler,
        "unipc": diffusers.UniPCMultistepScheduler,
        "dpm++2m": diffusers.DPMSolverMultistepScheduler,
    }
    extra = {"algorithm_type": "dpmsolver++", "solver_order": 2} if solver == "dpm++2m" else {}
    return classes[solver].from_config(config, **extra)


def native_solver(scheduler: Any) -> str | None:
    """The solver name whose scheduler is the pipeline's own (its rows are the plain fewer-steps curve),
    or None."""
    for solver in SOLVERS:
        made = make_scheduler(scheduler, solver)
        if type(made) is type(scheduler) and all(
            scheduler.config.get(key) == value
            for key, value in made.config.items()
            if not key.startswith("_") and key in ("prediction_type", "algorithm_type", "solver_order")
        ):
            return solver
    return None


@contextmanager
def solver_swapped(pipe: Any, solver: str | None) -> Iterator[None]:
    """Run the pipeline with ``solver``'s scheduler (None: its own), restored afterwards."""
    if solver is None:
        yield
        return
    original = pipe.scheduler
    pipe.scheduler = make_scheduler(original, solver)
    try:
        yield
    finally:
        pipe.scheduler = original


# --- MACs from what ran --------------------------------------------------------------------------------


class _CountingProcessor:
    """Wraps an attention processor: adds the attention products of each call that actually runs."""

    def __init__(self, processor: Any, meter: MacMeter) -> None:
        self.processor, self.meter = processor, meter

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        rows, queries = hidden_states.shape[0], hidden_states.shape[1]
        if hidden_states.ndim == 4:  # (B, C, H, W) inputs
            queries = hidden_states.shape[2] * hidden_states.shape[3]
        keys = queries
        if encoder_hidden_states is not None:
            if getattr(attn, "add_q_proj", None) is not None:  # joint attention: text joins both sides
                queries += encoder_hidden_states.shape[1]
                keys = queries
            else:  # cross-attention
                keys = encoder_hidden_states.shape[1]
        self.meter.macs += 2 * rows * queries * keys * attn.inner_dim
        return self.processor(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)


class MacMeter:
    """Counts a transformer's MACs from the layers that actually run (see the module's docstring).

    Counted: every ``nn.Linear`` and ``nn.Conv2d`` in the transformer blocks (except their adaLN norms), at
    the image-token embedder, the text embedder and the output projection, and the attention products of
    every attention processor in the blocks: what catprune's cost model counts for a full call. Use as a
    context manager; ``macs`` is the total so far."""

    def __init__(self, transformer: nn.Module) -> None:
        self.transformer = transformer
        self.macs = 0
        self._handles: list[Any] = []
        self._processors: list[tuple[nn.Module, Any]] = []

    def counted_modules(self) -> Iterator[tuple[str, nn.Module]]:
        adapter = adapter_for(self.transformer)
        roots = [adapter.gather_point, adapter.scatter_point, getattr(adapter, "text_embedder", None)]
        for root in filter(None, roots):
            yield from (
                (f"{root}.{n}".rstrip("."), m)
                for n, m in self.transformer.get_submodule(root).named_modules()
            )
        for blocks in getattr(adapter, "blocks", ()):
            for index, block in enumerate(self.transformer.get_submodule(blocks)):
                for name, module in block.named_modules():
                    if not name.split(".")[0].startswith("norm"):
                        yield f"{blocks}.{index}.{name}", module

    def _count_layer(self, module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        if isinstance(module, nn.Linear):
            self.macs += output.numel() // module.out_features * module.in_features * module.out_features
        else:  # Conv2d: output elements x (input channels / groups) x kernel area
            kernel = module.kernel_size[0] * module.kernel_size[1]
            self.macs += output.numel() * (module.in_channels // module.groups) * kernel

    def __enter__(self) -> MacMeter:
        for _, module in self.counted_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                self._handles.append(module.register_forward_hook(self._count_layer))
            if hasattr(module, "processor") and hasattr(module, "inner_dim"):
                self._processors.append((module, module.processor))
                module.processor = _CountingProcessor(module.processor, self)
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        for module, processor in self._processors:
            module.processor = processor
        self._handles, self._processors = [], []


# --- diffusers' caches ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheFamily:
    """One of diffusers' caches as the frontier sweeps it."""

    name: str
    knob: str
    """The swept parameter, as rows name it."""
    values: tuple[float, ...]
    """The sweep's default values (chosen to span about 0.3x-0.9x of the reference's MACs)."""
    description: str
    build: Callable[[float, CacheRunContext], Any] = field(repr=False, compare=False)
    """(knob value, context) -> the diffusers config."""


@dataclass
class CacheRunContext:
    """What a cache config may need: the steps and timesteps of the generation, the model's MagCache
    ratios."""

    steps: int
    timestep: Callable[[], float]
    mag_ratios: Sequence[float] | None = None
    whole_blocks: Sequence[str] = ()
    """The transformer blocks whose whole output can be forecast (:func:`forecastable_blocks`)."""


def forecastable_blocks(transformer: nn.Module) -> list[str]:
    """The names of the transformer blocks (the cost model's block lists) that return every output they
    take: all but SD3's last joint block (``context_pre_only``), which returns no text states, so that a
    forecast of it has nothing to extrapolate (diffusers' TaylorSeer and FirstBlockCache fail on it)."""
    adapter = adapter_for(transformer)
    return [
        f"{blocks}.{index}"
        for blocks in getattr(adapter, "blocks", ())
        for index, block in enumerate(transformer.get_submodule(blocks))
        if not getattr(block, "context_pre_only", False)
    ]


def _fbc(value: float, context: CacheRunContext) -> Any:
    from diffusers.hooks import FirstBlockCacheConfig

    return FirstBlockCacheConfig(threshold=value)


def _taylorseer(value: float, context: CacheRunContext, lite: bool = False, blocks: bool = False) -> Any:
    from diffusers.hooks import TaylorSeerCacheConfig

    identifiers = [re.escape(name) for name in context.whole_blocks] if blocks else None
    return TaylorSeerCacheConfig(
        cache_interval=int(value),
        taylor_factors_dtype=torch.float32,
        use_lite_mode=lite,
        cache_identifiers=identifiers,
    )


def _magcache(value: float, context: CacheRunContext) -> Any:
    from diffusers.hooks import MagCacheConfig

    if context.mag_ratios is None:
        raise ValueError("MagCache needs its calibration ratios for this model")
    return MagCacheConfig(
        threshold=value, num_inference_steps=context.steps, mag_ratios=list(context.mag_ratios)
    )


def _fastercache(value: float, context: CacheRunContext) -> Any:
    from diffusers.hooks import FasterCacheConfig

    return FasterCacheConfig(
        spatial_attention_block_skip_range=int(value),
        spatial_attention_timestep_skip_range=(-1, 1001),
        unconditional_batch_skip_range=int(value),
        unconditional_batch_timestep_skip_range=(-1, 1001),
        current_timestep_callback=context.timestep,
        tensor_format="BCHW",
    )


def _pab(value: float, context: CacheRunContext) -> Any:
    from diffusers.hooks import PyramidAttentionBroadcastConfig

    return PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=int(value),
        spatial_attention_timestep_skip_range=(-1, 1001),
        current_timestep_callback=context.timestep,
    )


CACHES: dict[str, CacheFamily] = {
    family.name: family
    for family in (
        CacheFamily(
            "fbc", *PEER_SWEEPS["fbc"],
            "FirstBlockCache: skip the later blocks while the first block's residual changes < the threshold",
            _fbc,
        ),
        CacheFamily(
            "taylorseer", *PEER_SWEEPS["taylorseer"],
            "TaylorSeer, diffusers' default identifiers (attention outputs forecast, order 1, 3 full steps)",
            _taylorseer,
        ),
        CacheFamily(
            "taylorseer-blocks", *PEER_SWEEPS["taylorseer-blocks"],
            "TaylorSeer, cache_identifiers = every whole block (SD3: but the last, which returns no text)",
            lambda value, context: _taylorseer(value, context, blocks=True),
        ),
        CacheFamily(
            "taylorseer-lite", *PEER_SWEEPS["taylorseer-lite"],
            "TaylorSeer lite mode: every block skipped, the output projection forecast (order 1)",
            lambda value, context: _taylorseer(value, context, lite=True),
        ),
        CacheFamily(
            "magcache", *PEER_SWEEPS["magcache"],
            "MagCache (max 3 skipped steps in a row, first 20% full), ratios calibrated on this model",
            _magcache,
        ),
        CacheFamily(
            "fastercache", *PEER_SWEEPS["fastercache"],
            "FasterCache: attention reused every interval, the unconditional batch skipped as often",
            _fastercache,
        ),
        CacheFamily(
            "pab", *PEER_SWEEPS["pab"],
            "Pyramid Attention Broadcast: attention outputs reused for interval - 1 calls, at every timestep",
            _pab,
        ),
    )
}  # fmt: skip
"""diffusers' caches by name (``--peers``)."""


def apply_cache(transformer: nn.Module, config: Any) -> Callable[[], None]:
    """Apply a diffusers cache config (``enable_cache`` on a ``CacheMixin``, else the ``apply_*`` hook
    function of its type) and return the function that removes it."""
    from diffusers import hooks
    from diffusers.hooks import HookRegistry
    from diffusers.models.cache_utils import CacheMixin

    if isinstance(transformer, CacheMixin):
        transformer.enable_cache(config)
        return transformer.disable_cache
    appliers = {
        "FirstBlockCacheConfig": hooks.apply_first_block_cache,
        "TaylorSeerCacheConfig": hooks.apply_taylorseer_cache,
        "MagCacheConfig": hooks.apply_mag_cache,
        "FasterCacheConfig": hooks.apply_faster_cache,
        "PyramidAttentionBroadcastConfig": hooks.apply_pyramid_attention_broadcast,
    }
    appliers[type(config).__name__](transformer, config)

    def remove() -> None:
        registry = HookRegistry.check_if_exists_or_initialize(transformer)
        for child in (registry, *registry._get_child_registries()):
            for name in list(child._hook_order):
                child.remove_hook(name, recurse=False)
        registry.invalidate_child_registries_cache()

    return remove


@contextmanager
def cache_context(transformer: nn.Module) -> Iterator[None]:
    """The cache context diffusers' stateful hooks read (pipelines that do not set one, like the shapes
    pipelines, get one named ``cond`` for the whole call: one pass per step), reset before and after."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.invalidate_child_registries_cache()
    registry.reset_stateful_hooks(recurse=True)
    _set_cache_context(transformer, CacheContext("cond"))
    try:
        yield
    finally:
        _set_cache_context(transformer, None)
        registry.reset_stateful_hooks(recurse=True)


@contextmanager
def timestep_recorder(transformer: nn.Module) -> Iterator[Callable[[], float]]:
    """A callback returning the timestep of the transformer's current call (PAB and FasterCache ask)."""
    current = [1000.0]

    def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        timestep = kwargs.get("timestep")
        if timestep is None and len(args) > 2:
            timestep = args[2]
        if timestep is not None:
            current[0] = float(torch.as_tensor(timestep).flatten()[0])

    handle = transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield lambda: current[0]
    finally:
        handle.remove()


def calibrate_magcache(
    pipe: Any, prompt: str, steps: int, seed: int, guidance_scale: float | None
) -> list[float]:
    """MagCache's magnitude ratios for this model: one generation at ``steps`` with ``calibrate=True``,
    the ratios read from diffusers' tail-block hook as it computes them (it prints and clears them)."""
    from diffusers.hooks import HookRegistry, MagCacheConfig
    from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK

    transformer = pipe.transformer
    remove = apply_cache(transformer, MagCacheConfig(calibrate=True, num_inference_steps=steps))
    ratios: list[float] = []
    try:
        adapter = adapter_for(transformer)
        tail = transformer.get_submodule(adapter.blocks[-1])[-1]
        hook = HookRegistry.check_if_exists_or_initialize(tail).get_hook(_MAG_CACHE_BLOCK_HOOK)
        original = hook._perform_calibration_step

        def record(state: Any, residual: torch.Tensor) -> None:
            original(state, residual)
            ratios.append(state.calibration_ratios[-1])

        hook._perform_calibration_step = record
        kwargs = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
        with cache_context(transformer), _quiet_stdout():
            pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), **kwargs)
    finally:
        remove()
    return ratios


@contextmanager
def _quiet_stdout() -> Iterator[None]:
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        yield


# --- what a row generates ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerRun:
    """How a row beyond the plain curve and CAT generates: a solver (None: the pipeline's own), optionally
    with one of diffusers' caches at one knob value. Called like :func:`~catprune.runtime.run_generation`
    (it is a :class:`~catprune.evaluation.Variant`'s ``generate``)."""

    solver: str | None = None
    cache: str | None = None
    value: float | None = None
    mag_ratios: tuple[float, ...] | None = field(default=None, compare=False)

    def __call__(
        self,
        pipe: Any,
        prompt: str,
        steps: int,
        seed: int,
        config: CATPruningConfig | None = None,
        guidance_scale: float | None = None,
    ) -> Generation:
        with solver_swapped(pipe, self.solver):
            if self.cache is None:  # a solver's curve or CAT on it: the engine counts every call
                return run_generation(pipe, prompt, steps, seed, config=config, guidance_scale=guidance_scale)
            return self._cached(pipe, prompt, steps, seed, guidance_scale)

    def _cached(
        self, pipe: Any, prompt: str, steps: int, seed: int, guidance_scale: float | None
    ) -> Generation:
        transformer = pipe.transformer
        family = CACHES[self.cache]  # type: ignore[index]
        kwargs = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
        with timestep_recorder(transformer) as timestep:
            context = CacheRunContext(steps, timestep, self.mag_ratios, forecastable_blocks(transformer))
            remove = apply_cache(transformer, family.build(float(self.value), context))  # type: ignore[arg-type]
            try:
                with cache_context(transformer), MacMeter(transformer) as meter:

                    def call() -> Any:
                        generator = torch.Generator().manual_seed(seed)
                        return pipe(prompt, num_inference_steps=steps, generator=generator, **kwargs)

                    output, seconds = timed(call, transformer.device)
            finally:
                remove()
        images = np.stack([np.asarray(image.convert("RGB")) for image in output.images])
        return Generation(images, seconds, GenerationStats(steps=steps, macs=meter.macs))


# --- rows: names, points -------------------------------------------------------------------------------


def knob_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def solver_curve_name(solver: str, steps: int) -> str:
    return f"solver={solver},steps={steps}"


def cache_name(cache: str, value: float, steps: int) -> str:
    return f"{cache},{CACHES[cache].knob}={knob_text(value)},steps={steps}"


@dataclass(frozen=True)
class PeerPoint:
    """A row this module adds: its variant, kind (:data:`SOLVER_KIND`, :data:`CAT_SOLVER_KIND`,
    :data:`CACHE_KIND`), the grid values of a CAT row, and its method family."""

    variant: Variant
    kind: str
    values: tuple[tuple[str, Any], ...] = ()
    family: str = ""


def solver_points(
    solvers: Sequence[str], native: str | None, steps: Sequence[int], reference_steps: int
) -> list[PeerPoint]:
    """The fewer-steps curve of each solver other than the pipeline's own (whose curve is the plain
    ``steps=N`` rows), at the step counts whose model calls do not exceed the reference's (Heun: 2N - 1
    calls for N steps)."""
    return [
        PeerPoint(
            Variant(solver_curve_name(solver, count), count, CATPruningConfig.unpruned(), PeerRun(solver)),
            SOLVER_KIND,
            family=f"{solver} steps",
        )
        for solver in dict.fromkeys(solvers)
        if solver != native
        for count in dict.fromkeys(steps)
        if CALLS_PER_STEP.get(solver, 1) * count - (CALLS_PER_STEP.get(solver, 1) - 1) <= reference_steps
    ]


def cat_solver_point(
    solver: str, steps: int, values: tuple[tuple[str, Any], ...], name: str, config: CATPruningConfig
) -> PeerPoint:
    """CAT with ``config`` on ``solver`` (the name is the frontier's, with ``solver=NAME`` in it)."""
    return PeerPoint(
        Variant(name, steps, config, PeerRun(solver)), CAT_SOLVER_KIND, values, f"cat on {solver}"
    )


def cache_points(caches: Sequence[str], steps: int, mag_ratios: Sequence[float] | None) -> list[PeerPoint]:
    """Each cache's sweep at ``steps`` (the reference steps) on the pipeline's own solver."""
    ratios = tuple(mag_ratios) if mag_ratios is not None else None
    return [
        PeerPoint(
            Variant(
                cache_name(cache, value, steps),
                steps,
                CATPruningConfig.unpruned(),
                PeerRun(None, cache, value, ratios if cache == "magcache" else None),
            ),
            CACHE_KIND,
            family=cache,
        )
        for cache in dict.fromkeys(caches)
        for value in CACHES[cache].values
    ]


_CACHE_NAME = re.compile(r"^(?P<cache>[a-z-]+),(?P<knob>[a-z_]+)=(?P<value>[0-9.e+-]+),steps=(?P<steps>\d+)$")


def point_from_name(name: str, mag_ratios: Sequence[float] | None = None) -> PeerPoint | None:
    """A recorded solver-curve or cache row rebuilt from its name (None: not one of this module's; CAT on a
    solver is rebuilt by the frontier, which parses grid values)."""
    if name.startswith("solver="):
        parts = dict(part.split("=", 1) for part in name.split(","))
        solver, steps = parts["solver"], int(parts["steps"])
        return PeerPoint(Variant(name, steps, CATPruningConfig.unpruned(), PeerRun(solver)), SOLVER_KIND,
                         family=f"{solver} steps")  # fmt: skip
    match = _CACHE_NAME.match(name)
    if match and match["cache"] in CACHES:
        cache, value, steps = match["cache"], float(match["value"]), int(match["steps"])
        ratios = tuple(mag_ratios) if mag_ratios is not None and cache == "magcache" else None
        run = PeerRun(None, cache, value, ratios)
        return PeerPoint(Variant(name, steps, CATPruningConfig.unpruned(), run), CACHE_KIND, family=cache)
    return None


# --- refusals ------------------------------------------------------------------------------------------


def error_text(error: BaseException) -> str:
    """An exception as one line: its type and first line."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".strip().rstrip(":")


def probe(
    points: Sequence[PeerPoint], run: Callable[[Variant, int], Any], errors_path: Path
) -> tuple[list[PeerPoint], dict[str, str]]:
    """Run each cache family's first setting on prompt 0 (``run(variant, 0)``, which writes the item, so
    nothing is computed twice); a family that raises is left out of the run and reported: (the points to
    run, {family: error}). Errors are kept in ``errors_path`` so that a resumed run reports them without
    retrying."""
    known: dict[str, str] = json.loads(errors_path.read_text()) if errors_path.is_file() else {}
    tried: set[str] = set()
    for point in points:
        if point.kind != CACHE_KIND or point.family in known or point.family in tried:
            continue
        tried.add(point.family)
        try:
            run(point.variant, 0)
        except Exception as error:  # diffusers refuses or fails: the table says so
            known[point.family] = error_text(error)
    errors_path.parent.mkdir(parents=True, exist_ok=True)
    errors_path.write_text(json.dumps(known, indent=1) + "\n")
    return [point for point in points if point.family not in known], known


def error_rows(errors: Mapping[str, str]) -> list[dict[str, Any]]:
    """One row per refused family, as the table and CSV write it."""
    return [
        {
            "method": name,
            "family": name,
            "kind": ERROR_KIND,
            "error": error,
            "description": CACHES[name].description,
        }
        for name, error in errors.items()
        if name in CACHES
    ]


# --- quality beside PSNR -------------------------------------------------------------------------------


def laplacian_energy(image: np.ndarray) -> float:
    """Mean squared response of the 4-neighbour Laplacian over the grey image (high-frequency energy)."""
    grey = np.asarray(image, np.float64).mean(axis=-1)
    lap = -4 * grey[1:-1, 1:-1] + grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:]
    return float(np.mean(lap**2))


def sharpness(image: np.ndarray, reference: np.ndarray) -> float:
    """High-frequency energy of ``image`` relative to ``reference``'s, in percent (100: as sharp)."""
    base = laplacian_energy(reference)
    return 100.0 * laplacian_energy(image) / base if base > 0 else math.nan


def row_sharpness(folder: Any, name: str, indices: Sequence[int]) -> float | None:
    """Mean :func:`sharpness` of a row's images against the reference's (read from the run folder)."""
    values = [
        sharpness(folder.read_image(name, index), folder.read_image(REFERENCE, index))
        for index in indices
        if folder.done(name, index) and folder.done(REFERENCE, index)
    ]
    finite = [value for value in values if math.isfinite(value)]
    return float(np.mean(finite)) if finite else None


# --- the answer: best curve, families, plot ------------------------------------------------------------


def envelope(curves: Mapping[str, Sequence[tuple[float, float]]]) -> list[tuple[float, float]]:
    """The best fewer-steps curve: at each MACs the highest of the curves (each linear between its points),
    sampled at all their points."""
    xs = sorted({x for curve in curves.values() for x, _ in curve})
    out = []
    for x in xs:
        best = None
        for curve in curves.values():
            points = sorted((px, py) for px, py in curve if math.isfinite(py))
            if points and points[0][0] <= x <= points[-1][0]:
                y = float(np.interp(x, [p[0] for p in points], [p[1] for p in points]))
                best = y if best is None else max(best, y)
        if best is not None:
            out.append((x, best))
    return out


def best_at(
    rows: Sequence[dict[str, Any]], target: float, tolerance: float = 0.06
) -> dict[str, dict[str, Any]]:
    """Per method family, the row of highest PSNR within ``tolerance`` of ``target`` MACs (x reference)."""
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        ratio, family = row.get("macs_ratio"), row.get("family")
        if (
            ratio is None
            or family is None
            or abs(ratio - target) > tolerance
            or not math.isfinite(row["psnr"])
        ):
            continue
        if family not in best or row["psnr"] > best[family]["psnr"]:
            best[family] = row
    return best


def plot_methods(rows: Sequence[dict[str, Any]], errors: Mapping[str, str], path: Path, title: str) -> None:
    """PSNR against MACs, one line (or set of points) per method family, the Pareto frontier over all of
    them as a thick line; refused families listed in the legend's title."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 6.5), layout="constrained")
    axes = figure.subplots()
    finite = [r for r in rows if r.get("family") and r["kind"] != REFERENCE and math.isfinite(r["psnr"])]
    families = list(dict.fromkeys(r["family"] for r in finite))
    markers = "osD^v<>pPX*h"
    for number, family in enumerate(families):
        mine = sorted((r["macs_ratio"], r["psnr"]) for r in finite if r["family"] == family)
        style = "-" if family.endswith("steps") else ("--" if not family.startswith("cat") else "")
        axes.plot([m[0] for m in mine], [m[1] for m in mine], style, marker=markers[number % len(markers)],
                  markersize=5, linewidth=1.2, label=family)  # fmt: skip
    front = pareto([(r["macs_ratio"], r["psnr"]) for r in finite])
    best = sorted((r["macs_ratio"], r["psnr"]) for r, on in zip(finite, front, strict=True) if on)
    axes.plot([b[0] for b in best], [b[1] for b in best], "-", color="tab:green", linewidth=6, alpha=0.25,
              label="Pareto frontier")  # fmt: skip
    refused = "; ".join(f"{name}: refused" for name in errors)
    axes.set(xlabel="MACs per image (x the reference's)", ylabel="PSNR against the reference (dB)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right", title=refused or None, title_fontsize=7)
    figure.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, format="png")


def pareto(points: Sequence[tuple[float, float]]) -> list[bool]:
    """(cost, quality) points on the Pareto frontier."""
    return [
        not any(c <= cost and q >= quality and (c < cost or q > quality) for c, q in points)
        for cost, quality in points
    ]


def magcache_ratios(context: Any, settings: Any, path: Path) -> list[float]:
    """The model's MagCache ratios, calibrated once per run folder (kept in ``path``): one generation of
    the first prompt at the reference steps on the pipeline's own solver (:func:`calibrate_magcache`)."""
    if path.is_file():
        return json.loads(path.read_text())["ratios"]
    ratios = calibrate_magcache(
        context.pipe, context.prompts[0], settings.reference_steps, settings.seed, settings.guidance_scale
    )
    body = {"prompt": context.prompts[0], "steps": settings.reference_steps, "ratios": ratios}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=1) + "\n")
    return ratios


def add_quality(
    rows: list[dict[str, Any]], points: Sequence[Any], native: str | None, folder: Any, indices: Sequence[int]
) -> None:
    """Add to the frontier's rows: ``family`` (the method column), ``sharpness`` (:func:`row_sharpness`)
    and ``db_over_curve`` (PSNR above the best fewer-steps curve of any solver at equal MACs)."""
    own = native or "own solver"
    families = {}
    for point in points:
        if point.family:
            families[point.variant.name] = point.family
        elif point.kind == "fewer-steps":
            families[point.variant.name] = f"{own} steps"
        elif point.kind == "cat":
            families[point.variant.name] = f"cat on {own}"
    curves: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        row["family"] = families.get(row["method"])
        if row["kind"] in ("fewer-steps", SOLVER_KIND):
            curves.setdefault(row["family"], []).append((row["macs"], row["psnr"]))
        row["sharpness"] = None if row["kind"] == REFERENCE else row_sharpness(folder, row["method"], indices)
    best = envelope(curves)
    xs, ys = [b[0] for b in best], [b[1] for b in best]
    for row in rows:
        inside = best and xs[0] <= row["macs"] <= xs[-1] and math.isfinite(row["psnr"])
        row["db_over_curve"] = (
            row["psnr"] - float(np.interp(row["macs"], xs, ys))
            if inside and row["kind"] != REFERENCE
            else None
        )


def refusal_notes(errors: Mapping[str, str]) -> list[str]:
    """One note per refused or failed cache: no row of it is in the table."""
    return [
        f"**{name}** ({CACHES[name].description}) refused or failed on this model, no row: `{error}`"
        for name, error in errors.items()
        if name in CACHES
    ]


TARGETS = (0.5, 0.35)
"""The MACs (x the reference's) at which :func:`best_tables` compares method families."""


def best_tables(rows: Sequence[dict[str, Any]], targets: Sequence[float] = TARGETS) -> list[str]:
    """Markdown lines: per target MACs, the best setting of each method family within +-0.06x of it."""
    lines = []
    for target in targets:
        best = best_at(rows, target)
        if not best:
            continue
        lines += [
            f"Best of each method at about {target:.2f}x MACs (within 0.06x):",
            "",
            "| Method | Setting | MACs (x ref.) | PSNR (dB) | SSIM | Sharpness (%) | Alignment (%) | s/image "
            "| dB over the best curve |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for family, row in sorted(best.items(), key=lambda item: -item[1]["psnr"]):
            lines.append(
                f"| {family} | `{row['method']}` | {row['macs_ratio']:.3f} | {row['psnr']:.2f} | "
                f"{_cell(row.get('ssim'), '.4f')} | {_cell(row.get('sharpness'), '.1f')} | "
                f"{_cell(row.get('alignment_full'), '.1f')} | {_cell(row.get('seconds'), '.3f')} | "
                f"{_cell(row.get('db_over_curve'), '+.2f')} |"
            )
        lines.append("")
    return lines


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
