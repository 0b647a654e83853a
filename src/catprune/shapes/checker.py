"""Alignment checker: recover a shapes scene from pixels alone and score an image against a caption.

Plain image analysis, no learned model, so the score means the same thing for every generator:

1. the background is the palette background nearest to the per-channel median (objects cover well
   under half of the image);
2. every pixel is modelled as a mix of the background and one object colour, which is what blur and
   anti-aliasing produce at edges: its colour is the background-to-colour ray it lies closest to
   (none if farther than ``MAX_COLOUR_DISTANCE``) and its coverage is how far along that ray it sits;
3. pixels at least half covered are "solid" and form 4-connected components per colour; components
   smaller than ``MIN_AREA_FRACTION`` of the image are dropped as noise, and components of one colour
   whose centroids share a grid cell are merged (an object torn apart by noise is still one object);
4. position is the grid cell of the centroid and size the bounding-box side (the half-coverage
   contour keeps straight edges in place under blur). Every shape fills a square box: a triangle
   (apex up) has far fewer solid pixels in the top half of that box than in the bottom half, and a
   square's coverage mass, which blur conserves, fills the box while a circle's does not.

All thresholds are fractions of the image side or area, so any resolution from 32x32 up works
(an upscaled 32x32 image gives the same answer).

Textures captions (``textures``: the same objects on muted textured backdrops) are read by the same
steps with two changes, since no single background colour exists there: colours are measured in
the chroma plane (each pixel minus its grey level, each palette colour minus its own), where every
backdrop pixel lies within ``MAX_BACKDROP_CHROMA`` of the origin and every object colour far
from it; and an object's mass is its count of solid pixels, because its fill is shaded and the
backdrop around it has a chroma of its own. The backdrop itself (tone, pattern) is not read.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .scenes import (
    BACKGROUND_RGB,
    BACKGROUNDS,
    COLOUR_RGB,
    COLOURS,
    POSITIONS,
    SIZE_EXTENT,
    Scene,
    ShapeObject,
    parse_caption,
)
from .textures import PATTERNS, TexturedScene
from .textures import parse_caption as parse_textured_caption

_OBJECT_RGB = np.array([COLOUR_RGB[name] for name in COLOURS], np.float32)
_OBJECT_CHROMA = _OBJECT_RGB - _OBJECT_RGB.mean(axis=1, keepdims=True)

# Every palette colour is >= 78 RGB units from the other colours' background-to-colour rays.
MAX_COLOUR_DISTANCE = 60.0
# The smallest object covers ~2.3% of the image (24 px at 32x32); blobs under 0.8% are noise.
MIN_AREA_FRACTION = 0.008
# Bounding-box side / image side: small objects are 0.2, large ones 0.3.
LARGE_EXTENT = (SIZE_EXTENT["small"] + SIZE_EXTENT["large"]) / 2
# Solid pixels in the top / bottom half of the box: 0.43-0.5 for a triangle, 1 for circles and squares.
TRIANGLE_BALANCE = 0.75
# Coverage mass / bounding-box area: about 1 for a square, 0.67-0.79 for a circle.
SQUARE_FILL = 0.87
# Margin around the bounding box, as a fraction of the image side, over which coverage is summed.
MASS_MARGIN = 1 / 32

ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "size", "position")

_MATCH_RULES = (
    lambda want, got: want.colour == got.colour and want.position == got.position,
    lambda want, got: want.position == got.position,
    lambda want, got: want.colour == got.colour,
)


def _as_pixels(image: np.ndarray) -> np.ndarray:
    pixels = np.asarray(image, dtype=np.float32)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {pixels.shape}")
    return pixels


def _background(pixels: np.ndarray) -> str:
    median = np.median(pixels.reshape(-1, 3), axis=0)
    return min(BACKGROUNDS, key=lambda name: float(np.linalg.norm(median - BACKGROUND_RGB[name])))


def _colour_layers(offset: np.ndarray, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per object colour: each pixel's coverage (H, W, n_colours) and whether it is solidly that colour.

    ``offset`` is each pixel's and ``directions`` each object colour's offset from the background
    (shapes: the background colour; textures: the grey axis). Coverage is the unclipped position
    along the background-to-colour line, so noise averages out when it is summed. A pixel is solid
    for the colour whose ray (coverage >= 0) passes closest to it, if that ray is within
    ``MAX_COLOUR_DISTANCE`` and the pixel is at least half covered.
    """
    coverage = offset @ directions.T / (directions**2).sum(axis=1)
    residual = np.linalg.norm(offset[..., None, :] - np.maximum(coverage, 0)[..., None] * directions, axis=-1)
    nearest = residual.argmin(axis=-1)[..., None] == np.arange(len(COLOURS))
    solid = nearest & (residual <= MAX_COLOUR_DISTANCE) & (coverage >= 0.5)
    return coverage, solid


def _label_components(mask: np.ndarray) -> np.ndarray:
    """Label 4-connected components of ``mask`` (-1 elsewhere) by spreading the largest pixel index."""
    labels = np.where(mask, np.arange(mask.size).reshape(mask.shape), -1)
    while True:
        grown = labels.copy()
        np.maximum(grown[1:], labels[:-1], out=grown[1:])
        np.maximum(grown[:-1], labels[1:], out=grown[:-1])
        np.maximum(grown[:, 1:], labels[:, :-1], out=grown[:, 1:])
        np.maximum(grown[:, :-1], labels[:, 1:], out=grown[:, :-1])
        grown[~mask] = -1
        if np.array_equal(grown, labels):
            return labels
        labels = grown


def _cell(blob: np.ndarray) -> int:
    """Index into ``POSITIONS`` of the grid cell holding the centroid of a boolean mask."""
    ys, xs = np.nonzero(blob)
    row = min(int((ys.mean() + 0.5) * 3 / blob.shape[0]), 2)
    col = min(int((xs.mean() + 0.5) * 3 / blob.shape[1]), 2)
    return 3 * row + col


def _shape(ys: np.ndarray, side: int, mass: float) -> str:
    """Classify an object from the rows of its solid pixels, its box side and its coverage mass.

    Every shape fills a square box whose bottom edge and width survive blur (a triangle's apex does
    not), so the box is rebuilt upwards from the bottom edge before comparing its two halves.
    """
    middle = ys.max() + 1 - side / 2
    top, bottom = np.count_nonzero(ys + 0.5 < middle), np.count_nonzero(ys + 0.5 > middle)
    if top < TRIANGLE_BALANCE * bottom:
        return "triangle"
    return "square" if mass >= SQUARE_FILL * side**2 else "circle"


def _describe(blob: np.ndarray, coverage: np.ndarray, colour: str) -> ShapeObject:
    """Describe one object from its solid mask and its coverage map (other objects zeroed)."""
    height, width = blob.shape
    ys, xs = np.nonzero(blob)
    side = max(np.ptp(ys), np.ptp(xs)) + 1
    pad = max(1, round(MASS_MARGIN * min(height, width)))
    top, left = max(ys.min() - pad, 0), max(xs.min() - pad, 0)
    window = coverage[top : ys.max() + pad + 1, left : xs.max() + pad + 1]
    return ShapeObject(
        shape=_shape(ys, side, float(window.sum())),
        colour=colour,
        size="large" if side / min(height, width) > LARGE_EXTENT else "small",
        position=POSITIONS[_cell(blob)],
    )


def _colour_objects(
    solid: np.ndarray, coverage: np.ndarray, occupied: np.ndarray, colour: str
) -> list[ShapeObject]:
    """Objects of one colour: big enough components of its solid pixels, merged per grid cell.

    ``occupied`` marks every solid pixel of any colour; those of other objects are zeroed in an
    object's coverage so that neighbours do not leak into its mass.
    """
    labels = _label_components(solid)
    ids, areas = np.unique(labels[labels >= 0], return_counts=True)
    by_cell: dict[int, list[np.ndarray]] = {}
    for label in ids[areas >= MIN_AREA_FRACTION * solid.size]:
        blob = labels == label
        by_cell.setdefault(_cell(blob), []).append(blob)
    objects = []
    for blobs in by_cell.values():
        blob = np.logical_or.reduce(blobs)
        objects.append(_describe(blob, np.where(occupied & ~blob, 0.0, coverage), colour))
    return objects


def _objects(coverage: np.ndarray, solid: np.ndarray) -> tuple[ShapeObject, ...]:
    occupied = solid.any(axis=-1)
    return tuple(
        obj
        for index, colour in enumerate(COLOURS)
        if solid[..., index].any()
        for obj in _colour_objects(solid[..., index], coverage[..., index], occupied, colour)
    )


def detect(image: np.ndarray) -> Scene:
    """Recover the scene (background and objects, in position order) drawn in an (H, W, 3) uint8 image."""
    pixels = _as_pixels(image)
    background = _background(pixels)
    rgb = np.array(BACKGROUND_RGB[background], np.float32)
    coverage, solid = _colour_layers(pixels - rgb, _OBJECT_RGB - rgb)
    return Scene(background=background, objects=_objects(coverage, solid))


def detect_on_texture(image: np.ndarray) -> TexturedScene:
    """Recover the objects of a textures image (position order); the backdrop is not read (None)."""
    pixels = _as_pixels(image)
    _, solid = _colour_layers(pixels - pixels.mean(axis=-1, keepdims=True), _OBJECT_CHROMA)
    return TexturedScene(None, _objects(solid.astype(np.float32), solid))


def _cell_distance(a: ShapeObject, b: ShapeObject) -> int:
    ra, ca = divmod(POSITIONS.index(a.position), 3)
    rb, cb = divmod(POSITIONS.index(b.position), 3)
    return abs(ra - rb) + abs(ca - cb)


class _HasObjects(Protocol):
    objects: tuple[ShapeObject, ...]


def match_objects(wanted: _HasObjects, found: _HasObjects) -> list[ShapeObject | None]:
    """Pair each wanted object with a distinct found object (None if none is left).

    Rules are applied in passes over all wanted objects: first same colour and position, then same
    position, then same colour (nearest cell first). Earlier passes win, so a correct object is never
    taken by a wrong one that happens to share its colour or cell.
    """
    remaining = list(found.objects)
    matches: list[ShapeObject | None] = [None] * len(wanted.objects)
    for rule in _MATCH_RULES:
        for i, want in enumerate(wanted.objects):
            if matches[i] is None:
                candidates = [got for got in remaining if rule(want, got)]
                if candidates:
                    matches[i] = min(candidates, key=lambda got, want=want: _cell_distance(want, got))
                    remaining.remove(matches[i])
    return matches


def score(image: np.ndarray, caption: str) -> dict[str, float | bool]:
    """Per-attribute agreement between an image and a caption in the shapes or textures grammar.

    Caption objects are paired with detected objects by ``match_objects`` (colour+position, then
    position, then colour). ``colour``, ``shape``, ``size`` and ``position`` are the fractions of
    caption objects whose match has that attribute right (an unmatched object counts as wrong for
    all four); ``background`` and ``count`` (as many objects detected as named) are booleans, and
    ``full`` is True only when everything is right, which also rules out extra objects. A textures
    caption (one ending in a backdrop PATTERN) has no ``background`` entry: the backdrop is not read.
    """
    result: dict[str, float | bool] = {}
    words = caption.lower().split()
    if len(words) >= 2 and words[-2] in PATTERNS:
        wanted, found = parse_textured_caption(caption), detect_on_texture(image)
    else:
        wanted, found = parse_caption(caption), detect(image)
        result["background"] = wanted.background == found.background
    matches = match_objects(wanted, found)
    for attribute in ATTRIBUTES:
        hits = [
            got is not None and getattr(got, attribute) == getattr(want, attribute)
            for want, got in zip(wanted.objects, matches, strict=True)
        ]
        result[attribute] = sum(hits) / len(hits)
    result["count"] = len(found.objects) == len(wanted.objects)
    result["full"] = bool(
        result.get("background", True) and result["count"] and all(result[a] == 1.0 for a in ATTRIBUTES)
    )
    return result
