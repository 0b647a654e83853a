"""The names the command line takes (models, architectures, strategies, dtypes), known without importing
torch, so that every ``--help`` prints at once; and model names checked before anything is loaded (no
torch, no network).

The name lists that mirror a registry of a heavy module (:data:`ARCHITECTURE_NAMES`,
:data:`STRATEGY_NAMES`) are checked against it by ``tests/test_cli.py``: a model or strategy added there
fails that test until it is named here too.

A ``--model`` is one of three things: a model shipped inside the package (:data:`SHIPPED_MODELS`), a local
pipeline folder, or a Hugging Face hub id (``org/name``). :func:`check_model_name` refuses anything else in
one line that lists the shipped names, without a network attempt; :func:`hub_unreachable` tells, from a
failed load, whether the hub could not be reached, so that the message says that rather than an errno.
"""

from __future__ import annotations

import difflib
import re
import socket
from pathlib import Path

from .errors import UserError

SHIPPED_MODELS: tuple[str, ...] = ("shapes-mmdit", "shapes-pixart", "textures-mmdit")
"""The models shipped inside the package (``catprune/models/<name>``), loaded offline by name."""

MODEL_NOTES: dict[str, str] = {
    "textures-mmdit": "textures-mmdit is a test bed for sampling paths that bend like a real model's, not a "
    "drawing model: it draws few scenes as asked (1.6% of held-out captions fully right; objects are often "
    "misplaced, missing or off-colour, backdrops mottled); see docs/results-textures.md",
}
"""What a shipped model is and is not, said where it is used (``generate`` prints it, its help shows it)."""

ARCHITECTURE_NAMES: tuple[str, ...] = (
    "sd3-medium", "sd3.5-medium", "sd3.5-large", "pixart-sigma", "pixart-alpha", "flux-dev", "flux-schnell",
    "chroma", "qwen-image", "flux2-dev", "flux2-klein", "z-image", "z-image-turbo",
    "flux3", "flux3-distilled", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.1-i2v-14b", "wan2.2-a14b",
    "hunyuanvideo-1.5",
)  # fmt: skip
"""The named architectures of ``catprune.architectures.ARCHITECTURES`` (``macs``, ``bench``), in its order."""
STRATEGY_NAMES: tuple[str, ...] = ("cat", "noise", "noise+balance", "rows", "random", "at-edm")
"""The token-choice strategies that ``catprune.strategies`` registers, in its order."""
METHOD_ORDER: tuple[str, ...] = (
    "full", "cat", "at-edm", "noise", "noise+balance", "rows", "random", "fewer-steps",
)  # fmt: skip
"""``catprune eval``'s table rows: the method, its baseline, its ablations (Fig. 4, Fig. 6), chance, fewer
steps."""
SOLVER_NAMES: tuple[str, ...] = ("euler", "unipc", "dpm++2m", "heun")
"""The solvers ``catprune frontier`` compares (``catprune.peers.SOLVERS``)."""
PEER_SWEEPS: dict[str, tuple[str, tuple[float, ...]]] = {
    "fbc": ("threshold", (0.03, 0.06, 0.12, 0.24, 0.48)),
    "taylorseer": ("interval", (2, 3, 4, 6)),
    "taylorseer-blocks": ("interval", (2, 3, 4, 6)),
    "taylorseer-lite": ("interval", (2, 3, 4, 6)),
    "magcache": ("threshold", (0.02, 0.06, 0.12, 0.24, 0.5)),
    "fastercache": ("interval", (2, 3, 4)),
    "pab": ("interval", (2, 3, 4, 6)),
}
"""diffusers' caches that ``frontier --peers`` sweeps (``catprune.peers.CACHES``): the knob and its default
values, chosen to span about 0.3x-0.9x of the reference's MACs."""
DTYPE_NAMES: tuple[str, ...] = ("float32", "float16", "bfloat16")
"""The torch dtypes a command takes by name (``catprune.runtime.DTYPES``)."""
COMPILE_MODES: tuple[str, ...] = ("none", "regional", "full")
"""How ``bench`` compiles the transformer: not, block by block, or whole."""
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
"""The CLIP model of ``eval``'s CLIP score on real models."""
AUTO_CLIP = "auto"
"""``--clip-model``'s default (``catprune.evaluation.resolve_clip_model``)."""

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9_.][\w.-]{0,95}$")
"""A hub repository id: ``org/name``, each part letters, digits, ``_``, ``.`` and ``-``."""

NETWORK_ERROR_NAMES = ("ConnectError", "ConnectionError", "ConnectTimeout", "NetworkError", "Timeout")
"""Exception classes (by name, so that no HTTP library is imported) that say a host could not be reached."""


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a hub id (``org/name``); nothing is looked up."""
    return bool(HUB_ID.match(name)) and ".." not in name and "--" not in name


def shipped_list() -> str:
    return ", ".join(SHIPPED_MODELS)


def check_model_name(model: str | Path) -> None:
    """Return if ``model`` is a shipped model, an existing path or a hub id; else a :class:`UserError` that
    says what it is not and lists the shipped names (with the closest one, when one is close)."""
    name = str(model)
    if name in SHIPPED_MODELS or Path(name).expanduser().exists() or is_hub_id(name):
        return
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name:
        raise UserError(
            f"model {name!r}: no such folder; give a pipeline folder that exists, a hub id (org/name) or a "
            f"shipped model ({shipped_list()})"
        )
    close = difflib.get_close_matches(name, SHIPPED_MODELS, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise UserError(
        f"unknown model {name!r}: not a shipped model ({shipped_list()}), not a folder, and not a hub id "
        f"(org/name){hint}"
    )


def hub_unreachable(error: BaseException) -> str | None:
    """If ``error`` (or an error it wraps) says the hub could not be reached, what was wrong, in a few
    words; None otherwise (the hub answered: the model does not exist, is gated, has no pipeline...)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        names = {cls.__name__ for cls in type(current).__mro__}
        if isinstance(current, socket.gaierror):
            return f"the host name could not be resolved ({current})"
        if "OfflineModeIsEnabled" in names:
            return "offline mode is on (HF_HUB_OFFLINE)"
        if isinstance(current, (ConnectionError, TimeoutError)) or names & set(NETWORK_ERROR_NAMES):
            return str(current).strip() or type(current).__name__
        current = current.__cause__ or current.__context__
    return None
