"""The harness behind ``catprune frontier``: is pruning better than simply running fewer steps?

For one model and prompt set, the unpruned model runs at the reference step count (``full``: the image
every other one is compared with), at fewer step counts (the fewer-steps curve: what a user gets by
lowering ``num_inference_steps``) and at a grid of pruned settings: step counts x values of any
:class:`~catprune.config.CATPruningConfig` fields, read by the field's type so that new options need no
code here. Each pruned setting's PSNR minus the curve's at the same MACs (linear between the curve's step
counts) says, in dB, whether and by how much it beats fewer steps at equal compute.

Images, records, resuming and data parallelism are :mod:`catprune.evaluation`'s (one variant per setting:
``full``, ``steps=N`` for the curve, ``cat,steps=N,field=value,...`` for the grid), so a rerun skips every
finished (setting, prompt) and more settings can be added to a finished run. The outputs are a table
(``frontier.csv``, ``frontier.md``) and a plot (``frontier.png``) of PSNR against MACs and against time;
``docs/evaluation.md`` says how to read them.
"""

from __future__ import annotations

import csv
import importlib.util
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import peers
from .config import CATPruningConfig
from .errors import UserError
from .evaluation import (
    FIDELITY_COLUMNS,
    IMAGES_COLUMN,
    MACS_COLUMN,
    REFERENCE,
    Column,
    Variant,
    alignment_columns,
    atomic_write,
    markdown_table,
    open_run,
    run_item,
    run_items,
    summarize,
    table_cell,
    timing_columns,
)
from .grid import _TOP_LEVEL_COMMA, FrontierSettings, config_fields, parse_value, value_text
from .grid import parse_grid as parse_grid
from .grid import type_name as type_name

CURVE, PRUNED = "fewer-steps", "cat"
"""The kinds of rows besides the reference: a point of the fewer-steps curve, a pruned setting."""


@dataclass(frozen=True)
class FrontierPoint:
    """One row of the frontier: what it generates, its kind and the grid values it sets."""

    variant: Variant
    kind: str
    """:data:`REFERENCE`, :data:`CURVE`, :data:`PRUNED`, or a kind of :mod:`catprune.peers` (another
    solver's curve, CAT on another solver, a diffusers cache)."""
    values: tuple[tuple[str, Any], ...] = ()
    """(field, value) of each grid field (pruned settings only)."""
    family: str = ""
    """The method family the table's ``method`` column and the plot group rows by (peers' rows)."""


def frontier_points(
    settings: FrontierSettings,
    curve_steps: Sequence[int],
    pruned_steps: Sequence[int],
    grid: Mapping[str, Sequence[Any]],
    cat_solvers: Sequence[str] = (),
) -> tuple[list[FrontierPoint], list[str]]:
    """(the rows: the reference, the curve in ascending steps, then ``pruned_steps`` x the grid, names of the
    pruned settings left out because they start pruning at or after their last step: they would be the
    curve's point of the same steps). Every config is built here, so an invalid value fails before any
    image is generated. ``cat_solvers``: other solvers than the pipeline's own to run the grid on too
    (names ``cat,solver=NAME,steps=N,...``)."""
    unpruned = CATPruningConfig.unpruned()
    generate = peers.PeerRun(settings.reference_solver) if settings.reference_solver else None
    points = [FrontierPoint(Variant(REFERENCE, settings.reference_steps, unpruned, generate), REFERENCE)]
    points += [
        FrontierPoint(Variant(f"steps={steps}", steps, unpruned), CURVE)
        for steps in sorted(set(curve_steps) - {settings.reference_steps})
    ]
    left_out = []
    for solver, steps in itertools.product([None, *dict.fromkeys(cat_solvers)], dict.fromkeys(pruned_steps)):
        for combination in itertools.product(*grid.values()):
            values = tuple(zip(grid, combination, strict=True))
            on = [f"solver={solver}"] if solver else []
            name = ",".join(
                [PRUNED, *on, f"steps={steps}", *(f"{key}={value_text(value)}" for key, value in values)]
            )
            try:
                config = CATPruningConfig(**{"seed": settings.seed, **dict(values)})
            except ValueError as error:
                raise ValueError(f"{name}: {error}") from None
            if config.start_step >= steps:
                left_out.append(name)
                continue
            if solver:
                peer = peers.cat_solver_point(solver, steps, values, name, config)
                points.append(FrontierPoint(peer.variant, peer.kind, peer.values, peer.family))
                continue
            points.append(FrontierPoint(Variant(name, steps, config), PRUNED, values))
    return points, left_out


def recorded_points(
    names: Sequence[str], seed: int, known: Sequence[str], mag_ratios: Sequence[float] | None = None
) -> list[FrontierPoint]:
    """The rows of settings recorded in a run folder by earlier calls (``steps=N`` of the curve, ``cat,...``
    pruned settings), other than ``known``, rebuilt from their names: the table and plot describe every
    setting in the folder, whichever call added it."""
    fields, points = config_fields(), []
    for name in dict.fromkeys(names):
        if name in known or name == REFERENCE:
            continue
        peer = peers.point_from_name(name, mag_ratios)
        if peer is not None:
            points.append(FrontierPoint(peer.variant, peer.kind, peer.values, peer.family))
            continue
        kind, _, rest = name.partition(",") if name.startswith(PRUNED + ",") else (CURVE, "", name)
        parts = dict(part.split("=", 1) for part in _TOP_LEVEL_COMMA.split(rest))
        steps = int(parts.pop("steps"))
        if kind == CURVE:
            points.append(FrontierPoint(Variant(name, steps, CATPruningConfig.unpruned()), CURVE))
            continue
        solver = parts.pop("solver", None)
        values = tuple((field, parse_value(text, fields[field])) for field, text in parts.items())
        config = CATPruningConfig(**{"seed": seed, **dict(values)})
        if solver is not None:
            peer = peers.cat_solver_point(solver, steps, values, name, config)
            points.append(FrontierPoint(peer.variant, peer.kind, peer.values, peer.family))
            continue
        points.append(FrontierPoint(Variant(name, steps, config), PRUNED, values))
    return points


# --- the frontier --------------------------------------------------------------------------------------


def margin_over_curve(curve: Sequence[tuple[float, float]], x: float, y: float) -> float | None:
    """``y`` minus the curve's y at ``x``, linear between the curve's (x, y) points (in any order; points of
    infinite y are left out); None where ``x`` lies outside the curve: a margin is read off the curve,
    never extrapolated."""
    points = sorted((px, py) for px, py in curve if math.isfinite(py))
    if not points or not points[0][0] <= x <= points[-1][0]:
        return None
    xs, ys = zip(*points, strict=True)
    return y - float(np.interp(x, xs, ys))


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For each (cost, quality) point, whether it is on the Pareto frontier: no other point costs as little
    or less and is as good or better, and strictly so in one of the two."""
    return [
        not any(c <= cost and q >= quality and (c < cost or q > quality) for c, q in points)
        for cost, quality in points
    ]


def frontier_rows(summary: Sequence[dict[str, Any]], points: Sequence[FrontierPoint]) -> list[dict[str, Any]]:
    """:func:`~catprune.evaluation.summarize`'s rows with what the frontier adds: ``kind``, ``values`` (the
    grid's), ``number`` (pruned settings: 1, 2... as the plot labels them), ``steps`` (one count),
    ``macs_ratio`` (of the reference's), ``seconds`` (median per image), ``margin_db`` (pruned settings:
    PSNR above the fewer-steps curve at equal MACs, :func:`margin_over_curve`), ``pareto_macs`` and
    ``pareto_time`` (on the Pareto frontier of PSNR against MACs, against time; the reference, which has
    no PSNR, is on neither)."""
    by_name = {point.variant.name: point for point in points}
    reference_macs = next(row["macs"] for row in summary if row["method"] == REFERENCE)
    rows = []
    for row in summary:
        point = by_name[row["method"]]
        rows.append(
            {
                **row,
                "kind": point.kind,
                "values": dict(point.values),
                "number": None,
                "steps": point.variant.steps,
                "macs_ratio": row["macs"] / reference_macs,
                "seconds": 1 / row["throughput"],
                "margin_db": None,
            }
        )
    curve = [(row["macs"], row["psnr"]) for row in rows if row["kind"] == CURVE]
    for number, row in enumerate((row for row in rows if row["kind"] == PRUNED), start=1):
        row["number"] = number
        row["margin_db"] = margin_over_curve(curve, row["macs"], row["psnr"])
    candidates = [row for row in rows if row["kind"] != REFERENCE and math.isfinite(row["psnr"])]
    for cost, key in (("macs", "pareto_macs"), ("seconds", "pareto_time")):
        front = pareto_front([(row[cost], row["psnr"]) for row in candidates])
        on_front = {id(row) for row, chosen in zip(candidates, front, strict=True) if chosen}
        for row in rows:
            row[key] = id(row) in on_front
    return rows


def answer(rows: Sequence[dict[str, Any]]) -> str:
    """The short answer to "is any pruned setting better than fewer steps at equal MACs?": the setting
    highest above the fewer-steps curve and its margin, however it falls."""
    pruned = [row for row in rows if row["kind"] == PRUNED]
    measured = [row for row in pruned if row["margin_db"] is not None]
    if not measured:
        curve = [row["macs_ratio"] for row in rows if row["kind"] == CURVE]
        span = f" ({min(curve):.2f}-{max(curve):.2f}x the reference's)" if curve else ""
        return (
            f"No pruned setting lies within the MACs of the fewer-steps curve{span}: add step counts to "
            "--curve-steps."
        )
    outside = len(pruned) - len(measured)
    scope = f"the {len(measured)} pruned settings within the curve's MACs" + (
        f" ({outside} more lie outside it)" if outside else ""
    )
    best = max(measured, key=lambda row: row["margin_db"])
    where = (
        f"at {best['macs_ratio']:.2f}x the reference's MACs: PSNR {best['psnr']:.2f} dB against "
        f"{best['psnr'] - best['margin_db']:.2f} dB for fewer steps"
    )
    name = f"#{best['number']} `{best['method']}`"
    if best["margin_db"] > 0:
        above = sum(row["margin_db"] > 0 for row in measured)
        return (
            f"{above} of {scope} lie above the fewer-steps curve at equal MACs; the best, {name}, by "
            f"{best['margin_db']:.2f} dB ({where})."
        )
    return (
        f"None of {scope} lies above the fewer-steps curve at equal MACs; the closest, {name}, lies "
        f"{-best['margin_db']:.2f} dB below it ({where})."
    )


# --- outputs -------------------------------------------------------------------------------------------


def _setting(row: dict[str, Any]) -> str:
    if row["kind"] not in (PRUNED, CURVE, REFERENCE):
        return row["method"]
    if row["kind"] == PRUNED:
        return " ".join(f"{key}={value_text(value)}" for key, value in row["values"].items()) or "cat"
    return "full (reference)" if row["kind"] == REFERENCE else "fewer steps"


def frontier_markdown(
    rows: Sequence[dict[str, Any]],
    settings: FrontierSettings,
    num_prompts: int,
    errors: Mapping[str, str] | None = None,
) -> str:
    """The table (reference, curve, pruned settings), throughput and speed-up marked where they are not a
    measurement, its notes, and last the answer (:func:`answer`)."""
    timing, why_marked = timing_columns(rows)
    alignment, alignment_notes = alignment_columns(rows)
    pareto = {(True, True): "MACs, time", (True, False): "MACs", (False, True): "time", (False, False): ""}
    columns: list[Column] = [
        ("#", lambda r: str(r["number"] or "")),
        ("Method", lambda r: r.get("family") or ""),
        ("Setting", _setting),
        ("Steps", lambda r: str(r["steps"])),
        MACS_COLUMN,
        ("MACs (x ref.)", lambda r: f"{r['macs_ratio']:.3f}"),
        *timing,
        *alignment,
        *FIDELITY_COLUMNS,
        ("Sharpness (%)", lambda r: table_cell(r.get("sharpness"), ".1f")),
        (
            "dB over fewer steps at equal MACs",
            lambda r: "" if r["kind"] != PRUNED else table_cell(r["margin_db"], "+.2f"),
        ),
        (
            "dB over the best curve",
            lambda r: "" if r["kind"] == REFERENCE else table_cell(r.get("db_over_curve"), "+.2f"),
        ),
        ("Pareto", lambda r: pareto[r["pareto_macs"], r["pareto_time"]]),
        IMAGES_COLUMN,
    ]
    notes = [
        f"Model `{settings.model}`, prompts `{settings.prompts}` ({num_prompts}), reference: the unpruned "
        f"model at {settings.reference_steps} steps; seed {settings.seed} + prompt index.",
        "MACs: transformer multiply-accumulates per image (all CFG rows), from the layer shapes; x ref.: as "
        "a fraction of the reference's. Throughput: images per second (median generation); speed-up: over "
        "the reference. PSNR (of the mean squared error over all images) and SSIM (mean): against the "
        "reference's image from the same seed.",
        "dB over fewer steps at equal MACs: the setting's PSNR minus the fewer-steps curve's at the same "
        "MACs (linear between its step counts); positive: better than lowering the step count to the same "
        "compute; `-`: outside the curve's MACs. Pareto: on the frontier of PSNR against MACs (time): no "
        "other setting has as few or fewer MACs (seconds) and as high or higher PSNR.",
        "Method: the method family (a solver's fewer steps, CAT on a solver, one of diffusers' caches). "
        "Sharpness: Laplacian energy relative to the reference image's (100: as sharp; below: blurrier). "
        "dB over the best curve: PSNR minus the best of all solvers' fewer-steps curves at the same MACs.",
        *alignment_notes,
        *why_marked,
        *peers.refusal_notes(errors or {}),
        "",
        *peers.best_tables(rows),
        f"**Answer:** {answer(rows)}",
    ]
    return markdown_table(columns, rows, notes)


CSV_FIGURES = (
    "macs", "macs_ratio", "seconds", "throughput", "speedup", "psnr", "ssim", "sharpness", "alignment_full",
    "margin_db", "db_over_curve", "pareto_macs", "pareto_time", "images",
)  # fmt: skip
"""The columns of ``frontier.csv`` after each row's number, name, kind, steps and grid values."""


def write_csv(rows: Sequence[dict[str, Any]], path: Path, errors: Sequence[dict[str, Any]] = ()) -> None:
    """One line per row: its number, name, method family, kind, steps, grid values (as ``--grid`` takes
    them), figures; then one line per refused peer with its error."""
    fields = list(dict.fromkeys(key for row in rows for key in row["values"]))

    def write(temporary: Path) -> None:
        with temporary.open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["number", "name", "method", "kind", "steps", *fields, *CSV_FIGURES, "error"])
            for row in rows:
                values = [value_text(row["values"][key]) if key in row["values"] else "" for key in fields]
                figures = [row.get(key) for key in CSV_FIGURES]
                writer.writerow(
                    [row["number"], row["method"], row.get("family", ""), row["kind"], row["steps"], *values,
                     *figures, ""]
                )  # fmt: skip
            for row in errors:
                blank = [""] * (len(fields) + len(CSV_FIGURES))
                writer.writerow(["", row["method"], row["family"], row["kind"], "", *blank, row["error"]])

    atomic_write(path, write)


def plot_frontier(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """PSNR against MACs (left) and against time (right): the fewer-steps curve as a line (labelled with
    its step counts), the pruned settings as numbered points (left: with their margin over the curve), the
    Pareto frontier as a thick line through rings. The reference, of infinite PSNR, is not drawn."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 5.5), layout="constrained")
    panels = (
        ("macs_ratio", "pareto_macs", "MACs per image (x the reference's)"),
        ("seconds", "pareto_time", "time per image (s, median)"),
    )
    finite = [row for row in rows if row["kind"] != REFERENCE and math.isfinite(row["psnr"])]
    for axes, (cost, front, label) in zip(figure.subplots(1, 2), panels, strict=True):
        # In step order: against time, the curve then shows how noisy its timings are.
        curve = sorted((row["steps"], row[cost], row["psnr"]) for row in finite if row["kind"] == CURVE)
        if curve:
            axes.plot(
                [c[1] for c in curve], [c[2] for c in curve], "o-", color="tab:blue", label="fewer steps"
            )
        for steps, x, y in curve:
            axes.annotate(str(steps), (x, y), xytext=(0, -11), textcoords="offset points", ha="center",
                          fontsize=7, color="tab:blue")  # fmt: skip
        pruned = [row for row in finite if row["kind"] == PRUNED]
        axes.scatter([row[cost] for row in pruned], [row["psnr"] for row in pruned], color="tab:orange",
                     zorder=3, label="pruned settings (#)")  # fmt: skip
        for row in pruned:
            margin = row["margin_db"] if cost == "macs_ratio" else None
            text = str(row["number"]) + (f" ({margin:+.1f} dB)" if margin is not None else "")
            axes.annotate(
                text, (row[cost], row["psnr"]), xytext=(4, 4), textcoords="offset points", fontsize=7
            )
        best = sorted((row[cost], row["psnr"]) for row in finite if row[front])
        axes.plot([b[0] for b in best], [b[1] for b in best], "-", color="tab:green", linewidth=5, alpha=0.3,
                  label="Pareto frontier")  # fmt: skip
        axes.scatter([b[0] for b in best], [b[1] for b in best], s=160, facecolors="none",
                     edgecolors="tab:green", linewidths=1.5, zorder=4)  # fmt: skip
        axes.set(xlabel=label, ylabel="PSNR against the reference (dB)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8, loc="lower right")
    figure.suptitle(title)
    atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=120, format="png"))


def require_matplotlib() -> None:
    """Fail before any image is generated if the plot cannot be drawn."""
    if importlib.util.find_spec("matplotlib") is None:
        raise UserError("catprune frontier needs matplotlib: pip install -e '.[eval]'")


def run_frontier(
    settings: FrontierSettings,
    curve_steps: Sequence[int],
    pruned_steps: Sequence[int],
    grid: Mapping[str, Sequence[Any]],
    num_prompts: int,
    out: str | Path,
    device: str | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    solvers: Sequence[str] = (),
    cat_solvers: Sequence[str] = (),
    caches: Sequence[str] = (),
    threads: int | None = None,
) -> list[dict[str, Any]] | None:
    """Run (or resume) a frontier into ``out``: on the main process (None on the others) write
    ``results.jsonl``, ``frontier.csv``, ``frontier.md``, ``frontier.png`` and ``methods.png`` there and
    return the rows (:func:`frontier_rows`). ``solvers``, ``cat_solvers`` and ``caches`` add the rows of
    :mod:`catprune.peers`: other solvers' fewer-steps curves, the grid on other solvers, diffusers'
    caches (a cache that diffusers refuses or that fails becomes an error row). ``threads``: torch's CPU
    threads (:func:`~catprune.evaluation.open_run`)."""
    require_matplotlib()
    frontier_points(settings, curve_steps, pruned_steps, grid)  # invalid values fail before loading
    process, context = open_run(settings, num_prompts, out, device, echo=echo, threads=threads)
    root = context.folder.root
    native = peers.native_solver(context.pipe.scheduler)
    cat_on = [solver for solver in cat_solvers if solver != native]
    points, left_out = frontier_points(settings, curve_steps, pruned_steps, grid, cat_on)
    if left_out and process.is_main_process:
        echo(f"left out (pruning would start at or after the last step): {', '.join(left_out)}")
    extra = peers.solver_points(solvers, native, curve_steps, settings.reference_steps)
    ratios = (
        peers.magcache_ratios(context, settings, root / "magcache-ratios.json")
        if "magcache" in caches
        else None
    )
    candidates = peers.cache_points(caches, settings.reference_steps, ratios)
    reference = points[0].variant

    def first_item(variant: Variant, index: int) -> None:
        for needed in (reference, variant):
            if not context.folder.done(needed.name, index):
                run_item(context, needed, index)

    cached, errors = peers.probe(candidates, first_item, root / "peer-errors.json")
    points += [FrontierPoint(p.variant, p.kind, p.values, p.family) for p in [*extra, *cached]]
    records = run_items(process, context, [point.variant for point in points], "frontier", progress)
    if records is None:
        return None
    everything = context.folder.records()
    points += recorded_points(
        [record["method"] for record in everything],
        settings.seed,
        [point.variant.name for point in points],
        ratios,
    )
    points.sort(key=lambda point: (point.kind != REFERENCE, point.kind != CURVE, point.variant.steps))
    names = [point.variant.name for point in points]
    records = sorted(
        (record for record in everything if record["method"] in names),
        key=lambda record: (names.index(record["method"]), record["index"]),
    )
    rows = frontier_rows(summarize(records, [point.variant.name for point in points]), points)
    peers.add_quality(rows, points, native, context.folder, range(len(context.prompts)))
    count = len(context.prompts)
    write_csv(rows, root / "frontier.csv", peers.error_rows(errors))
    markdown = frontier_markdown(rows, settings, count, errors)
    atomic_write(root / "frontier.md", lambda temporary: temporary.write_text(markdown))
    title = f"{settings.model}, {count} prompts: fidelity to {settings.reference_steps} unpruned steps"
    plot_frontier(rows, root / "frontier.png", title)
    peers.plot_methods(rows, errors, root / "methods.png", title)
    return rows
