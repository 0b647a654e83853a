"""``catprune bench``: wall time of full and CAT denoising loops in one process, against the MAC bound."""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import CATPruningConfig
from ..errors import UserError
from ..formatting import format_count
from ..names import ARCHITECTURE_NAMES, COMPILE_MODES, DTYPE_NAMES
from .arguments import (
    add_command,
    add_context_parallel_argument,
    add_pruning_arguments,
    add_size_arguments,
    check_steps,
    guidance_label,
)

if TYPE_CHECKING:  # imported where used: the command's --help imports no torch
    import torch

    from ..architectures import Architecture
    from ..engine import PruningEngine
    from ..measure import SelectionTimer

TIMED_PART = (
    "denoising loop (transformer + scheduler); text encoding excluded (random prompt embeddings); "
    "the VAE decode timed apart with --decode"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "bench")
    parser.add_argument(
        "--model", required=True, help=f"one of {', '.join(ARCHITECTURE_NAMES)}, or a local folder"
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="random weights (timing only); needed for a named architecture",
    )
    parser.add_argument(
        "--layers", type=int, help="keep only the first N blocks (width kept; random weights)"
    )
    add_size_arguments(parser)
    add_pruning_arguments(parser, steps=None)
    parser.add_argument("--dtype", choices=DTYPE_NAMES, help="default: float16 on cuda, float32 on cpu")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--repeats", type=int, default=3, help="timed generations of each kind (default: 3)")
    parser.add_argument("--batch", type=int, default=1, help="prompts per generation (default: 1)")
    parser.add_argument(
        "--no-cfg", action="store_true", help="no classifier-free guidance (one row per prompt)"
    )
    parser.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        default="none",
        help="compile both models alike with fullgraph=True (torch.compile's inductor): regional, every "
        "block; full, the whole model; compile time goes into the untimed warm-up and is reported apart "
        "(default: none)",
    )
    parser.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="with --compile on cuda: mode='reduce-overhead' (the compiled graphs replayed as CUDA graphs)",
    )
    parser.add_argument(
        "--decode",
        action="store_true",
        help="also decode every generation's latents with the family's VAE (random weights) and report "
        "end-to-end times (denoising + decode) beside the denoising loop's",
    )
    parser.add_argument("--seed", type=int, default=0)
    add_context_parallel_argument(parser)
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object (fields: docs/measurement.md)"
    )
    parser.set_defaults(func=run)


def _spread(seconds: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds), "all": seconds}


def _architecture(args: argparse.Namespace) -> Architecture:
    """The architecture to time, with the arguments checked against it."""
    from ..architectures import resolve_architecture

    if args.repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {args.repeats}")
    architecture = resolve_architecture(args.model)
    if architecture.weights is None and not args.random_weights:
        raise UserError(f"{args.model} is a named architecture without weights: add --random-weights")
    if args.cuda_graphs and args.compile == "none":
        raise UserError("--cuda-graphs needs --compile regional or full (CUDA graphs of compiled graphs)")
    if args.layers is not None and not args.random_weights:
        raise UserError("--layers needs --random-weights (a checkpoint's blocks are not cut)")
    try:
        return architecture.with_layers(args.layers).with_video(args.frames, args.width)
    except ValueError as error:
        raise UserError(str(error)) from None


@dataclass
class Timings:
    """What one bench run measured."""

    seconds: dict[str, list[float]]
    """Wall time of each timed generation, by kind ("full", "cat")."""
    selection_seconds: list[float]
    """Time of the CAT generations' token selection, one entry per timed pair."""
    kv_cache_bytes: int
    peak_memory: dict[str, int]
    """Peak device memory by kind (CUDA only)."""
    warmup_seconds: dict[str, float]
    """The untimed first generation of each kind: compilation, when compiled."""
    decode_seconds: dict[str, list[float]]
    """With ``--decode``: the VAE decode after each timed generation, by kind."""


def _time_pairs(
    generate: Callable[[torch.nn.Module], torch.Tensor],
    decode: Callable[[torch.Tensor], torch.Tensor] | None,
    models: dict[str, torch.nn.Module],
    state: PruningEngine,
    selection: SelectionTimer,
    device: torch.device,
    repeats: int,
    quiet: bool,
) -> Timings:
    """A warm-up pair, then ``repeats`` timed pairs alternating full and CAT (each generation's decode timed
    after it, with ``decode``), then (CUDA) an untimed pair for peak memory."""
    import torch
    from tqdm import tqdm

    from ..measure import timed

    timings = Timings({kind: [] for kind in models}, [], 0, {}, {}, {kind: [] for kind in models})
    with torch.inference_mode():
        for kind, model in models.items():  # warm-up: kernels, allocator, caches, compilation
            latents, timings.warmup_seconds[kind] = timed(lambda model=model: generate(model), device)
            if decode is not None:
                decode(latents)
        for _ in tqdm(range(repeats), desc="full / CAT", unit="pair", disable=quiet):
            for kind, model in models.items():
                latents, seconds = timed(lambda model=model: generate(model), device)
                timings.seconds[kind].append(seconds)
                if decode is not None:
                    timings.decode_seconds[kind].append(
                        timed(lambda latents=latents: decode(latents), device)[1]
                    )
            timings.selection_seconds.append(selection.seconds())
        timings.kv_cache_bytes = sum(processor.cache_bytes() for processor in state.processors)
        if device.type == "cuda":
            # One more untimed pair for peak memory, the CAT caches freed first so that the full run's
            # peak does not include them (a generation frees them only when the next one starts).
            state.release_caches()
            for kind, model in models.items():
                torch.cuda.reset_peak_memory_stats(device)
                generate(model)
                timings.peak_memory[kind] = torch.cuda.max_memory_allocated(device)
    return timings


def run(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from .. import parallelism
    from ..integration import apply_cat_pruning
    from ..measure import SelectionTimer, compile_model, denoise, shared_weight_copy
    from ..runtime import resolve_device, resolve_dtype

    check_steps(args.steps)
    architecture = _architecture(args)
    args.resolution = args.resolution or architecture.adapter.default_resolution
    parallel = args.context_parallel is not None
    if parallel and args.compile != "none":
        raise UserError("--context-parallel runs uncompiled (--compile none): compiling it is untested")
    device = parallelism.start(args.device) if parallel else resolve_device(args.device)
    if args.cuda_graphs and device.type != "cuda":
        raise UserError(f"--cuda-graphs needs a CUDA device, got {device.type}")
    dtype = resolve_dtype(args.dtype, device)
    steps = args.steps or architecture.default_steps
    cfg = not args.no_cfg
    rows = args.batch * (architecture.cfg_batch if cfg else 1)
    paired = rows == 2 * args.batch  # [uncond..., cond...] rows, one selection per prompt
    config = CATPruningConfig(
        keep_ratio=args.keep_ratio, start_step=args.start_step, row_pairing="cfg" if paired else "none"
    )

    if args.random_weights:
        full_model = architecture.build(device, dtype, seed=args.seed)
    else:
        full_model = architecture.load(device, dtype)
    cat_model = shared_weight_copy(full_model)
    if parallel:  # each model its own process group: its hooks and processors get the config
        for model in (full_model, cat_model):
            parallelism.enable(model)
    state = apply_cat_pruning(cat_model, config)
    for model in (full_model, cat_model):
        compile_model(model, architecture, args.compile, args.cuda_graphs)
    selection = SelectionTimer(state, device)
    generator = torch.Generator(device).manual_seed(args.seed)
    latents = torch.randn(
        architecture.latent_shape(args.batch, args.resolution),
        generator=generator,
        device=device,
        dtype=dtype,
    )
    conditioning = architecture.conditioning(full_model, rows, args.resolution, device, dtype, generator)

    def generate(model: torch.nn.Module) -> torch.Tensor:
        if model is cat_model:
            state.begin_generation(paired)
            selection.clear()
        return denoise(model, architecture, latents, conditioning, steps, cfg)

    decode = None
    if args.decode:
        vae = architecture.build_vae(args.resolution, device, dtype, seed=args.seed)

        def decode(latents: torch.Tensor) -> torch.Tensor:
            return architecture.decode(vae, latents, args.resolution)

    models = {"full": full_model, "cat": cat_model}
    quiet = args.json or not parallelism.is_first_process()
    timings = _time_pairs(generate, decode, models, state, selection, device, args.repeats, quiet)
    selection_seconds = statistics.median(timings.selection_seconds)
    stats = state.stats
    full, cat = _spread(timings.seconds["full"]), _spread(timings.seconds["cat"])
    speedup = full["median"] / cat["median"]
    mac_bound = stats.full_macs / stats.macs
    summary = {
        "model": architecture.name,
        "weights": "random" if args.random_weights else str(architecture.weights),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "resolution": args.resolution,
        "size": architecture.size_label(args.resolution),
        "steps": steps,
        "start_step": args.start_step,
        "keep_ratio": args.keep_ratio,
        "batch": args.batch,
        "cfg": cfg,
        "rows": rows,
        "cfg_calls": architecture.cfg_calls if cfg else 1,
        "compile": args.compile,
        "cuda_graphs": args.cuda_graphs,
        "context_parallel": dist.get_world_size() if parallel else 1,
        "warmup_seconds": timings.warmup_seconds,
        "image_tokens": stats.image_tokens,
        "kept_tokens": stats.kept_tokens,
        "text_tokens": stats.text_tokens,
        "pruned_steps": stats.pruned_steps,
        "scheduler": type(architecture.make_scheduler()).__name__,
        "timed": TIMED_PART,
        "repeats": args.repeats,
        "full_seconds": full,
        "cat_seconds": cat,
        "speedup": speedup,
        "full_macs": stats.full_macs,
        "cat_macs": stats.macs,
        "mac_bound": mac_bound,
        "efficiency": speedup / mac_bound,
        "selection_seconds": selection_seconds,
        "selection_share": selection_seconds / cat["median"],
        "kv_cache_bytes": timings.kv_cache_bytes,
        "peak_memory_bytes": timings.peak_memory or None,
        **(_end_to_end(timings) if args.decode else dict.fromkeys(END_TO_END_FIELDS)),
    }
    if parallelism.is_first_process():
        print(json.dumps(summary, indent=2) if args.json else "\n".join(_lines(summary)))
    parallelism.finish()
    return 0


END_TO_END_FIELDS = ("decode_seconds", "end_to_end_seconds", "end_to_end_speedup")
"""The report's fields with ``--decode`` (null without it)."""


def _end_to_end(timings: Timings) -> dict[str, Any]:
    """Decode times and each generation's denoising + decode time, by kind, and the end-to-end speed-up."""
    totals = {
        kind: [loop + decode for loop, decode in zip(loops, timings.decode_seconds[kind], strict=True)]
        for kind, loops in timings.seconds.items()
    }
    return {
        "decode_seconds": _spread(timings.decode_seconds["full"] + timings.decode_seconds["cat"]),
        "end_to_end_seconds": {kind: _spread(seconds) for kind, seconds in totals.items()},
        "end_to_end_speedup": statistics.median(totals["full"]) / statistics.median(totals["cat"]),
    }


def _lines(summary: dict[str, Any]) -> list[str]:
    full, cat = summary["full_seconds"], summary["cat_seconds"]
    guidance = guidance_label(
        summary["cfg"], summary["rows"] // summary["batch"] if summary["cfg"] else 1, summary["cfg_calls"]
    )
    cfg = f"batch {summary['batch']}, {guidance} ({summary['rows']} rows)"
    lines = [
        f"{summary['model']}, {summary['weights']} weights, {summary['device']} {summary['dtype']}, "
        f"{summary['size']} ({summary['image_tokens']} image tokens, "
        f"{summary['kept_tokens']} kept), {summary['text_tokens']} text tokens, {cfg}",
        f"{summary['steps']} steps with {summary['scheduler']}, {summary['pruned_steps']} pruned from step "
        f"{summary['start_step']} (keep ratio {summary['keep_ratio']})",
        f"timed: {summary['timed']}; {summary['repeats']} repeats, alternating full / CAT after a warm-up "
        f"(compile: {summary['compile']}{', CUDA graphs' if summary['cuda_graphs'] else ''}; "
        f"warm-up full {summary['warmup_seconds']['full']:.1f}s, "
        f"CAT {summary['warmup_seconds']['cat']:.1f}s, not in the medians)",
        "",
        f"  {'':<8}{'median':>10}{'min':>10}{'max':>10}",
        *(
            f"  {name:<8}{spread['median']:>9.3f}s{spread['min']:>9.3f}s{spread['max']:>9.3f}s"
            for name, spread in (("full", full), ("CAT", cat))
        ),
        "",
        f"  speedup {summary['speedup']:.2f}x, MAC bound {summary['mac_bound']:.2f}x "
        f"({format_count(summary['full_macs'])} / {format_count(summary['cat_macs'])} MACs), "
        f"efficiency {summary['efficiency']:.0%}",
        f"  selection {summary['selection_seconds'] * 1000:.1f} ms per generation = "
        f"{summary['selection_share']:.1%} of the CAT time",
        f"  K/V cache {format_count(summary['kv_cache_bytes'], 'B')}"
        + (
            f" per process ({summary['context_parallel']} processes)"
            if summary["context_parallel"] > 1
            else ""
        ),
    ]
    if summary["end_to_end_seconds"]:
        total = summary["end_to_end_seconds"]
        lines.append(
            f"  end to end with the VAE decode ({summary['decode_seconds']['median']:.3f}s): full "
            f"{total['full']['median']:.3f}s, CAT {total['cat']['median']:.3f}s, "
            f"speedup {summary['end_to_end_speedup']:.2f}x"
        )
    if summary["peak_memory_bytes"]:
        peak = summary["peak_memory_bytes"]
        lines.append(
            f"  peak memory full {format_count(peak['full'], 'B')}, CAT {format_count(peak['cat'], 'B')}"
        )
    return lines
