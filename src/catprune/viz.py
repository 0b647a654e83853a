"""Diagnostic figures of CAT pruning (the paper's figures 3 to 9), from any supported pipeline.

Each figure is two small functions: ``collect_*`` runs the pipeline with pruning applied and returns the
plotted data as a :class:`FigureData`; ``draw_*`` turns those data into a matplotlib figure. Keeping them
apart lets :func:`save_figure` write the data beside the PNG, so a figure can be checked against what was
measured. Generations run through :func:`catprune.runtime.run_generation`; measurement goes through a
:class:`GenerationRecorder`, an observer that the pruning state calls after each denoising step with its
:class:`~catprune.engine.StepRecord`: which tokens were recomputed, the output noise, the clusters.

Figures use matplotlib's object API (``Figure`` with the Agg canvas), so nothing depends on pyplot's
global backend.
"""

from __future__ import annotations

import dataclasses
import json
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from . import runtime
from .config import CATPruningConfig
from .engine import StepMode, StepRecord
from .formatting import plural
from .selection import relative_noise

PANEL_INCHES = 1.8
"""Side of one image panel."""


# --------------------------------------------------------------------------------------------- recording


@dataclass
class RecordedStep:
    """One denoising step as recorded (one row per prompt: the conditional rows under CFG), on the CPU."""

    step: int
    mode: StepMode
    indices: torch.Tensor | None
    """(P, K) tokens recomputed at a pruned step; None at a full or fill step (all tokens computed)."""
    noise: torch.Tensor | None
    """(P, N, p*p*C) float32 noise channels of the step's output tokens, from the fill step on (if kept)."""


def _host_copy(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A CPU copy of ``tensor`` (a copy even when it is already there: the state may reuse its tensors)."""
    return tensor.detach().to("cpu", dtype, copy=True)


class GenerationRecorder:
    """Records the steps of the latest generation, as an observer of the pruning state.

    Pass it to :func:`catprune.runtime.run_generation` (``observers=[recorder]``) or to
    :meth:`PruningEngine.add_observer`: it is called with each step's :class:`StepRecord`, and keeps CPU
    copies of what the figures plot. A record of step 0 starts a new generation (what was recorded before
    is dropped).
    """

    def __init__(self, keep_noise: bool = False) -> None:
        self.keep_noise = keep_noise
        self.steps: list[RecordedStep] = []
        self.num_prompts = 0
        self.height = self.width = 0
        self.reference: torch.Tensor | None = None
        """(P, N, p*p*C) the reference noise n_t0 of the selector (output of step t0 - 2)."""
        self.labels: torch.Tensor | None = None
        """(P, N) the KMeans cluster labels of the "cat" strategy, once clustered."""

    def __call__(self, record: StepRecord) -> None:
        if record.step == 0:
            self.steps.clear()
            self.reference = self.labels = None
            self.num_prompts = record.noise.shape[0]
            self.height, self.width = record.height, record.width
        indices = _host_copy(record.indices) if record.indices is not None else None
        noise = None
        if self.keep_noise and record.mode is not StepMode.FULL:
            noise = _host_copy(record.noise, torch.float32)
        self.steps.append(RecordedStep(record.step, record.mode, indices, noise))
        if record.reference is not None:
            self.reference = _host_copy(record.reference, torch.float32)
        if record.cluster_labels is not None:
            self.labels = _host_copy(record.cluster_labels)

    def frequency(self) -> torch.Tensor:
        """(P, N) how many pruned steps recomputed each token (full steps recompute every token)."""
        counts = torch.zeros(self.num_prompts, self.height * self.width, dtype=torch.long)
        for record in self.steps:
            if record.indices is not None:
                counts.scatter_add_(1, record.indices, torch.ones_like(record.indices))
        return counts


def record_generation(
    pipe: Any,
    prompts: Sequence[str],
    config: CATPruningConfig,
    steps: int,
    seed: int,
    keep_noise: bool = False,
) -> tuple[runtime.Generation, GenerationRecorder]:
    """Run ``pipe`` on ``prompts`` (one batch, seeded) with pruning applied, recording every step."""
    recorder = GenerationRecorder(keep_noise=keep_noise)
    generation = runtime.run_generation(pipe, prompts, steps, seed, config=config, observers=[recorder])
    return generation, recorder


def _macs(generation: runtime.Generation, prompts: Sequence[str]) -> tuple[float, float]:
    """MACs and full-model MACs per image of a generation run with pruning applied."""
    stats = generation.stats
    assert stats is not None
    return stats.macs / len(prompts), stats.full_macs / len(prompts)


def _patch_size(pipe: Any) -> int:
    """The transformer's patch size p, to lay its output tokens out as an image."""
    return int(pipe.transformer.config.patch_size)


def unpatchify(tokens: torch.Tensor, height: int, width: int, patch: int) -> np.ndarray:
    """(..., N, p*p*C) output tokens -> (..., height*p, width*p, C), as diffusers' DiTs lay out patches."""
    *lead, _, dim = tokens.shape
    grid = tokens.reshape(*lead, height, width, patch, patch, dim // (patch * patch))
    grid = grid.movedim(-3, -4)  # (..., h, p, w, p, C)
    return grid.reshape(*lead, height * patch, width * patch, -1).numpy()


# ------------------------------------------------------------------------------------------ figure data


@dataclass
class FigureData:
    """What one figure plots: arrays (saved as .npz) and settings and scalars (saved as .json)."""

    figure: str
    arrays: dict[str, np.ndarray]
    info: dict[str, Any] = field(default_factory=dict)


def _settings(config: CATPruningConfig, steps: int, seed: int, prompts: Sequence[str]) -> dict[str, Any]:
    return {"steps": steps, "seed": seed, "prompts": list(prompts), "config": dataclasses.asdict(config)}


def _grid(recorder: GenerationRecorder, tokens: torch.Tensor) -> np.ndarray:
    """(P, N) per-token values -> (P, h, w)."""
    return tokens.reshape(-1, recorder.height, recorder.width).numpy()


def collect_noise_correlation(
    pipe: Any, prompts: Sequence[str], config: CATPruningConfig, steps: int, seed: int
) -> FigureData:
    """Fig. 3: per-token norm of the relative noise n_t - n_t0 at step t against step t - 1, over all
    prompts, tokens and steps from the fill step on (keep_ratio 1.0 measures the unpruned model)."""
    _, recorder = record_generation(pipe, prompts, config, steps, seed, keep_noise=True)
    records = [record for record in recorder.steps if record.noise is not None]
    if len(records) < 2 or recorder.reference is None:
        raise ValueError(
            "noise-correlation needs at least two steps from the fill step on (steps > start_step)"
        )
    _, scores = relative_noise(torch.stack([record.noise for record in records]), recorder.reference)
    previous, current = scores[:-1].numpy(), scores[1:].numpy()
    step = np.broadcast_to(np.array([record.step for record in records[1:]])[:, None, None], current.shape)
    prompt = np.broadcast_to(np.arange(current.shape[1])[None, :, None], current.shape)
    r = float(np.corrcoef(previous.ravel(), current.ravel())[0, 1])
    return FigureData(
        "noise-correlation",
        {
            "previous": previous.ravel(),
            "current": current.ravel(),
            "step": step.ravel(),
            "prompt": prompt.ravel(),
        },
        {**_settings(config, steps, seed, prompts), "pearson_r": r, "points": int(current.size)},
    )


def collect_selection(
    pipe: Any,
    prompt: str,
    strategies: Sequence[str],
    config: CATPruningConfig,
    steps: int,
    seed: int,
    panels: int,
) -> FigureData:
    """Fig. 4/5: for each strategy, the recomputed tokens and the predicted noise at ``panels`` pruned
    steps spread over the generation, how often each token was recomputed, and the final image."""
    masks, noises, frequencies, images = [], [], [], []
    patch = _patch_size(pipe)
    for strategy in strategies:
        generation, recorder = record_generation(
            pipe, [prompt], dataclasses.replace(config, strategy=strategy), steps, seed, keep_noise=True
        )
        pruned = [record for record in recorder.steps if record.indices is not None]
        if not pruned:
            raise ValueError("selection needs pruned steps (steps > start_step)")
        shown = [pruned[i] for i in np.unique(np.linspace(0, len(pruned) - 1, panels).round().astype(int))]
        mask = torch.zeros(len(shown), recorder.height * recorder.width, dtype=torch.bool)
        for row, record in zip(mask, shown, strict=True):
            row[record.indices[0]] = True
        masks.append(_grid(recorder, mask))
        noise = torch.stack([record.noise[0] for record in shown])
        noises.append(unpatchify(noise, recorder.height, recorder.width, patch))
        frequencies.append(_grid(recorder, recorder.frequency())[0])
        images.append(generation.images[0])
    return FigureData(
        "selection",
        {
            "masks": np.stack(masks),
            "noise": np.stack(noises),
            "frequency": np.stack(frequencies),
            "images": np.stack(images),
            "steps": np.array([record.step for record in shown]),
        },
        {
            **_settings(config, steps, seed, [prompt]),
            "strategies": list(strategies),
            "pruned_steps": len(pruned),
        },
    )


def collect_strategies(
    pipe: Any,
    prompts: Sequence[str],
    strategies: Sequence[str],
    config: CATPruningConfig,
    steps: int,
    seed: int,
) -> FigureData:
    """Fig. 6: images of each strategy at the same budget, and of the full model, for each prompt."""
    configs = [dataclasses.replace(config, strategy=strategy) for strategy in strategies]
    runs = [
        runtime.run_generation(pipe, prompts, steps, seed, config=c)
        for c in [*configs, CATPruningConfig.unpruned()]
    ]
    macs = np.array([_macs(run, prompts) for run in runs])
    return FigureData(
        "strategies",
        {
            "images": np.stack([run.images for run in runs], axis=1),
            "macs": macs[:, 0],
            "full_macs": macs[:, 1],
        },
        {**_settings(config, steps, seed, prompts), "columns": [*strategies, "full"]},
    )


def collect_clusters(
    pipe: Any, prompts: Sequence[str], config: CATPruningConfig, steps: int, seed: int
) -> FigureData:
    """Fig. 7: the KMeans clusters of the "cat" strategy (made once, at the first pruned step) and the
    final images."""
    config = dataclasses.replace(config, strategy="cat")
    generation, recorder = record_generation(pipe, prompts, config, steps, seed)
    labels = recorder.labels
    if labels is None:
        raise ValueError("clusters needs a pruned step (steps > start_step)")
    return FigureData(
        "clusters",
        {"labels": _grid(recorder, labels), "images": generation.images},
        {**_settings(config, steps, seed, prompts), "num_clusters": int(labels.max()) + 1},
    )


def collect_alpha_sweep(
    pipe: Any,
    prompts: Sequence[str],
    keep_ratios: Sequence[float],
    config: CATPruningConfig,
    steps: int,
    seed: int,
) -> FigureData:
    """Fig. 8/9: images for each keep ratio alpha (1.0: the full model) and their MACs per image."""
    configs = [
        CATPruningConfig.unpruned() if ratio == 1.0 else dataclasses.replace(config, keep_ratio=ratio)
        for ratio in keep_ratios
    ]
    runs = [runtime.run_generation(pipe, prompts, steps, seed, config=c) for c in configs]
    macs = np.array([_macs(run, prompts) for run in runs])
    return FigureData(
        "alpha-sweep",
        {
            "images": np.stack([run.images for run in runs], axis=1),
            "keep_ratios": np.array(keep_ratios, dtype=float),
            "macs": macs[:, 0],
            "full_macs": macs[:, 1],
        },
        _settings(config, steps, seed, prompts),
    )


def collect_frequency(
    pipe: Any, prompts: Sequence[str], config: CATPruningConfig, steps: int, seed: int
) -> FigureData:
    """How many of the pruned steps recomputed each token over one generation, with the final images."""
    generation, recorder = record_generation(pipe, prompts, config, steps, seed)
    assert generation.stats is not None
    return FigureData(
        "frequency",
        {"frequency": _grid(recorder, recorder.frequency()), "images": generation.images},
        {**_settings(config, steps, seed, prompts), "pruned_steps": generation.stats.pruned_steps},
    )


# ---------------------------------------------------------------------------------------------- drawing


def _figure(rows: int, columns: int, extra_width: float = 0.0, extra_height: float = 0.6) -> Figure:
    """A figure of (rows, columns) image panels; at least 3.6 inches wide so that titles fit."""
    width = max(3.6, columns * PANEL_INCHES + extra_width)
    return Figure(figsize=(width, rows * PANEL_INCHES + extra_height), layout="constrained")


def _panels(figure: Figure, rows: int, columns: int) -> np.ndarray:
    """A (rows, columns) array of image axes without ticks."""
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return axes


def _wrap(text: str, width: int = 26) -> str:
    return "\n".join(textwrap.wrap(text, width))


def _title(figure: Figure, *lines: str) -> None:
    """The figure's title, wrapped to its width (about 15 characters per inch at 8 points)."""
    width = int(figure.get_figwidth() * 15)
    figure.suptitle("\n".join(_wrap(line, width) for line in lines), fontsize=8)


def _row_label(ax: Axes, text: str) -> None:
    ax.set_ylabel(_wrap(text), fontsize=7)


def _budget(info: dict[str, Any]) -> str:
    config = info["config"]
    kept = "every token recomputed" if config["keep_ratio"] >= 1 else f"keep ratio {config['keep_ratio']}"
    return f"{kept}, pruned from step {config['start_step']} of {info['steps']}, seed {info['seed']}"


def _show_noise(ax: Axes, noise: np.ndarray) -> None:
    """Predicted noise as colour: its first three channels (one channel: grey), each stretched over its
    1st to 99th percentile so that structure, not scale, is visible."""
    channels = noise[..., :3] if noise.shape[-1] >= 3 else noise[..., :1]
    low, high = np.percentile(channels, [1, 99], axis=(0, 1), keepdims=True)
    scaled = np.clip((channels - low) / np.maximum(high - low, 1e-8), 0, 1)
    ax.imshow(scaled if scaled.shape[-1] == 3 else scaled[..., 0], cmap="gray", interpolation="nearest")


def _colorbar(figure: Figure, mappable: Any, axes: Any, label: str) -> None:
    """A colour bar of counts (steps, times recomputed): integer ticks, opaque colours."""
    bar = figure.colorbar(mappable, ax=axes, shrink=0.9, pad=0.02, ticks=MaxNLocator(integer=True))
    bar.set_label(label, fontsize=7)
    bar.ax.tick_params(labelsize=6)
    bar.solids.set_alpha(1.0)


def draw_noise_correlation(data: FigureData) -> Figure:
    arrays, info = data.arrays, data.info
    figure = Figure(figsize=(5.2, 4.4), layout="constrained")
    ax = figure.subplots()
    points = ax.scatter(
        arrays["previous"],
        arrays["current"],
        c=arrays["step"],
        s=4,
        alpha=0.4,
        cmap="viridis",
        rasterized=True,
    )
    limit = float(max(arrays["previous"].max(), arrays["current"].max()))
    ax.plot([0, limit], [0, limit], color="0.4", linestyle="--", linewidth=0.8, label="y = x")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_xlabel(r"$\|n_{t-1} - n_{t_0}\|_2$ per token (step $t-1$)")
    ax.set_ylabel(r"$\|n_t - n_{t_0}\|_2$ per token (step $t$)")
    _colorbar(figure, points, ax, "step t")
    _title(
        figure,
        f"Relative noise per token, step t against t-1: Pearson r = {info['pearson_r']:.3f}",
        f"{plural(len(info['prompts']), 'prompt')}, {plural(info['points'], 'point')}, {_budget(info)}",
    )
    return figure


def draw_selection(data: FigureData) -> Figure:
    arrays, info = data.arrays, data.info
    strategies, shown_steps = info["strategies"], arrays["steps"]
    rows, columns = 2 * len(strategies), len(shown_steps) + 1
    figure = _figure(rows, columns, extra_width=0.4, extra_height=0.8)
    axes = _panels(figure, rows, columns)
    tokens = arrays["masks"][0, 0].size
    for s, strategy in enumerate(strategies):
        chosen, noise = axes[2 * s], axes[2 * s + 1]
        for column, step in enumerate(shown_steps):
            mask = arrays["masks"][s, column]
            chosen[column].imshow(mask, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            chosen[column].set_title(f"step {step}: {int(mask.sum())}/{tokens}", fontsize=7)
            _show_noise(noise[column], arrays["noise"][s, column])
        heat = chosen[-1].imshow(
            arrays["frequency"][s], cmap="magma", vmin=0, vmax=info["pruned_steps"], interpolation="nearest"
        )
        _colorbar(figure, heat, chosen[-1], "pruned steps")
        chosen[-1].set_title("times recomputed", fontsize=7)
        noise[-1].imshow(arrays["images"][s], interpolation="nearest")
        noise[-1].set_title("final image", fontsize=7)
        _row_label(chosen[0], f"{strategy}: recomputed tokens (white)")
        _row_label(noise[0], f"{strategy}: predicted noise")
    _title(figure, f"Token selection over the pruned steps: {info['prompts'][0]}", _budget(info))
    return figure


def _image_grid(
    figure: Figure, images: np.ndarray, prompts: Sequence[str], titles: Sequence[str]
) -> np.ndarray:
    """Rows = prompts, columns = settings."""
    axes = _panels(figure, *images.shape[:2])
    for row, prompt in enumerate(prompts):
        for column, title in enumerate(titles):
            axes[row, column].imshow(images[row, column], interpolation="nearest")
            if row == 0:
                axes[row, column].set_title(title, fontsize=8)
        _row_label(axes[row, 0], prompt)
    return axes


def draw_strategies(data: FigureData) -> Figure:
    arrays, info = data.arrays, data.info
    images = arrays["images"]
    titles = [
        f"{name}\n{macs / full:.2f}x MACs"
        for name, macs, full in zip(info["columns"], arrays["macs"], arrays["full_macs"], strict=True)
    ]
    figure = _figure(*images.shape[:2], extra_height=0.9)
    _image_grid(figure, images, info["prompts"], titles)
    _title(figure, "Token-choice strategies at the same budget", _budget(info))
    return figure


def draw_clusters(data: FigureData) -> Figure:
    arrays, info = data.arrays, data.info
    labels, images = arrays["labels"], arrays["images"]
    count = info["num_clusters"]
    colours = ListedColormap(matplotlib.colormaps["tab20"](np.arange(count) % 20))
    norm = BoundaryNorm(np.arange(count + 1) - 0.5, count)
    figure = _figure(2, len(images), extra_height=1.0)
    axes = _panels(figure, 2, len(images))
    for column, (label, image, prompt) in enumerate(zip(labels, images, info["prompts"], strict=True)):
        extent = (0, image.shape[1], image.shape[0], 0)
        axes[0, column].imshow(image, interpolation="nearest", extent=extent)
        axes[0, column].set_title(_wrap(prompt), fontsize=6)
        axes[1, column].imshow(image, interpolation="nearest", extent=extent)
        axes[1, column].imshow(
            label, cmap=colours, norm=norm, alpha=0.7, interpolation="nearest", extent=extent
        )
    _row_label(axes[0, 0], "final image")
    _row_label(axes[1, 0], "clusters over the image")
    start = info["config"]["start_step"]
    _title(
        figure,
        f"KMeans clusters ({count}), made once at step {start} from the noise of step {start - 1} "
        "and the token positions",
        _budget(info),
    )
    return figure


def draw_alpha_sweep(data: FigureData) -> Figure:
    arrays, info = data.arrays, data.info
    images = arrays["images"]
    titles = [
        "keep ratio 1.0 (full)" if ratio == 1 else f"keep ratio {ratio:g}" for ratio in arrays["keep_ratios"]
    ]
    figure = _figure(*images.shape[:2], extra_height=1.0)
    axes = _image_grid(figure, images, info["prompts"], titles)
    for ax, macs, full in zip(axes[-1], arrays["macs"], arrays["full_macs"], strict=True):
        label = f"{runtime.format_count(macs, digits=3)} MACs/image\n({macs / full:.2f}x of full)"
        ax.set_xlabel(label, fontsize=7)
    config = info["config"]
    _title(
        figure,
        f"Images by keep ratio, strategy {config['strategy']}, pruned from step {config['start_step']} "
        f"of {info['steps']}, seed {info['seed']}",
    )
    return figure


def draw_frequency(data: FigureData) -> Figure:
    arrays, info = data.arrays, data.info
    frequency, images = arrays["frequency"], arrays["images"]
    figure = _figure(2, len(images), extra_width=0.8, extra_height=1.0)
    axes = _panels(figure, 2, len(images))
    for column, (counts, image, prompt) in enumerate(zip(frequency, images, info["prompts"], strict=True)):
        axes[0, column].imshow(image, interpolation="nearest")
        axes[0, column].set_title(_wrap(prompt), fontsize=6)
        heat = axes[1, column].imshow(
            counts, cmap="magma", vmin=0, vmax=info["pruned_steps"], interpolation="nearest"
        )
    _colorbar(
        figure, heat, axes[1, :].tolist(), f"times recomputed\n(of {info['pruned_steps']} pruned steps)"
    )
    _row_label(axes[0, 0], "final image")
    _row_label(axes[1, 0], "times each token was recomputed")
    _title(figure, f"Recomputation frequency per token, strategy {info['config']['strategy']}", _budget(info))
    return figure


DRAW = {
    "noise-correlation": draw_noise_correlation,
    "selection": draw_selection,
    "strategies": draw_strategies,
    "clusters": draw_clusters,
    "alpha-sweep": draw_alpha_sweep,
    "frequency": draw_frequency,
}
"""The drawing function of each figure, by name."""


def image_panels(figure: Figure) -> list[Axes]:
    """The axes that show data (colour bars excluded)."""
    return [ax for ax in figure.axes if (ax.images or ax.collections) and ax.get_label() != "<colorbar>"]


def save_figure(data: FigureData, path: str | Path, dpi: int = 100) -> Figure:
    """Draw ``data`` into ``path`` (PNG) and save the plotted data beside it: ``path`` with suffix .npz
    (arrays) and .json (settings, scalars and the figure's layout)."""
    path = Path(path)
    figure = DRAW[data.figure](data)
    figure.savefig(path, dpi=dpi, format="png")
    width, height = figure.get_size_inches() * dpi
    layout = {"panels": len(image_panels(figure)), "size": [round(width), round(height)], "dpi": dpi}
    np.savez_compressed(path.with_suffix(".npz"), **data.arrays)
    info = {"figure": data.figure, **data.info, "layout": layout}
    path.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")
    return figure


def load_figure_data(path: str | Path) -> FigureData:
    """The data saved beside a figure by :func:`save_figure` (to check it, or to redraw it)."""
    path = Path(path)
    info = json.loads(path.with_suffix(".json").read_text())
    info.pop("layout")
    with np.load(path.with_suffix(".npz")) as arrays:
        return FigureData(info.pop("figure"), dict(arrays), info)
