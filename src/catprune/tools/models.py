"""``catprune models``: the support matrix of every transformer class in the installed diffusers.

Supported classes are the registry's (``catprune.adapters.ADAPTERS``), each with its named architectures
and the pipelines the tests drive; every other class gets the reason ``apply_cat_pruning`` refuses it with
(``catprune.adapters.unsupported``). ``docs/models.md`` is this command's output (``--write``);
``tests/test_models_matrix.py`` fails when the file is stale.
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path
from typing import TYPE_CHECKING

from .arguments import add_command

if TYPE_CHECKING:
    from torch import nn

TESTED_PIPELINES: dict[str, tuple[str, ...]] = {
    "sd3": (
        "StableDiffusion3Pipeline",
        "StableDiffusion3Img2ImgPipeline",
        "StableDiffusion3InpaintPipeline",
        "StableDiffusion3ControlNetPipeline",
        "StableDiffusion3PAGPipeline",
    ),
    "pixart": ("PixArtSigmaPipeline", "PixArtAlphaPipeline"),
    "flux": ("FluxPipeline", "FluxImg2ImgPipeline", "FluxControlNetPipeline", "FluxKontextPipeline"),
    "chroma": ("ChromaPipeline",),
    "qwen-image": ("QwenImagePipeline", "QwenImageEditPipeline"),
    "flux2": ("Flux2Pipeline", "Flux2KleinPipeline"),
    "z-image": ("ZImagePipeline",),
    "flux3": ("Flux3ModularPipeline", "Flux3DistilledModularPipeline"),
    "wan": ("WanPipeline", "WanImageToVideoPipeline"),
    "hunyuanvideo-1.5": ("HunyuanVideo15Pipeline", "HunyuanVideo15ImageToVideoPipeline"),
}
"""The diffusers pipelines each family's tests build from tiny components and run pruned (the test of the
matrix checks that each is named in the tests)."""


def transformer_classes() -> list[type[nn.Module]]:
    """Every model class that ``diffusers.models.transformers`` exports, by name."""
    import diffusers.models.transformers as transformers
    from torch import nn

    classes = {
        cls
        for cls in vars(transformers).values()
        if inspect.isclass(cls)
        and issubclass(cls, nn.Module)
        and cls.__module__.startswith(transformers.__name__)
    }
    return sorted(classes, key=lambda cls: cls.__name__)


def matrix_rows() -> list[tuple[str, str, str, str]]:
    """(class, supported, family and named architectures or "", pipelines tested or the reason) per class."""
    from ..adapters import ADAPTERS
    from ..adapters.unsupported import unsupported_reason

    adapters = {adapter.model_class.__name__: adapter for adapter in ADAPTERS.values()}
    rows = []
    for cls in transformer_classes():
        adapter = adapters.get(cls.__name__)
        if adapter is None:
            rows.append((cls.__name__, "no", "", unsupported_reason(cls.__name__)))
            continue
        names = ", ".join(f"`{name}`" for name in getattr(adapter, "public_models", {}))
        family = f"`{adapter.family}`" + (f" ({names})" if names else "")
        pipelines = ", ".join(TESTED_PIPELINES.get(adapter.family, ())) or "none tested"
        rows.append((cls.__name__, "yes", family, pipelines))
    return rows


def matrix_markdown() -> str:
    import diffusers

    from ..adapters.unsupported import MATRIX

    rows = matrix_rows()
    supported = sum(row[1] == "yes" for row in rows)
    lines = [
        "# Supported models",
        "",
        f"Every transformer class in diffusers {diffusers.__version__} (`diffusers.models.transformers`): "
        f"{supported} of {len(rows)} supported. Written by `catprune models --write {MATRIX}` from the "
        "adapter registry; `tests/test_models_matrix.py` fails when it is stale. `apply_cat_pruning` on a "
        "class marked *no* raises a TypeError with the reason given here.",
        "",
        "| class | supported | family (named architectures) | pipelines tested, or why not supported |",
        "|---|---|---|---|",
        *(f"| `{name}` | {mark} | {family} | {detail} |" for name, mark, family, detail in rows),
        "",
    ]
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "models")
    parser.add_argument(
        "--write", type=Path, metavar="PATH", help="write the matrix to PATH (e.g. docs/models.md)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    text = matrix_markdown()
    if args.write is None:
        print(text, end="")
    else:
        args.write.write_text(text)
        print(f"wrote {args.write}")
    return 0
