"""What every tool and benchmark does the same way: load a pipeline, pick a device and dtype, run one
generation (pruned or not) and compare or report its results.

Tools (``catprune.tools``), the evaluation, the figures and the benchmark scripts use these functions
instead of their own copies, so that "a generation" means one thing everywhere: the same seeding (a CPU
generator, so images do not depend on the device), the same timing (device work included) and the same
statistics.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import CATPruningConfig
from .engine import GenerationStats, StepRecord
from .errors import UserError
from .formatting import format_count as format_count
from .integration import apply_cat_pruning, remove_cat_pruning
from .measure import timed
from .names import DTYPE_NAMES, SHIPPED_MODELS, check_model_name, hub_unreachable

SMALL_MODEL_PARAMETERS = 100_000_000
"""Transformers below this size run on one CPU thread by default (:func:`use_cpu_threads`)."""

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}


def resolve_device(name: str | None = None) -> torch.device:
    """``name``, or CUDA when available, else the CPU; a CUDA request without CUDA is a :class:`UserError`."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name}: no CUDA device is available")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """A dtype by name; ``None`` or ``"auto"``: float16 on CUDA, float32 elsewhere."""
    if name in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; known: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def use_cpu_threads(model: torch.nn.Module, threads: int | None = None) -> int:
    """Set torch's CPU threads for work with ``model`` and return how many it uses: ``threads`` when
    given, else one for a model on the CPU with fewer than :data:`SMALL_MODEL_PARAMETERS` parameters
    (torch's default otherwise).

    A small model's kernels are too short to share among threads: a second thread saves little on an
    idle machine, and on a busy one every kernel waits for a descheduled worker. A pruned step has as
    many kernels as a full one on a third of the tokens, so that wait alone can make it slower than full.
    """
    if threads is not None:
        if threads < 1:
            raise UserError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    elif next(model.parameters()).device.type == "cpu" and _parameters(model) < SMALL_MODEL_PARAMETERS:
        torch.set_num_threads(1)
    return torch.get_num_threads()


def _parameters(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def _root_cause(error: BaseException) -> str:
    """The first line of the innermost cause of ``error`` (hub errors wrap the one that says why)."""
    while True:
        inner = error.__cause__ or error.__context__
        if inner is None or not str(inner).strip():
            break
        error = inner
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_pipeline(model: str, device: str | None = None, dtype: str | None = "auto") -> Any:
    """A shipped shapes model by name, a saved shapes pipeline folder, or any diffusers pipeline (local
    folder or hub id), on ``device`` in ``dtype``, without progress bars. By default a shapes model runs on
    the CPU in float32 (it is small: a GPU gains little), any other on CUDA in float16 when available. A
    model that cannot be loaded is a :class:`UserError` of one line that says why."""
    from diffusers.utils import logging

    from .shapes.pipelines import is_shapes_model, load_shapes_pipeline

    check_model_name(model)
    logging.disable_progress_bar()
    shapes = is_shapes_model(model)
    target = resolve_device("cpu" if shapes and device is None else device)
    torch_dtype = resolve_dtype(dtype, target)
    if shapes:
        pipe = load_shapes_pipeline(model)
    else:
        from diffusers import DiffusionPipeline

        logging.set_verbosity_error()  # the outcome is reported in one line; hub retries are noise here
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch_dtype: renamed in newer diffusers only
                pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=torch_dtype)
        except Exception as error:  # hub, network and format errors all mean the same thing to the user
            raise UserError(load_error_message(model, error)) from None
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(target)
    return pipe if pipe.dtype == torch_dtype else pipe.to(dtype=torch_dtype)


def load_error_message(model: str, error: BaseException) -> str:
    """One line on why ``model`` (a folder or hub id) could not be loaded, and what to do."""
    if Path(model).expanduser().exists():
        return f"cannot load the pipeline folder {model!r}: {_root_cause(error)}"
    unreachable = hub_unreachable(error)
    if unreachable is not None:
        return (
            f"cannot load model {model!r}: the Hugging Face hub could not be reached ({unreachable}) and the "
            "model is not in the local cache; connect to the network (or set HF_ENDPOINT), or give a local "
            f"pipeline folder or a shipped model ({', '.join(SHIPPED_MODELS)})"
        )
    return (
        f"cannot load model {model!r} from the hub (it may not exist, be gated (log in: hf auth login) or "
        f"not be a diffusers pipeline): {_root_cause(error)}"
    )


@dataclass
class Generation:
    """One pipeline call: its images, wall time and what pruning did."""

    images: np.ndarray
    """(P, H, W, 3) uint8, one per prompt."""
    seconds: float
    """Wall time of the pipeline call, the device's queued work included."""
    stats: GenerationStats | None
    """None when the call ran without pruning applied (``config=None``)."""


def run_generation(
    pipe: Any,
    prompts: str | Sequence[str],
    steps: int,
    seed: int,
    config: CATPruningConfig | None = None,
    guidance_scale: float | None = None,
    observers: Sequence[Callable[[StepRecord], None]] = (),
    **pipeline_kwargs: Any,
) -> Generation:
    """Generate one image per prompt with ``pipe``: unpatched when ``config`` is None, else with pruning
    applied for this call only (``CATPruningConfig.unpruned()`` counts MACs without pruning).

    The initial noise comes from a CPU generator seeded with ``seed``, so it is the same on every device
    and in every process. Besides the arguments every diffusers text-to-image pipeline takes, only
    ``pipeline_kwargs`` (``height``, ``negative_prompt``...) are passed."""
    kwargs: dict[str, Any] = dict(pipeline_kwargs)
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    prompt = prompts if isinstance(prompts, str) else list(prompts)
    device = pipe.transformer.device

    def call() -> Any:
        generator = torch.Generator().manual_seed(seed)
        return pipe(prompt, num_inference_steps=steps, generator=generator, **kwargs)

    if config is None:
        output, seconds = timed(call, device)
        stats = None
    else:
        state = apply_cat_pruning(pipe, config)
        removers = [state.add_observer(observer) for observer in observers]
        try:
            output, seconds = timed(call, device)
        finally:
            for remove in removers:
                remove()
            remove_cat_pruning(pipe)
        stats = state.stats
    images = np.stack([np.asarray(image.convert("RGB")) for image in output.images])
    return Generation(images, seconds, stats)


WARM_UP_STEPS = 2
"""Steps of an unpruned warm-up generation (:func:`warm_up`)."""


def warm_up_steps(steps: int, config: CATPruningConfig | None = None) -> int:
    """The steps of a warm-up for a generation of ``steps`` under ``config``: enough to run every kind of
    step it runs once (full steps, then under pruning the fill step and a pruned step), and no more."""
    if config is None or not config.prune or config.start_step >= steps:
        return min(steps, WARM_UP_STEPS)
    return min(steps, config.start_step + 2)


def warm_up(
    pipe: Any,
    prompt: str,
    steps: int,
    seed: int = 0,
    config: CATPruningConfig | None = None,
    guidance_scale: float | None = None,
    **pipeline_kwargs: Any,
) -> None:
    """A short untimed generation (:func:`warm_up_steps`) before timed ones of ``steps`` under ``config``,
    so that no timed generation pays for one-off work: the first call of each kernel and shape, memory
    allocation, thread start-up. Every command that times generations calls it once per kind of generation
    (``generate --compare``, each method of ``eval``, each setting of ``frontier``)."""
    run_generation(
        pipe, prompt, warm_up_steps(steps, config), seed, config, guidance_scale, **pipeline_kwargs
    )


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB between two 8-bit images (inf when identical)."""
    error = np.mean((np.asarray(image, np.float64) - np.asarray(reference, np.float64)) ** 2)
    return math.inf if error == 0 else 10 * math.log10(255.0**2 / error)
