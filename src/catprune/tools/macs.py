"""``catprune macs``: count the MACs of full and CAT generations by running the real forward on ``meta``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from ..config import CATPruningConfig
from ..errors import UserError
from ..formatting import format_count, plural
from ..names import ARCHITECTURE_NAMES

if TYPE_CHECKING:  # imported where used: ``catprune macs --help`` imports no torch
    from ..measure import MacsReport, SelectionCost, StepMacs
from .arguments import add_command, add_pruning_arguments, add_size_arguments, check_steps, guidance_label


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "macs")
    parser.add_argument(
        "--model", required=True, help=f"one of {', '.join(ARCHITECTURE_NAMES)}, or a local folder"
    )
    add_pruning_arguments(parser, steps=None)
    add_size_arguments(parser)
    parser.add_argument("--batch", type=int, default=1, help="prompts per call (default: 1)")
    parser.add_argument(
        "--no-cfg", action="store_true", help="no classifier-free guidance (one row per prompt)"
    )
    parser.add_argument(
        "--kept-multiple",
        type=int,
        default=1,
        help="round K up to a multiple of this, e.g. 64 for GPU kernels (default: 1, no rounding)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object (fields: docs/measurement.md)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..architectures import resolve_architecture
    from ..measure import count_macs, count_selection

    check_steps(args.steps)
    try:
        architecture = resolve_architecture(args.model).with_video(args.frames, args.width)
    except ValueError as error:
        raise UserError(str(error)) from None
    args.resolution = args.resolution or architecture.adapter.default_resolution
    report = count_macs(
        architecture,
        resolution=args.resolution,
        steps=args.steps or architecture.default_steps,
        keep_ratio=args.keep_ratio,
        start_step=args.start_step,
        batch=args.batch,
        cfg=not args.no_cfg,
        kept_multiple=args.kept_multiple,
    )
    config = CATPruningConfig(
        keep_ratio=args.keep_ratio, start_step=args.start_step, kept_multiple=args.kept_multiple
    )
    selection = count_selection(architecture, args.resolution, args.batch, config)
    summary = report_fields(report, selection)
    print(json.dumps(summary, indent=2) if args.json else "\n".join(report_lines(report, summary)))
    warning = never_pruned_warning(report)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def never_pruned_warning(report: MacsReport) -> str:
    """Why the ratio is 1 when no step is pruned (the generation ends before ``start_step``), and the fix;
    empty when some step is pruned."""
    if report.start_step < report.steps:
        return ""
    name = report.architecture.name
    return (
        f"no step is pruned: {name}'s {plural(report.steps, 'step')} end before --start-step "
        f"{report.start_step}, so CAT / full is 1.000; give --start-step 2 to {max(2, report.steps - 1)} "
        "or more --steps"
    )


def _ratio(full: int, cat: int) -> dict[str, Any]:
    return {"full_macs": full, "cat_macs": cat, "ratio": cat / full}


def report_fields(report: MacsReport, selection: SelectionCost) -> dict[str, Any]:
    """The ``--json`` object (documented in docs/measurement.md)."""
    full, fill, pruned = report.step_counts
    selection_ops = selection.per_generation(pruned)
    paper = report.paper()
    return {
        "model": report.architecture.name,
        "class": report.architecture.model_class.__name__,
        "parameters": report.parameters,
        "resolution": report.resolution,
        **dict(
            zip(("frames", "height", "width"), report.architecture.pixel_size(report.resolution), strict=True)
        ),
        "cfg": report.cfg,
        "rows": report.rows,
        "image_tokens": report.image_tokens,
        "kept_tokens": report.kept_tokens,
        "text_tokens": report.text_tokens,
        "steps": report.steps,
        "start_step": report.start_step,
        "keep_ratio": report.keep_ratio,
        "steps_by_kind": {"full": full, "fill": fill, "pruned": pruned},
        "expert_switch_step": report.switch_step,
        "full_step_macs": report.full_step.macs,
        "fill_step_macs": report.fill_step.macs,
        "pruned_step_macs": report.pruned_step.macs,
        "attention_macs": {
            "full_step": report.full_step.attention_macs,
            "fill_step": report.fill_step.attention_macs,
            "pruned_step": report.pruned_step.attention_macs,
        },
        "analytic_full_step_macs": report.analytic_full_step,
        "analytic_pruned_step_macs": report.analytic_pruned_step,
        **_ratio(report.full_macs, report.cat_macs),
        "without_attention": _ratio(*report.without_attention),
        "selection": {
            "noise_shape": list(selection.noise_shape),
            "clustering_step_ops": selection.clustering_step,
            "later_step_ops": selection.later_step,
            "per_generation_ops": selection_ops,
            "share_of_cat_macs": selection_ops / report.cat_macs,
            "flop_counter_macs": selection.matmul_macs,
        },
        "cache_bytes": report.cache_bytes(),
        "cache_passes": report.passes,
        "paper": _ratio(round(paper[0]), round(paper[1])) if paper else None,
        "by_start_step": [
            {"start_step": start_step, "pruned_steps": steps, "ratio": ratio}
            for start_step, steps, ratio in report.by_start_step()
        ],
        "few_steps": few_steps_advice(report),
    }


def few_steps_advice(report: MacsReport) -> str | None:
    """What a user of a schedule that leaves no step to prune at this start_step should know (None when
    some step is pruned)."""
    if report.step_counts[2]:
        return None
    if report.steps < 3:
        return f"no step of a {report.steps}-step generation can be pruned (t0 >= 2 needs 3 steps)"
    best = min(report.by_start_step(), key=lambda row: row[2])
    return (
        f"{report.steps} steps never reach start_step {report.start_step}: the generation runs unpruned "
        f"(ratio 1.0). start_step {best[0]} prunes {best[1]} of them (ratio {best[2]:.3f}); few-step "
        "(distilled) models change the image most in their first steps, so check the quality at the "
        "start_step you choose (docs/measurement.md, 'Few-step models')"
    )


def _step_line(name: str, step: StepMacs, analytic: int | None = None) -> str:
    line = f"  {name:<20}{format_count(step.macs):>10}{format_count(step.attention_macs):>12}"
    if analytic is None:
        return line
    return f"{line}    {format_count(analytic)}  ({(analytic - step.macs) / step.macs:+.2%})"


def report_lines(report: MacsReport, fields: dict[str, Any]) -> list[str]:
    architecture, kinds, paper = report.architecture, fields["steps_by_kind"], fields["paper"]
    cfg = guidance_label(report.cfg, architecture.cfg_batch, architecture.cfg_calls)
    paper_ratio = f"   (paper {paper['ratio']:.3f})" if paper else ""
    bare = fields["without_attention"]
    bare_line = (
        "  without attention products (how the paper counts): "
        f"full {format_count(bare['full_macs'], digits=5)}, CAT {format_count(bare['cat_macs'], digits=5)}, "
        f"ratio {bare['ratio']:.3f}"
    )
    if paper:
        paper_full, paper_cat = (format_count(paper[key], digits=5) for key in ("full_macs", "cat_macs"))
        bare_line += f"   (paper: {paper_full}, {paper_cat})"
    selection = fields["selection"]
    return [
        f"{architecture.name}: {fields['class']}, {report.parameters / 1e9:.3f}B parameters, "
        f"{report.architecture.size_label(report.resolution)} ({report.image_tokens} image tokens, "
        f"{report.kept_tokens} kept), {report.text_tokens} text tokens, "
        f"{plural(report.rows, 'row')} per call ({cfg})",
        f"{plural(report.steps, 'step')}: {kinds['full']} full + {kinds['fill']} fill + "
        f"{kinds['pruned']} pruned (t0 = {report.start_step}, keep ratio {report.keep_ratio})"
        + switch_note(report),
        "MACs counted by FlopCounterMode on the meta device, real forward with pruning applied "
        "(MACs = FLOPs / 2)",
        "",
        f"  {'':<20}{'counted':>10}{'attention':>12}    analytic (adapter.step_macs)",
        _step_line("full step", report.full_step, report.analytic_full_step),
        _step_line("fill step", report.fill_step),
        _step_line("pruned step", report.pruned_step, report.analytic_pruned_step),
        f"  {'generation, full':<20}{format_count(report.full_macs):>10}",
        f"  {'generation, CAT':<20}{format_count(report.cat_macs):>10}",
        f"  {'ratio CAT / full':<20}{report.ratio:>10.3f}{paper_ratio}",
        bare_line,
        cache_line(report),
        "",
        f"selection overhead, counted on CPU tensors {tuple(selection['noise_shape'])} in element operations "
        f"(FlopCounterMode: {format_count(selection['flop_counter_macs'])} MACs, it counts matmuls only):",
        f"  clustering step {format_count(selection['clustering_step_ops'])}, later step "
        f"{format_count(selection['later_step_ops'])}; per generation "
        f"{format_count(selection['per_generation_ops'])} = {selection['share_of_cat_macs'] * 100:.2g}% "
        "of the CAT MACs",
        *few_steps_lines(fields),
    ]


def switch_note(report: MacsReport) -> str:
    """Where a second expert takes over, and whether that costs a fill step."""
    if report.switch_step is None:
        return ""
    fills = report.start_step <= report.switch_step
    return f"; the second expert takes over at step {report.switch_step}" + (
        " (a fill step of its caches)" if fills else ""
    )


def cache_line(report: MacsReport) -> str:
    """The caches a generation keeps, by storage dtype."""
    sizes = ", ".join(f"{format_count(size, 'B')} {dtype}" for dtype, size in report.cache_bytes().items())
    passes = plural(report.passes, "pass", "passes")
    return f"  caches (K/V of every layer and the output tokens, {passes}): {sizes}"


def few_steps_lines(fields: dict[str, Any]) -> list[str]:
    """A schedule that leaves no step to prune: the advice and the ratio at each start_step that prunes."""
    if fields["few_steps"] is None:
        return []
    table = [
        f"  start_step {row['start_step']}: {row['pruned_steps']} pruned, ratio {row['ratio']:.3f}"
        for row in fields["by_start_step"]
    ]
    return ["", f"few steps: {fields['few_steps']}", *table]
