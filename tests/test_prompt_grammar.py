"""Tests for normalising user prompts to the canonical caption the shapes models were trained on."""

from __future__ import annotations

import pytest

from catprune.shapes import (
    BACKGROUNDS,
    COLOURS,
    GRAMMAR_HELP,
    MAX_OBJECTS,
    POSITION_PHRASES,
    SHAPES,
    SIZES,
    PromptGrammarError,
    Scene,
    ShapeObject,
    caption,
    normalize_prompt,
    parse_caption,
    sample_scenes,
)

CANONICAL = (
    "a large yellow triangle at the top right and a small blue circle at the bottom left on a gray background"
)
REORDERED = (
    "a small blue circle at the bottom left and a large yellow triangle at the top right on a gray background"
)
PATTERN = (
    "expected: a SIZE COLOUR SHAPE POSITION [and a SIZE COLOUR SHAPE POSITION] on a BACKGROUND background"
)
EXAMPLE = '"a large red circle at the top left on a white background"'


def test_reordered_objects_normalise_to_the_canonical_caption() -> None:
    assert normalize_prompt(REORDERED) == CANONICAL
    expected = Scene(
        "gray",
        (
            ShapeObject("triangle", "yellow", "large", "top right"),
            ShapeObject("circle", "blue", "small", "bottom left"),
        ),
    )
    assert parse_caption(normalize_prompt(REORDERED)) == expected
    assert caption(expected) == CANONICAL


def test_canonical_captions_are_returned_unchanged() -> None:
    assert normalize_prompt(CANONICAL) == CANONICAL
    for scene in sample_scenes(200, seed=7, split="train") + sample_scenes(200, seed=7, split="heldout"):
        text = caption(scene)
        assert normalize_prompt(text) == text
        if len(scene.objects) == 2:
            first, second = text.removesuffix(f" on a {scene.background} background").split(" and ")
            swapped = f"{second} and {first} on a {scene.background} background"
            assert normalize_prompt(swapped) == text


@pytest.mark.parametrize(
    "prompt",
    [
        REORDERED.upper(),
        f"  {REORDERED}.  ",
        REORDERED.replace(" ", "   \t") + ".",
        f"\n{REORDERED} .",
    ],
)
def test_case_whitespace_and_final_period_are_ignored(prompt: str) -> None:
    assert normalize_prompt(prompt) == CANONICAL


@pytest.mark.parametrize(
    ("prompt", "problem"),
    [
        ("", "empty prompt"),
        ("  . ", "empty prompt"),
        ("red circle", "missing background"),
        ("a large red circle at the top left", "missing background"),
        ("circle red a large on a white background", "expected an object 'a SIZE COLOUR SHAPE POSITION'"),
        ("a large pink circle at the top on a white background", "unknown word(s) 'pink'"),
        ("a large red circle at the top on a grey background", "unknown word(s) 'grey'"),
        ("a large red circle at the top on a red background", "unknown background 'red'"),
        ("a red large circle at the top on a white background", "'red' is not a SIZE"),
        ("a large red circle on the top on a white background", "unknown position phrase 'on the top'"),
        ("on a white background", "missing object"),
        ("a large red circle at the top and on a white background", "missing object"),
        (
            "a large red circle at the top and a small blue square at the top on a white background",
            "two objects at the same position (at the top)",
        ),
        (
            "a large red circle at the top left and a small red circle on the left"
            " and a small red circle in the center on a white background",
            f"too many objects: 3, at most {MAX_OBJECTS}",
        ),
        (f"{CANONICAL}..", "unknown word(s) 'background.'"),
    ],
)
def test_refusals_name_the_problem_and_show_the_grammar_on_one_line(prompt: str, problem: str) -> None:
    with pytest.raises(PromptGrammarError) as error:
        normalize_prompt(prompt)
    message = str(error.value)
    assert isinstance(error.value, ValueError)
    assert "\n" not in message
    assert message.startswith(problem) and error.value.args[0].startswith(problem)
    assert f"{PATTERN}, e.g. {EXAMPLE}; SIZE: small|large;" in message
    assert f"COLOUR: {'|'.join(COLOURS)};" in message


def test_grammar_example_is_a_canonical_caption() -> None:
    example = EXAMPLE.strip('"')
    assert normalize_prompt(example) == example


def test_grammar_help_lists_every_word_of_the_vocabulary() -> None:
    assert EXAMPLE in GRAMMAR_HELP and "\n" in GRAMMAR_HELP
    help_words = set(GRAMMAR_HELP.split())
    for word in (*SIZES, *COLOURS, *SHAPES, *BACKGROUNDS):
        assert word in help_words
    for phrase in POSITION_PHRASES.values():
        assert phrase in GRAMMAR_HELP, phrase
