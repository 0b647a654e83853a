"""``catprune viz FIGURE``: the paper's diagnostic figures as PNGs, from a shapes model or a real pipeline.

Each figure writes ``--out`` (PNG) and the plotted data beside it (same name, .npz and .json). Without
``--prompts`` a figure draws a built-in set of shapes prompts (:data:`DEFAULT_PROMPTS`; for a model of the
textures grammar such as ``textures-mmdit``, :data:`TEXTURES_DEFAULT_PROMPTS`). A shapes model's prompts
are read as ``catprune generate`` reads them: in its caption grammar, objects in canonical order.
"""

from __future__ import annotations

import argparse
import importlib
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ..config import CATPruningConfig
from ..errors import UserError
from ..names import SHIPPED_MODELS, STRATEGY_NAMES, check_model_name
from ..shapes.scenes import PromptGrammarError
from .arguments import add_command, add_pruning_arguments, add_threads_argument, check_steps, check_writable

if TYPE_CHECKING:
    from ..viz import FigureData

FIGURE_HELP = {
    "noise-correlation": "Fig. 3: relative noise per token at step t against step t-1, with Pearson r",
    "selection": "Fig. 4/5: recomputed tokens and predicted noise over the pruned steps, per strategy",
    "strategies": "Fig. 6: images of several token-choice strategies at the same budget, and the full model",
    "clusters": "Fig. 7: the KMeans cluster map over the image, per prompt",
    "alpha-sweep": "Fig. 8/9: images by keep ratio alpha, with MACs per image under each column",
    "frequency": "heat map of how many pruned steps recomputed each token over a generation",
}

DEFAULT_PROMPTS = (
    "a large red circle in the center on a white background",
    "a small blue square at the top left and a large green triangle at the bottom right on a gray background",
    "a large purple square on the left and a small orange circle on the right on a black background",
)
"""The prompts a figure draws without ``--prompts``: shapes scenes (the figures of docs/figures.md)."""

SELECTION_PROMPT = DEFAULT_PROMPTS[1]
"""The one prompt ``selection`` draws without ``--prompts``."""

TEXTURES_DEFAULT_PROMPTS = (
    "a large red circle in the center on a white striped background",
    "a small blue square at the top left and a large green triangle at the bottom right on a gray checked "
    "background",
    "a large purple square on the left and a small orange circle on the right on a mottled background",
)
"""The same scenes on textured backdrops: what a figure of a textures-grammar model draws by default."""


def default_prompts(figure: str, grammar: str = "shapes") -> list[str]:
    """The prompts ``figure`` draws when ``--prompts`` is not given, for a model of ``grammar``."""
    prompts = TEXTURES_DEFAULT_PROMPTS if grammar == "textures" else DEFAULT_PROMPTS
    return [prompts[1]] if figure == "selection" else list(prompts)


def _prompts_help(figure: str) -> str:
    defaults = default_prompts(figure)
    quoted = " ".join(f'"{prompt}"' for prompt in defaults)
    textured = "; textures-mmdit: the same on textured backdrops"
    if figure == "selection":
        return f"one prompt (default: the shapes prompt {quoted}{textured})"
    return f"one or more prompts (default: {len(defaults)} shapes prompts: {quoted}{textured})"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "viz")
    figures = parser.add_subparsers(dest="figure", required=True, metavar="FIGURE")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--model",
        default=SHIPPED_MODELS[0],
        help=f"{', '.join(SHIPPED_MODELS)}, a local pipeline folder or a hub id (default: %(default)s)",
    )
    common.add_argument("--out", type=Path, required=True, help="the PNG to write")
    add_threads_argument(common)
    common.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default: 0)")
    common.add_argument("--dpi", type=int, default=100, help="resolution of the PNG (default: 100)")

    def add(name: str, keep_ratio: float | None = 0.3) -> argparse.ArgumentParser:
        """The figure's subcommand, with ``--keep-ratio`` unless it sets the keep ratio otherwise (None)."""
        figure = figures.add_parser(
            name, parents=[common], help=FIGURE_HELP[name], description=FIGURE_HELP[name]
        )
        figure.add_argument("--prompts", nargs="+", metavar="PROMPT", help=_prompts_help(name))
        add_pruning_arguments(figure, keep_ratio=keep_ratio)
        figure.set_defaults(func=run)
        return figure

    add("noise-correlation", keep_ratio=1.0).epilog = (
        "The default keep ratio 1.0 recomputes every token: it measures the model itself. Below 1, "
        "reused tokens repeat their noise, which inflates the correlation."
    )
    selection = add("selection")
    selection.add_argument(
        "--strategies", nargs="+", choices=sorted(STRATEGY_NAMES), default=["noise", "noise+balance"]
    )
    selection.add_argument("--panels", type=int, default=5, help="pruned steps shown (default: 5)")
    add("strategies").add_argument(
        "--strategies", nargs="+", choices=sorted(STRATEGY_NAMES), default=["noise+balance", "cat", "rows"]
    )
    add("clusters")
    sweep = add("alpha-sweep", keep_ratio=None)
    sweep.add_argument(
        "--keep-ratios", nargs="+", type=float, default=[0.2, 0.3, 0.5, 0.8, 1.0], help="1.0: the full model"
    )
    for figure in (sweep, add("frequency")):
        figure.add_argument(
            "--strategy", choices=sorted(STRATEGY_NAMES), default="cat", help="(default: cat)"
        )


def _viz_library() -> ModuleType:
    """``catprune.viz``, imported on use: it needs matplotlib, an optional dependency, and the CLI imports
    every tool module at start."""
    try:
        return importlib.import_module("catprune.viz")
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] != "matplotlib":
            raise
        raise UserError("catprune viz needs matplotlib: pip install matplotlib") from None


def _collect(viz: ModuleType, args: argparse.Namespace, pipe: Any) -> FigureData:
    settings = {name: getattr(args, name) for name in ("keep_ratio", "strategy") if hasattr(args, name)}
    config = CATPruningConfig(start_step=args.start_step, **settings)
    common = {"config": config, "steps": args.steps, "seed": args.seed}
    collectors: dict[str, Callable[[], FigureData]] = {
        "noise-correlation": lambda: viz.collect_noise_correlation(pipe, args.prompts, **common),
        "selection": lambda: viz.collect_selection(
            pipe, args.prompts[0], args.strategies, panels=args.panels, **common
        ),
        "strategies": lambda: viz.collect_strategies(pipe, args.prompts, args.strategies, **common),
        "clusters": lambda: viz.collect_clusters(pipe, args.prompts, **common),
        "alpha-sweep": lambda: viz.collect_alpha_sweep(pipe, args.prompts, args.keep_ratios, **common),
        "frequency": lambda: viz.collect_frequency(pipe, args.prompts, **common),
    }
    return collectors[args.figure]()


def _model_prompts(prompts: list[str], grammar: str | None) -> list[str]:
    """The prompts as the model reads them: a shapes model's captions in canonical order (as ``generate``)."""
    if grammar is None:
        return prompts
    from ..shapes.pipelines import normalize_model_prompt

    try:
        return [normalize_model_prompt(prompt, grammar) for prompt in prompts]
    except PromptGrammarError as error:
        raise UserError(str(error)) from None


def run(args: argparse.Namespace) -> int:
    from ..runtime import load_pipeline, use_cpu_threads
    from ..shapes.pipelines import prompt_grammar

    check_model_name(args.model)
    grammar = prompt_grammar(args.model)
    if args.prompts is None:
        args.prompts = default_prompts(args.figure, grammar or "shapes")
    check_steps(args.steps, args.start_step)
    if args.figure == "selection" and len(args.prompts) != 1:
        raise UserError(f"selection shows one prompt, got {len(args.prompts)}")
    if getattr(args, "panels", 1) < 1:
        raise UserError(f"--panels must be >= 1, got {args.panels}")
    if args.out.suffix.lower() != ".png":
        raise UserError(f"--out must name a .png file, got {args.out}")
    check_writable(args.out)
    args.prompts = _model_prompts(args.prompts, grammar)
    viz = _viz_library()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pipe = load_pipeline(args.model)
    use_cpu_threads(pipe.transformer, args.threads)
    data = _collect(viz, args, pipe)
    viz.save_figure(data, args.out, dpi=args.dpi)
    print(
        f"wrote {args.out} (data: {args.out.with_suffix('.npz').name}, {args.out.with_suffix('.json').name}) "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return 0
