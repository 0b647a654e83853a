"""Procedural "textures" text-to-image data: shapes scenes on textured backdrops the caption does not fix.

The objects, their grammar, the 3x3 grid and the held-out colour-shape pairs are those of
``scenes`` (imported, not copied). What changes is everything around them, which the caption only
names: a backdrop pattern (stripes of random orientation, frequency, phase and sharpness; checks;
dots on a random lattice; a smooth 1/f^beta random field; a gradient), in a named or unnamed tone and
a random second tone of random contrast, with random luminance grain, small unnamed clutter, and
unnamed shading textures inside the objects.

Why: a toy whose image is fixed by its caption has nearly straight sampling paths, so any
approximation of the path looks free. Broad-spectrum, high-variance detail that the caption leaves
open is decided late in sampling, as in real images, which makes the paths bend (issue 16).

The backdrop is muted (chroma at most ``MAX_BACKDROP_CHROMA``, clutter greyish too) while every object
colour is saturated, so the checker can read the named objects by their chroma whatever the texture.

Caption grammar: that of ``scenes`` with a different background phrase::

    caption  := object ("and" object)* "on a" [TONE] PATTERN "background"

e.g. "a small red circle at the top on a gray striped background" or "... on a dotted background".
``parse_caption`` and ``normalize_prompt`` split off the backdrop phrase and hand the objects to
``scenes``' own parser, so object errors read the same; the vocabulary adds ``PATTERNS`` and the
tones that are not already shapes backgrounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scenes import (
    BACKGROUNDS,
    COLOUR_RGB,
    COLOURS,
    MAX_OBJECTS,
    OBJECT_SLOTS,
    POSITIONS,
    SHAPES,
    SIZES,
    PromptGrammarError,
    ShapeObject,
    Split,
    caption_pattern,
    check_member,
    grammar_line,
    object_mask,
    object_phrase,
    objects_mask,
    random_object,
    scene_from_words,
)
from .scenes import (
    VOCABULARY as SHAPES_VOCABULARY,
)
from .scenes import normalize_prompt as normalize_shapes_prompt

IMAGE_SIZE = 64
PATTERNS: tuple[str, ...] = ("striped", "checked", "dotted", "mottled", "graded")
# Muted tones (chroma <= 40): the shapes backgrounds softened, plus three tinted ones.
TONE_RGB: dict[str, tuple[int, int, int]] = {
    "white": (225, 225, 225),
    "black": (30, 30, 30),
    "gray": (128, 128, 128),
    "brown": (125, 95, 70),
    "beige": (205, 190, 160),
    "slate": (80, 95, 115),
}
TONES: tuple[str, ...] = tuple(TONE_RGB)
TONE_NAMED = 0.5
"""Share of captions that name the backdrop's main tone (the others leave it to chance)."""
MAX_BACKDROP_CHROMA = 40.0
"""Largest distance of a backdrop pixel from the grey axis, in RGB units, before clipping; object
colours are at least 112 from it (green), and 84 when shaded (``MAX_SHADING``)."""
MAX_SHADING = 0.25
"""Objects are darkened by up to this factor by their fill texture (chroma scales with it)."""
MAX_CLUTTER = 5

VOCABULARY: tuple[str, ...] = tuple(sorted(set(SHAPES_VOCABULARY) | set(PATTERNS) | set(TONES)))


@dataclass(frozen=True)
class Backdrop:
    """What a caption says about the background: its pattern and, optionally, its main tone."""

    pattern: str
    tone: str | None = None

    def __post_init__(self) -> None:
        check_member("pattern", self.pattern, PATTERNS)
        if self.tone is not None:
            check_member("tone", self.tone, TONES)

    @property
    def phrase(self) -> str:
        return f"on a {self.tone + ' ' if self.tone else ''}{self.pattern} background"


@dataclass(frozen=True)
class TexturedScene:
    """Objects (canonical position order, as in ``scenes.Scene``) on a backdrop.

    Only what the caption says; the texture's free parameters are drawn when rendering. The backdrop
    is None where it is unknown: the checker reads only the objects.
    """

    backdrop: Backdrop | None
    objects: tuple[ShapeObject, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(sorted(self.objects, key=ShapeObject.sort_key)))

    @property
    def is_heldout(self) -> bool:
        return any(obj.is_heldout for obj in self.objects)


def caption(scene: TexturedScene) -> str:
    """Describe a scene: ``scenes``' object phrases, then the backdrop phrase."""
    if not scene.objects:
        raise ValueError("a scene needs at least one object to be captioned")
    if scene.backdrop is None:
        raise ValueError("a scene needs a backdrop to be captioned")
    return f"{' and '.join(object_phrase(obj) for obj in scene.objects)} {scene.backdrop.phrase}"


def _split_backdrop(text: str) -> tuple[list[str], Backdrop]:
    """The object words (with a placeholder shapes background, for ``scenes``' parser) and the backdrop."""
    words = text.strip().removesuffix(".").lower().split()
    if len(words) < 4 or words[-1] != "background" or words[-2] not in PATTERNS:
        raise ValueError(
            "missing backdrop: the text must end with 'on a [TONE] PATTERN background'; "
            f"PATTERN: {'|'.join(PATTERNS)}, TONE: {'|'.join(TONES)}"
        )
    tone = words[-3] if words[-3] in TONES else None
    start = len(words) - (5 if tone else 4)
    if words[start : start + 2] != ["on", "a"]:
        raise ValueError(f"expected 'on a [TONE] PATTERN background' at the end of {text!r}")
    return [*words[:start], "on", "a", BACKGROUNDS[0], "background"], Backdrop(words[-2], tone)


def parse_caption(text: str) -> TexturedScene:
    """Inverse of ``caption``; errors as in ``scenes.parse_caption`` (ValueError)."""
    object_words, backdrop = _split_backdrop(text)
    unknown = sorted({w for w in object_words if w not in VOCABULARY})
    if unknown:
        raise ValueError(f"unknown word(s) {unknown} in {text!r}; vocabulary: {' '.join(VOCABULARY)}")
    return TexturedScene(backdrop, scene_from_words(object_words).objects)


def normalize_prompt(text: str) -> str:
    """The canonical caption of a textures prompt (objects in any order), or PromptGrammarError."""
    try:
        object_words, backdrop = _split_backdrop(text)
    except ValueError as error:
        raise PromptGrammarError(str(error)) from error
    shapes_caption = normalize_shapes_prompt(" ".join(object_words))
    objects = shapes_caption.removesuffix(f" on a {BACKGROUNDS[0]} background")
    return f"{objects} {backdrop.phrase}"


def sample_scene(rng: np.random.Generator, split: Split) -> TexturedScene:
    """A scene of ``split``, uniform over its valid object sets as in ``scenes.sample_scene``."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    n_objects = 1 + int(rng.integers(MAX_OBJECTS))
    tone = TONES[rng.integers(len(TONES))] if rng.random() < TONE_NAMED else None
    backdrop = Backdrop(PATTERNS[rng.integers(len(PATTERNS))], tone)
    while True:
        cells = rng.choice(len(POSITIONS), size=n_objects, replace=False)
        scene = TexturedScene(backdrop, tuple(random_object(rng, POSITIONS[c]) for c in cells))
        if scene.is_heldout == (split == "heldout"):
            return scene


# Orthonormal basis of the chroma plane (perpendicular to the grey axis).
_CHROMA_BASIS = np.array([[1, -1, 0], [1, 1, -2]], np.float32) / np.array([[2**0.5], [6**0.5]], np.float32)


def _muted(rng: np.random.Generator, level: float, chroma: float) -> np.ndarray:
    """An RGB colour of grey ``level`` tinted by up to ``chroma`` in a random hue."""
    hue = rng.uniform(0, 2 * np.pi)
    tint = rng.uniform(0, chroma) * (np.cos(hue) * _CHROMA_BASIS[0] + np.sin(hue) * _CHROMA_BASIS[1])
    return level + tint


def _random_field(rng: np.random.Generator, size: int, beta: float) -> np.ndarray:
    """Zero-mean, unit-variance periodic Gaussian field with a 1/f^beta power spectrum."""
    freq = np.fft.fftfreq(size) * size
    radius = np.hypot(freq[:, None], freq[None, :])
    radius[0, 0] = np.inf  # no mean
    spectrum = np.fft.fft2(rng.standard_normal((size, size))) * radius ** (-beta / 2)
    field = np.fft.ifft2(spectrum).real
    return (field / field.std()).astype(np.float32)


def _pattern(rng: np.random.Generator, pattern: str, size: int) -> np.ndarray:
    """Mixing weight in [0, 1] (size, size) of a pattern with freshly drawn orientation, scale and phase."""
    ys, xs = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size - 0.5
    angle = rng.uniform(0, np.pi)
    u, v = xs * np.cos(angle) + ys * np.sin(angle), -xs * np.sin(angle) + ys * np.cos(angle)
    sharpness = rng.uniform(1, 8)

    def square_wave(x: np.ndarray) -> np.ndarray:
        """From a sine (sharpness 1) to a square wave; clipped, as ``x`` may exceed [-1, 1]."""
        return np.clip(0.5 + 0.5 * np.tanh(sharpness * x) / np.tanh(sharpness), 0, 1)

    if pattern == "striped":
        cycles = rng.uniform(3, 12)
        return square_wave(np.sin(2 * np.pi * cycles * u + rng.uniform(0, 2 * np.pi)))
    if pattern == "checked":
        cycles = rng.uniform(1.5, 6)
        phase = rng.uniform(0, 2 * np.pi, 2)
        across = 3 * np.sin(2 * np.pi * cycles * u + phase[0])
        return square_wave(across * np.sin(2 * np.pi * cycles * v + phase[1]))
    if pattern == "dotted":
        cycles = size / rng.uniform(5, 14)
        phase = rng.uniform(0, 1, 2)
        du = (cycles * u + phase[0]) % 1 - 0.5
        dv = (cycles * v + phase[1]) % 1 - 0.5
        radius, softness = rng.uniform(0.15, 0.4), rng.uniform(0.02, 0.15)
        return np.clip((radius - np.hypot(du, dv)) / softness + 0.5, 0, 1)
    if pattern == "mottled":
        return 1 / (1 + np.exp(-rng.uniform(1, 4) * _random_field(rng, size, rng.uniform(2, 4))))
    return np.clip(0.5 + rng.uniform(0.8, 2.5) * (u + rng.uniform(-0.2, 0.2)), 0, 1)  # graded


def _backdrop(rng: np.random.Generator, backdrop: Backdrop, size: int) -> np.ndarray:
    """(size, size, 3) float RGB: two muted tones mixed by the pattern, luminance grain, clutter."""
    if backdrop.tone is None:
        first = _muted(rng, rng.uniform(20, 235), MAX_BACKDROP_CHROMA)
    else:
        first = np.array(TONE_RGB[backdrop.tone], np.float32) + rng.uniform(-15, 15)
    level = float(first.mean())
    contrast = rng.uniform(60, 220) * rng.choice([-1, 1])
    if not 0 <= level + contrast <= 255:
        contrast = -contrast
    second = _muted(rng, np.clip(level + contrast, 0, 255), MAX_BACKDROP_CHROMA)
    weight = _pattern(rng, backdrop.pattern, size)[..., None]
    image = first + weight * (second - first)
    image += rng.uniform(0, 20) * _random_field(rng, size, rng.uniform(1, 2.5))[..., None]
    ys, xs = np.mgrid[0:size, 0:size]
    for _ in range(rng.integers(MAX_CLUTTER + 1)):
        y, x = rng.uniform(0, size, 2)
        h, w = rng.uniform(1, 0.06 * size, 2)
        image[(np.abs(ys - y) <= h / 2) & (np.abs(xs - x) <= w / 2)] = _muted(rng, rng.uniform(0, 255), 20)
    return image


def render(scene: TexturedScene, texture_seed: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """Render a scene as (size, size, 3) uint8 RGB; ``texture_seed`` fixes all the caption leaves open."""
    rng = np.random.default_rng(texture_seed)
    image = _backdrop(rng, scene.backdrop, size)
    for obj in scene.objects:
        mask = object_mask(obj, size)
        shading = 1 - rng.uniform(0, MAX_SHADING) * _pattern(rng, PATTERNS[rng.integers(len(PATTERNS))], size)
        image[mask] = np.array(COLOUR_RGB[obj.colour], np.float32) * shading[mask][:, None]
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def sample_scenes(n: int, seed: int, split: Split) -> list[tuple[TexturedScene, int]]:
    """``n`` scenes of ``split`` with their texture seeds, a pure function of ``seed``.

    Captions do not depend on the image size or the renderer, since textures have their own seeds.
    """
    rng = np.random.default_rng(seed)
    return [(sample_scene(rng, split), int(rng.integers(1 << 62))) for _ in range(n)]


def make_dataset(n: int, seed: int, split: Split, size: int = IMAGE_SIZE) -> tuple[np.ndarray, list[str]]:
    """Images (n, size, size, 3) uint8 and their captions, deterministic by ``seed``."""
    draws = sample_scenes(n, seed, split)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, (scene, texture_seed) in enumerate(draws):
        images[i] = render(scene, texture_seed, size)
    return images, [caption(scene) for scene, _ in draws]


def object_masks(n: int, seed: int, split: Split, size: int = IMAGE_SIZE) -> np.ndarray:
    """The objects' masks (n, size, size) of ``make_dataset(n, seed, split, size)``'s images."""
    return np.stack([objects_mask(scene.objects, size) for scene, _ in sample_scenes(n, seed, split)])


def heldout_captions(n: int, seed: int = 0) -> list[str]:
    """Captions of held-out scenes for evaluation; equal to ``make_dataset(n, seed, "heldout")[1]``."""
    return [caption(scene) for scene, _ in sample_scenes(n, seed, "heldout")]


_TEXTURES_PATTERN = caption_pattern("[TONE] PATTERN")
_TEXTURES_EXAMPLE = caption(
    TexturedScene(
        Backdrop(PATTERNS[0], "gray"), (ShapeObject(SHAPES[0], COLOURS[0], SIZES[-1], POSITIONS[0]),)
    )
)
TEXTURES_GRAMMAR_LINE: str = grammar_line(
    _TEXTURES_PATTERN, _TEXTURES_EXAMPLE, {**OBJECT_SLOTS, "TONE": TONES, "PATTERN": PATTERNS}
)
"""The textures grammar in one line, for errors (as ``scenes``' ``PromptGrammarError`` shows its own)."""
TEXTURES_GRAMMAR_HELP: str = "\n".join(
    [
        "Prompts of textures-mmdit (64x64) follow the textures caption grammar: the same objects on a",
        "textured backdrop that the caption names (its pattern, optionally its main tone) but does not fix:",
        f"  {_TEXTURES_PATTERN}",
        f"with 1 to {MAX_OBJECTS} objects at different positions, in any order; case, extra spaces and",
        f'a final period are ignored. Example: "{_TEXTURES_EXAMPLE}"',
        "  SIZE, COLOUR, SHAPE, POSITION: as in the shapes grammar",
        f"  {'TONE:':12}{' | '.join(TONES)} (optional)",
        f"  {'PATTERN:':12}{' | '.join(PATTERNS)}",
    ]
)
"""The textures grammar for a CLI's help, after ``scenes.GRAMMAR_HELP`` (whose object slots it uses)."""
