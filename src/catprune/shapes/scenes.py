"""Procedural "shapes" text-to-image data: scenes, renderer, caption grammar and splits.

A scene is a plain background with one or two coloured shapes, each centred in a different cell
of a 3x3 grid. Everything is a pure function of the scene (rendering, caption) or of a seed
(sampling), so datasets can be regenerated bit-for-bit instead of being stored.

Caption grammar (one fixed phrase per position)::

    caption  := object ("and" object)* "on a" BACKGROUND "background"
    object   := "a" SIZE COLOUR SHAPE PHRASE
    PHRASE   := "at the top left" | "at the top" | "at the top right" | "on the left" | "in the center"
              | "on the right" | "at the bottom left" | "at the bottom" | "at the bottom right"

Training captions list their objects in position order, and the models read only that order, so
user prompts go through ``normalize_prompt``: it accepts the objects in any order and refuses
anything else the models were never trained on, with a one-line ``PromptGrammarError``.

Composition split: the colour-shape pairs in ``HELDOUT_PAIRS`` never occur in training scenes; a
scene is held-out as soon as one of its objects uses such a pair.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Split = Literal["train", "heldout"]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
BACKGROUNDS: tuple[str, ...] = ("white", "black", "gray")
# Most objects in a dataset scene (``sample_scene``); the models never saw a caption with more.
MAX_OBJECTS = 2

# Saturated colours at least 105 RGB units from each other and 140 from every background, so the
# checker's colour lookup survives noise and blur (see checker.py).
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (20, 170, 50),
    "blue": (30, 70, 235),
    "yellow": (240, 230, 30),
    "purple": (160, 30, 230),
    "orange": (255, 130, 0),
}
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}

POSITION_PHRASES: dict[str, str] = {
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}
_PHRASE_POSITIONS: dict[str, str] = {phrase: pos for pos, phrase in POSITION_PHRASES.items()}

# Object side as a fraction of the image side (10 and 6 px at 32x32). A grid cell is 1/3 of the
# side, so two large objects in adjacent cells keep a gap of at least one pixel.
SIZE_EXTENT: dict[str, float] = {"small": 0.2, "large": 0.3}

# Each colour is held out with exactly one shape and each shape with exactly two colours, so every
# colour and every shape is still seen in training (with 2 and 4 partners respectively).
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "triangle"),
        ("green", "square"),
        ("blue", "circle"),
        ("yellow", "triangle"),
        ("purple", "circle"),
        ("orange", "square"),
    }
)

VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        {"a", "and", "on", "background"}
        | {w for phrase in POSITION_PHRASES.values() for w in phrase.split()}
        | set(SHAPES)
        | set(COLOURS)
        | set(SIZES)
        | set(BACKGROUNDS)
    )
)


def check_member(kind: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; expected one of {', '.join(allowed)}")


@dataclass(frozen=True)
class ShapeObject:
    """One coloured shape centred in a 3x3 grid cell."""

    shape: str
    colour: str
    size: str
    position: str

    def __post_init__(self) -> None:
        check_member("shape", self.shape, SHAPES)
        check_member("colour", self.colour, COLOURS)
        check_member("size", self.size, SIZES)
        check_member("position", self.position, POSITIONS)

    @property
    def is_heldout(self) -> bool:
        return (self.colour, self.shape) in HELDOUT_PAIRS

    def sort_key(self) -> tuple[int, int, int, int]:
        return (
            POSITIONS.index(self.position),
            COLOURS.index(self.colour),
            SHAPES.index(self.shape),
            SIZES.index(self.size),
        )


@dataclass(frozen=True)
class Scene:
    """A background plus objects, stored in canonical (position) order so equal scenes compare equal.

    Dataset scenes have 1 to ``MAX_OBJECTS`` objects in distinct cells; the class itself does not enforce
    that because the checker also describes imperfect generated images with it.
    """

    background: str
    objects: tuple[ShapeObject, ...]

    def __post_init__(self) -> None:
        check_member("background", self.background, BACKGROUNDS)
        object.__setattr__(self, "objects", tuple(sorted(self.objects, key=ShapeObject.sort_key)))

    @property
    def is_heldout(self) -> bool:
        return any(obj.is_heldout for obj in self.objects)


def _round(x: float) -> int:
    return int(np.floor(x + 0.5))


def cell_center(position: str, size: int = 32) -> tuple[int, int]:
    """(y, x) of a cell's centre, snapped to a pixel corner so a shape renders identically in every cell."""
    row, col = divmod(POSITIONS.index(position), 3)
    return _round((row + 0.5) * size / 3), _round((col + 0.5) * size / 3)


def object_side(size_name: str, image_size: int = 32) -> int:
    """Side of an object's bounding box in pixels.

    Even, so the shape is symmetric about its centre, and capped so that objects in adjacent cells
    keep at least a one-pixel gap (rounding at odd image sizes could otherwise close it).
    """
    centres = [_round((k + 0.5) * image_size / 3) for k in range(3)]
    spacing = min(centres[1] - centres[0], centres[2] - centres[1])
    return min(2 * _round(SIZE_EXTENT[size_name] * image_size / 2), 2 * ((spacing - 1) // 2))


def object_mask(obj: ShapeObject, size: int = 32) -> np.ndarray:
    """Boolean (size, size) mask of the object's pixels (crisp, no anti-aliasing)."""
    cy, cx = cell_center(obj.position, size)
    half = object_side(obj.size, size) / 2
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    dy, dx = ys - cy, xs - cx
    if obj.shape == "circle":
        # A radius a quarter pixel short of the box keeps small circles from becoming rounded squares.
        return dy**2 + dx**2 <= (half - 0.25) ** 2
    if obj.shape == "square":
        return (np.abs(dy) <= half) & (np.abs(dx) <= half)
    # Upward isosceles triangle filling the box. Widths are measured at each row's lower edge so the
    # apex row is not empty; rows then widen by 2 px every 2 rows.
    rel = (dy + 0.5 + half) / (2 * half)  # 1/(2*half) on the apex row, 1 on the base row
    return (np.abs(dy) <= half) & (np.abs(dx) <= rel * half)


def objects_mask(objects: Sequence[ShapeObject], size: int) -> np.ndarray:
    """Boolean (size, size) mask of all the objects' pixels: what a caption decides."""
    mask = np.zeros((size, size), dtype=bool)
    for obj in objects:
        mask |= object_mask(obj, size)
    return mask


def render(scene: Scene, size: int = 32) -> np.ndarray:
    """Render a scene as a (size, size, 3) uint8 RGB image."""
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUND_RGB[scene.background]
    for obj in scene.objects:
        image[object_mask(obj, size)] = COLOUR_RGB[obj.colour]
    return image


def object_phrase(obj: ShapeObject) -> str:
    return f"a {obj.size} {obj.colour} {obj.shape} {POSITION_PHRASES[obj.position]}"


def caption(scene: Scene) -> str:
    """Describe a scene in the caption grammar (objects in canonical position order)."""
    if not scene.objects:
        raise ValueError("a scene needs at least one object to be captioned")
    objects = " and ".join(object_phrase(obj) for obj in scene.objects)
    return f"{objects} on a {scene.background} background"


OBJECT_SLOTS: dict[str, tuple[str, ...]] = {
    "SIZE": SIZES,
    "COLOUR": COLOURS,
    "SHAPE": SHAPES,
    "POSITION": tuple(POSITION_PHRASES[p] for p in POSITIONS),
}
"""The words of an object phrase ``a SIZE COLOUR SHAPE POSITION``, by slot (shared by every grammar)."""


OBJECT_PATTERN = "a " + " ".join(OBJECT_SLOTS)


def caption_pattern(backdrop: str) -> str:
    """The caption grammar in one pattern: up to MAX_OBJECTS objects, then ``on a {backdrop} background``."""
    return (
        f"{OBJECT_PATTERN} " + f"[and {OBJECT_PATTERN}] " * (MAX_OBJECTS - 1) + f"on a {backdrop} background"
    )


def grammar_line(pattern: str, example: str, slots: dict[str, tuple[str, ...]]) -> str:
    """A grammar in one line, for errors: its pattern, an example and every slot's words."""
    return f'expected: {pattern}, e.g. "{example}"; ' + "; ".join(
        f"{slot}: {'|'.join(words)}" for slot, words in slots.items()
    )


_EXAMPLE = caption(Scene(BACKGROUNDS[0], (ShapeObject(SHAPES[0], COLOURS[0], SIZES[-1], POSITIONS[0]),)))
_SLOTS = {**OBJECT_SLOTS, "BACKGROUND": BACKGROUNDS}
_PATTERN = caption_pattern("BACKGROUND")
_GRAMMAR_LINE = grammar_line(_PATTERN, _EXAMPLE, _SLOTS)

GRAMMAR_HELP: str = "\n".join(
    [
        "Prompts follow the caption grammar the shapes models were trained on:",
        f"  {_PATTERN}",
        f"with 1 to {MAX_OBJECTS} objects at different positions, in any order; case, extra spaces and",
        f'a final period are ignored. Example: "{_EXAMPLE}"',
        # No-break spaces inside each alternative keep textwrap from splitting a phrase across lines.
        *(
            textwrap.fill(
                " | ".join(w.replace(" ", "\xa0") for w in words),
                width=100,
                initial_indent=f"  {slot + ':':12}",
                subsequent_indent=" " * 14,
            ).replace("\xa0", " ")
            for slot, words in _SLOTS.items()
        ),
    ]
)
"""The prompt grammar and its vocabulary for a CLI's help; print it verbatim (argparse needs
``RawDescriptionHelpFormatter`` to keep its line breaks in a description or epilog)."""


class PromptGrammarError(ValueError):
    """A prompt outside the grammar, which the models would draw wrong without saying so.

    ``str()`` is one line, the problem (``args[0]``) and then the grammar with an example, so that a
    CLI can print it as its whole error.
    """

    def __str__(self) -> str:
        return f"{super().__str__()}; {_GRAMMAR_LINE}"


def _parse_object(words: list[str]) -> ShapeObject:
    if not words:
        raise ValueError("missing object before 'and' or 'on a ... background'")
    text = " ".join(words)
    if len(words) < 5 or words[0] != "a":
        raise ValueError(f"expected an object '{OBJECT_PATTERN}', got {text!r}")
    size, colour, shape = words[1:4]
    # Checked here in word order, not left to ShapeObject, so a swap is reported at its first word.
    for slot, word in zip(("SIZE", "COLOUR", "SHAPE"), (size, colour, shape), strict=True):
        if word not in _SLOTS[slot]:
            raise ValueError(f"{word!r} is not a {slot} in {text!r}")
    phrase = " ".join(words[4:])
    if phrase not in _PHRASE_POSITIONS:
        raise ValueError(f"unknown position phrase {phrase!r} in {text!r}")
    return ShapeObject(shape=shape, colour=colour, size=size, position=_PHRASE_POSITIONS[phrase])


def scene_from_words(words: list[str]) -> Scene:
    """The grammar shared by ``parse_caption`` and ``normalize_prompt``, on lower-case known words."""
    if len(words) < 4 or words[-4:-2] != ["on", "a"] or words[-1] != "background":
        raise ValueError("missing background: the text must end with 'on a BACKGROUND background'")
    check_member("background", words[-2], BACKGROUNDS)
    chunks: list[list[str]] = [[]]
    for word in words[:-4]:
        if word == "and":
            chunks.append([])
        else:
            chunks[-1].append(word)
    return Scene(background=words[-2], objects=tuple(_parse_object(chunk) for chunk in chunks))


def parse_caption(text: str) -> Scene:
    """Inverse of ``caption``: ``parse_caption(caption(s)) == s`` for every scene ``s``.

    Case and surrounding whitespace are ignored; anything else outside the grammar raises ValueError.
    Any number of objects, even in one cell, is accepted because the checker scores imperfect scenes
    too; prompts for the models go through the stricter ``normalize_prompt``.
    """
    words = text.lower().split()
    unknown = sorted({w for w in words if w not in VOCABULARY})
    if unknown:
        raise ValueError(f"unknown word(s) {unknown} in {text!r}; vocabulary: {' '.join(VOCABULARY)}")
    return scene_from_words(words)


def normalize_prompt(text: str) -> str:
    """The canonical caption of a prompt, so the models see objects in the only order they were trained on.

    Objects may come in any order; case, extra whitespace and a final period are ignored. Anything
    the models cannot draw (outside the grammar, more than ``MAX_OBJECTS`` objects, two objects in one
    cell) raises PromptGrammarError instead of being drawn wrong.
    """
    words = text.strip().removesuffix(".").lower().split()
    if not words:
        raise PromptGrammarError("empty prompt")
    unknown = [w for w in dict.fromkeys(words) if w not in VOCABULARY]
    if unknown:
        raise PromptGrammarError(f"unknown word(s) {', '.join(map(repr, unknown))}")
    try:
        scene = scene_from_words(words)
    except ValueError as error:
        raise PromptGrammarError(str(error)) from error
    if len(scene.objects) > MAX_OBJECTS:
        raise PromptGrammarError(f"too many objects: {len(scene.objects)}, at most {MAX_OBJECTS}")
    positions = [obj.position for obj in scene.objects]
    for position in positions:
        if positions.count(position) > 1:
            raise PromptGrammarError(f"two objects at the same position ({POSITION_PHRASES[position]})")
    return caption(scene)


def random_object(rng: np.random.Generator, position: str) -> ShapeObject:
    return ShapeObject(
        shape=SHAPES[rng.integers(len(SHAPES))],
        colour=COLOURS[rng.integers(len(COLOURS))],
        size=SIZES[rng.integers(len(SIZES))],
        position=position,
    )


def sample_scene(rng: np.random.Generator, split: Split) -> Scene:
    """Draw a scene of ``split`` uniformly, given its object count (1 to ``MAX_OBJECTS``, equally likely).

    Rejection sampling keeps the draw uniform over the split's valid scenes: objects are drawn from
    all attribute combinations and the scene is redrawn until its held-out status matches ``split``.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    n_objects = 1 + int(rng.integers(MAX_OBJECTS))
    while True:
        cells = rng.choice(len(POSITIONS), size=n_objects, replace=False)
        scene = Scene(
            background=BACKGROUNDS[rng.integers(len(BACKGROUNDS))],
            objects=tuple(random_object(rng, POSITIONS[c]) for c in cells),
        )
        if scene.is_heldout == (split == "heldout"):
            return scene


def sample_scenes(n: int, seed: int, split: Split) -> list[Scene]:
    """``n`` scenes of ``split``, a pure function of ``seed``."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, split) for _ in range(n)]


def make_dataset(n: int, seed: int, split: Split, size: int = 32) -> tuple[np.ndarray, list[str]]:
    """Images (n, size, size, 3) uint8 and their captions, deterministic by ``seed``."""
    scenes = sample_scenes(n, seed, split)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, scene in enumerate(scenes):
        images[i] = render(scene, size)
    return images, [caption(scene) for scene in scenes]


def object_masks(n: int, seed: int, split: Split, size: int = 32) -> np.ndarray:
    """The objects' masks (n, size, size) of ``make_dataset(n, seed, split, size)``'s images."""
    return np.stack([objects_mask(scene.objects, size) for scene in sample_scenes(n, seed, split)])


def heldout_captions(n: int, seed: int = 0) -> list[str]:
    """Captions of held-out scenes for evaluation; equal to ``make_dataset(n, seed, "heldout")[1]``."""
    return [caption(scene) for scene in sample_scenes(n, seed, "heldout")]
