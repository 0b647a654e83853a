"""Prompt sets for evaluation: ``shapes`` and ``textures`` (built in: held-out captions of the shapes models'
two grammars), ``parti`` and ``coco`` (hub datasets), or a text file.

The hub sets need the optional ``datasets`` package (``pip install 'catprune[eval]'``) and the network, or
a local Hugging Face cache; without either they fail at once with a message saying so, never half-way
through a run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


class PromptSetError(RuntimeError):
    """A prompt set cannot be loaded (unknown name, missing package, no network, empty file)."""


@dataclass(frozen=True)
class HubPromptSet:
    """A prompt set stored as a dataset on the Hugging Face hub."""

    dataset: str
    split: str
    column: str
    description: str


HUB_SETS: dict[str, HubPromptSet] = {
    "parti": HubPromptSet("nateraw/parti-prompts", "train", "Prompt", "PartiPrompts (1,632 prompts)"),
    # One row per COCO 2017 validation image with its captions; the first caption of each image is used.
    "coco": HubPromptSet("phiyodr/coco2017", "validation", "captions", "COCO 2017 val captions (5,000)"),
}
BUILT_IN = ("shapes", "textures")
"""Held-out captions (colour-shape pairs never trained on): ``shapes`` for ``shapes-mmdit`` and
``shapes-pixart``, ``textures`` (on textured backdrops) for ``textures-mmdit``."""
PROMPT_SETS = (*BUILT_IN, *HUB_SETS)


def load_prompts(name_or_path: str | Path, num_prompts: int | None = None, seed: int = 0) -> list[str]:
    """The first ``num_prompts`` prompts (all when None) of a named set or of a text file (one per line,
    blank lines skipped). ``seed`` only matters for the built-in sets, whose held-out captions it draws."""
    if num_prompts is not None and num_prompts < 1:
        raise PromptSetError(f"the number of prompts must be >= 1, got {num_prompts}")
    name = str(name_or_path)
    if name == "shapes":
        from .shapes.scenes import heldout_captions

        return heldout_captions(num_prompts if num_prompts is not None else 256, seed)
    if name == "textures":
        from .shapes.textures import heldout_captions as heldout_textured_captions

        return heldout_textured_captions(num_prompts if num_prompts is not None else 256, seed)
    if name in HUB_SETS:
        prompts = _hub_prompts(HUB_SETS[name])
    elif Path(name).is_file():
        prompts = [line.strip() for line in Path(name).read_text(encoding="utf-8").splitlines()]
        prompts = [prompt for prompt in prompts if prompt]
        if not prompts:
            raise PromptSetError(f"{name} holds no prompts (one per line expected)")
    else:
        raise PromptSetError(f"unknown prompt set {name!r}: not a file, nor one of {', '.join(PROMPT_SETS)}")
    return prompts[:num_prompts]


def _hub_prompts(spec: HubPromptSet) -> list[str]:
    try:
        import datasets
    except ImportError as error:
        raise PromptSetError(
            f"the {spec.description} set needs the 'datasets' package: pip install 'catprune[eval]'"
        ) from error
    if not _hub_offline():
        # One quick request first: load_dataset retries for about half a minute before it gives up.
        import huggingface_hub

        try:
            huggingface_hub.dataset_info(spec.dataset, timeout=10)
        except Exception as error:
            raise PromptSetError(
                f"cannot reach the hub dataset {spec.dataset!r} for {spec.description} "
                f"({type(error).__name__}: {error}); offline, set HF_HUB_OFFLINE=1 to use a local cache"
            ) from error
    try:
        table = datasets.load_dataset(spec.dataset, split=spec.split)
    except Exception as error:  # datasets raises many types for "not cached"
        raise PromptSetError(
            f"cannot load {spec.description} from the hub dataset {spec.dataset!r}: "
            f"{type(error).__name__}: {error}"
        ) from error
    values = table[spec.column]
    return [value[0] if isinstance(value, list) else value for value in values]


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
