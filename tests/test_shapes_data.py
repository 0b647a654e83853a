"""Tests for the procedural shapes dataset and its model-free alignment checker."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest

from catprune.shapes import (
    COLOURS,
    HELDOUT_PAIRS,
    POSITIONS,
    SHAPES,
    SIZES,
    VOCABULARY,
    Scene,
    ShapeObject,
    caption,
    detect,
    heldout_captions,
    make_dataset,
    object_mask,
    parse_caption,
    render,
    sample_scenes,
    score,
)

TWO_OBJECTS = Scene(
    background="white",
    objects=(
        ShapeObject(shape="circle", colour="red", size="large", position="top left"),
        ShapeObject(shape="square", colour="blue", size="small", position="bottom right"),
    ),
)


@pytest.fixture(scope="module")
def dataset() -> tuple[np.ndarray, list[Scene]]:
    """500 training and 500 held-out images with their ground-truth scenes."""
    train_images, train_captions = make_dataset(500, seed=11, split="train")
    heldout_images, heldout_caps = make_dataset(500, seed=12, split="heldout")
    scenes = [parse_caption(text) for text in train_captions + heldout_caps]
    return np.concatenate([train_images, heldout_images]), scenes


def _touches(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether mask ``b`` overlaps mask ``a`` or one of its 4-neighbours."""
    padded = np.pad(a, 1)
    grown = padded[1:-1, 1:-1] | padded[2:, 1:-1] | padded[:-2, 1:-1] | padded[1:-1, 2:] | padded[1:-1, :-2]
    return bool((grown & b).any())


def _accuracy(images: np.ndarray, scenes: list[Scene]) -> float:
    return float(np.mean([detect(image) == scene for image, scene in zip(images, scenes, strict=True)]))


def test_make_dataset_is_deterministic_by_seed() -> None:
    images, captions = make_dataset(32, seed=3, split="train")
    again_images, again_captions = make_dataset(32, seed=3, split="train")
    other_images, other_captions = make_dataset(32, seed=4, split="train")
    assert images.shape == (32, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, again_images)
    assert captions == again_captions
    assert captions != other_captions and not np.array_equal(images, other_images)
    assert heldout_captions(16, seed=5) == make_dataset(16, seed=5, split="heldout")[1]


def test_caption_grammar_examples() -> None:
    assert caption(TWO_OBJECTS) == (
        "a large red circle at the top left and a small blue square at the bottom right on a white background"
    )
    single = parse_caption("a small green triangle in the center on a black background")
    assert single == Scene("black", (ShapeObject("triangle", "green", "small", "center"),))
    phrases = {p: caption(Scene("gray", (ShapeObject("square", "red", "small", p),))) for p in POSITIONS}
    assert phrases["left"].startswith("a small red square on the left on")
    assert phrases["top"].startswith("a small red square at the top on")


def test_caption_parse_round_trip() -> None:
    for scene in sample_scenes(300, seed=0, split="train") + sample_scenes(300, seed=0, split="heldout"):
        text = caption(scene)
        assert parse_caption(text) == scene
        assert caption(parse_caption(text)) == text
        assert set(text.split()) <= set(VOCABULARY)
    assert list(VOCABULARY) == sorted(set(VOCABULARY))


def test_parse_rejects_text_outside_grammar() -> None:
    with pytest.raises(ValueError, match="vocabulary: a and at") as error:
        parse_caption("a large pink circle at the top on a white background")
    assert "'pink'" in str(error.value)
    with pytest.raises(ValueError, match="position phrase"):
        parse_caption("a large red circle on the top on a white background")
    with pytest.raises(ValueError, match="background"):
        parse_caption("a large red circle at the top")
    with pytest.raises(ValueError, match="shape"):
        ShapeObject(shape="hexagon", colour="red", size="large", position="top")


def test_splits_are_disjoint_and_cover_every_attribute() -> None:
    train, heldout = sample_scenes(1000, seed=1, split="train"), sample_scenes(1000, seed=1, split="heldout")
    train_pairs = {(o.colour, o.shape) for s in train for o in s.objects}
    assert not train_pairs & HELDOUT_PAIRS
    assert all(any((o.colour, o.shape) in HELDOUT_PAIRS for o in s.objects) for s in heldout)
    assert {c for c, _ in train_pairs} == set(COLOURS) and {s for _, s in train_pairs} == set(SHAPES)
    assert train_pairs | HELDOUT_PAIRS == set(itertools.product(COLOURS, SHAPES))
    for scenes in (train, heldout):
        two = np.mean([len(s.objects) == 2 for s in scenes])
        assert 0.45 < two < 0.55
        assert all(len({o.position for o in s.objects}) == len(s.objects) for s in scenes)


@pytest.mark.parametrize("size", [32, 37, 64])
def test_objects_in_different_cells_never_touch(size: int) -> None:
    masks = {
        (shape, position): object_mask(ShapeObject(shape, "red", "large", position), size)
        for shape, position in itertools.product(SHAPES, POSITIONS)
    }
    for (shape_a, pos_a), (shape_b, pos_b) in itertools.product(masks, repeat=2):
        if pos_a != pos_b:
            assert not _touches(masks[shape_a, pos_a], masks[shape_b, pos_b]), (
                shape_a,
                pos_a,
                shape_b,
                pos_b,
            )
    for shape, size_name in itertools.product(SHAPES, SIZES):
        assert object_mask(ShapeObject(shape, "red", size_name, "center"), size).any()


def test_checker_recovers_clean_renders(dataset: tuple[np.ndarray, list[Scene]]) -> None:
    images, scenes = dataset
    accuracy = _accuracy(images, scenes)
    print(f"checker exact-scene accuracy on {len(scenes)} clean images: {accuracy:.3f}")
    assert accuracy >= 0.98


def test_checker_is_robust_to_noise(dataset: tuple[np.ndarray, list[Scene]]) -> None:
    images, scenes = dataset
    noise = np.random.default_rng(0).normal(0.0, 8.0, images.shape)
    noisy = np.clip(images + noise, 0, 255).astype(np.uint8)
    accuracy = _accuracy(noisy, scenes)
    print(f"checker exact-scene accuracy on {len(scenes)} images with noise std 8: {accuracy:.3f}")
    assert accuracy >= 0.95


def test_checker_works_at_higher_resolution() -> None:
    for scene in sample_scenes(40, seed=2, split="train"):
        assert detect(render(scene, size=64)) == scene
        assert detect(render(scene).repeat(3, axis=0).repeat(3, axis=1)) == scene


def test_score_reports_per_attribute_agreement() -> None:
    image = render(TWO_OBJECTS)
    right = score(image, caption(TWO_OBJECTS))
    assert right == dict(
        background=True, colour=1.0, shape=1.0, size=1.0, position=1.0, count=True, full=True
    )

    red, blue = TWO_OBJECTS.objects
    wrong_colour = score(image, caption(replace(TWO_OBJECTS, objects=(replace(red, colour="green"), blue))))
    assert wrong_colour["colour"] == 0.5 and wrong_colour["shape"] == 1.0 and wrong_colour["position"] == 1.0
    assert wrong_colour["count"] and not wrong_colour["full"]

    moved = score(image, caption(replace(TWO_OBJECTS, objects=(red, replace(blue, position="bottom")))))
    assert moved["position"] == 0.5 and moved["colour"] == 1.0 and not moved["full"]

    extra = score(image, caption(Scene("black", (red,))))
    assert not extra["background"] and not extra["count"] and not extra["full"]
    assert extra["colour"] == extra["shape"] == extra["size"] == extra["position"] == 1.0

    one_wrong = score(render(Scene("white", (red,))), caption(Scene("white", (replace(red, colour="blue"),))))
    assert one_wrong["colour"] == 0.0 and one_wrong["position"] == 1.0 and one_wrong["count"]
