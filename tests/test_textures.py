"""The textures data set, the checker on textured images, and ``train-shapes --data textures``."""

from __future__ import annotations

import json
import signal
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from catprune.cli import main
from catprune.shapes import HELDOUT_PAIRS, object_mask, scenes, score, textures
from catprune.shapes.checker import detect_on_texture
from catprune.shapes.pipelines import load_shapes_pipeline
from catprune.shapes.text import MAX_WORDS
from catprune.shapes.training import TrainConfig, Trainer, batch, build_pipeline, flow_loss

PROMPT = (
    "a large red circle at the top left and a small blue square at the bottom right "
    "on a gray striped background"
)


def test_datasets_are_deterministic_by_seed() -> None:
    images, captions = textures.make_dataset(6, seed=3, split="train")
    again, same = textures.make_dataset(6, seed=3, split="train")
    other, _ = textures.make_dataset(6, seed=4, split="train")
    assert images.shape == (6, 64, 64, 3) and images.dtype == np.uint8
    assert np.array_equal(images, again) and captions == same
    assert not np.array_equal(images, other)
    assert textures.heldout_captions(6, seed=3) == textures.make_dataset(6, 3, "heldout")[1]


def test_splits_follow_the_shapes_held_out_pairs() -> None:
    for split, held_out in (("train", False), ("heldout", True)):
        for scene, _ in textures.sample_scenes(300, seed=0, split=split):
            pairs = {(obj.colour, obj.shape) for obj in scene.objects}
            assert bool(pairs & HELDOUT_PAIRS) == held_out
            assert 1 <= len(scene.objects) <= scenes.MAX_OBJECTS
            assert len({obj.position for obj in scene.objects}) == len(scene.objects)


def test_captions_parse_back_and_prompts_normalize() -> None:
    for scene, _ in textures.sample_scenes(200, seed=1, split="train"):
        text = textures.caption(scene)
        assert textures.parse_caption(text) == scene
        assert textures.normalize_prompt(text) == text
    swapped = (
        "A small blue square at the bottom right and a large red circle at the top left "
        "on a gray  striped background."
    )
    assert textures.normalize_prompt(swapped) == PROMPT
    unnamed = textures.parse_caption("a small red circle at the top on a dotted background")
    assert unnamed.backdrop == textures.Backdrop("dotted")
    assert set(scenes.VOCABULARY) < set(textures.VOCABULARY)
    longest = max(scenes.POSITION_PHRASES.values(), key=len)
    two = textures.TexturedScene(
        textures.Backdrop("striped", "white"),
        tuple(scenes.ShapeObject("circle", "red", "small", p) for p in ("bottom left", "bottom right")),
    )
    assert len(textures.caption(two).split()) <= MAX_WORDS and len(longest.split()) == 4
    for bad in (
        "a small red circle at the top on a white background",  # a shapes caption: no pattern
        "a small red circle on a striped background",
        "a red small circle at the top on a striped background",
        "a small red circle at the top on a striped pink background",
        "",
    ):
        with pytest.raises(scenes.PromptGrammarError):
            textures.normalize_prompt(bad)


def test_the_caption_does_not_fix_the_texture_and_the_backdrop_stays_muted() -> None:
    """Renders of one caption differ a lot; backdrops stay near the grey axis (the checker's premise)."""
    draws = textures.sample_scenes(40, seed=2, split="heldout")
    for scene, seed in draws:
        image = textures.render(scene, seed).astype(np.float32)
        objects = np.logical_or.reduce([object_mask(obj, 64) for obj in scene.objects])
        chroma = np.linalg.norm(image - image.mean(axis=-1, keepdims=True), axis=-1)
        assert chroma[~objects].max() <= textures.MAX_BACKDROP_CHROMA + 2
        other = textures.render(scene, seed + 1).astype(np.float32)
        assert np.abs(image - other)[~objects].mean() > 10
    # Broad, high-variance texture: the backdrop's pixel standard deviation, in [-1, 1] units.
    images = textures.make_dataset(64, seed=5, split="train")[0] / 127.5 - 1
    assert images.std(axis=(1, 2)).mean() > 0.2


def test_the_checker_reads_objects_on_textured_backgrounds() -> None:
    for scene, seed in textures.sample_scenes(100, seed=7, split="heldout"):
        image = textures.render(scene, seed)
        assert detect_on_texture(image).objects == scene.objects
        result = score(image, textures.caption(scene))
        assert result["full"] and "background" not in result
    wrong = score(textures.render(*textures.sample_scenes(1, 8, "heldout")[0]), PROMPT)
    assert not wrong["full"]


@pytest.fixture
def restore_sigterm():
    """``train-shapes`` turns SIGTERM into KeyboardInterrupt; give pytest its handler back."""
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


def test_train_shapes_on_textures_saves_a_64x64_pipeline(tmp_path: Path, restore_sigterm) -> None:
    tiny = ["train-shapes", "--data", "textures", "--arch", "mmdit", "--out", str(tmp_path)]
    tiny += ["--width", "32", "--layers", "1", "--batch-size", "2", "--no-bf16"]
    assert main([*tiny, "--steps", "2"]) == 0
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert state["config"]["data"] == "textures" and state["step"] == 2
    # Resuming without --data keeps the checkpoint's data set.
    assert main([*tiny[:1], *tiny[3:], "--steps", "3"]) == 0
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["config"]["data"] == "textures"
    pipe = load_shapes_pipeline(tmp_path / "pipeline")
    assert pipe.image_size == 64 and pipe.transformer.config.pos_embed_max_size == 32
    assert pipe.scheduler.config.shift == 3.0
    generator = torch.Generator().manual_seed(0)
    images = pipe(PROMPT, num_inference_steps=2, generator=generator, output_type="np").images
    assert images.shape == (1, 64, 64, 3)


@pytest.mark.parametrize("module", [scenes, textures], ids=["shapes", "textures"])
def test_object_masks_are_the_pixels_the_caption_decides(module) -> None:
    images, _ = module.make_dataset(24, seed=11, split="train")
    masks = module.object_masks(24, seed=11, split="train")
    assert masks.shape == images.shape[:3] and masks.any(axis=(1, 2)).all()

    def chroma(rgb: np.ndarray) -> np.ndarray:
        rgb = rgb.astype(np.float32)
        return np.linalg.norm(rgb - rgb.mean(axis=-1, keepdims=True), axis=-1)

    # Object pixels are saturated palette colours (shaded on textures), backdrop pixels are not.
    palette = np.array(list(scenes.COLOUR_RGB.values()))
    assert chroma(images)[masks].min() >= (1 - textures.MAX_SHADING) * chroma(palette).min()
    assert chroma(images)[~masks].max() <= textures.MAX_BACKDROP_CHROMA + 2


def test_object_weight_scales_object_pixels_and_keeps_the_loss_s_scale() -> None:
    plain = TrainConfig(data="textures", batch_size=4, steps=1)
    weighted = TrainConfig(data="textures", batch_size=4, steps=1, object_weight=10.0)
    assert batch(plain, 3)[3] is None
    weight = batch(weighted, 3)[3]
    masks = torch.from_numpy(textures.object_masks(4, 3, "train"))[:, None]
    assert weight.shape == (4, 1, 64, 64)
    torch.testing.assert_close(weight.mean(dim=(1, 2, 3)), torch.ones(4))
    for w, m in zip(weight, masks, strict=True):
        assert torch.allclose(w[m] / w[~m].max(), torch.tensor(10.0)) and w[~m].unique().numel() == 1
    # Uniform weights give exactly the unweighted loss.
    pipe = build_pipeline(TrainConfig(data="textures", width=32, layers=1, text_layers=1, steps=1))
    x0, captions, _, _ = batch(plain, 3)
    losses = [
        flow_loss(pipe, x0, captions, torch.Generator().manual_seed(5), w)
        for w in (None, torch.ones(4, 1, 64, 64))
    ]
    torch.testing.assert_close(losses[0], losses[1])
    with pytest.raises(ValueError, match="object_weight"):
        TrainConfig(steps=1, object_weight=0.0)


def test_a_resumed_run_can_start_weighting_objects(tmp_path: Path) -> None:
    tiny = {"data": "textures", "width": 32, "layers": 1, "text_layers": 1, "batch_size": 2, "bf16": False}
    Trainer(TrainConfig(**tiny, steps=1), tmp_path).run()
    resumed = Trainer(TrainConfig(**tiny, steps=2, object_weight=4.0), tmp_path)
    assert resumed.step == 1 and resumed.config.object_weight == 4.0
    resumed.run()
    # Resuming without a weight keeps the checkpoint's.
    assert Trainer(TrainConfig(**tiny, steps=3), tmp_path).config.object_weight == 4.0


def test_saved_configs_without_a_data_set_are_shapes_runs() -> None:
    saved = {k: v for k, v in asdict(TrainConfig(steps=1)).items() if k != "data"}
    assert TrainConfig(**saved).data == "shapes"


def test_viz_reads_prompts_in_the_model_s_grammar(tmp_path: Path, capsys) -> None:
    """``catprune viz`` defaults to textured scenes for a textures model, refuses other grammars' prompts."""
    from catprune.tools.viz import DEFAULT_PROMPTS, TEXTURES_DEFAULT_PROMPTS, default_prompts

    assert default_prompts("clusters", "textures") == list(TEXTURES_DEFAULT_PROMPTS)
    assert default_prompts("selection", "textures") == [TEXTURES_DEFAULT_PROMPTS[1]]
    assert all(textures.normalize_prompt(prompt) == prompt for prompt in TEXTURES_DEFAULT_PROMPTS)
    out = tmp_path / "clusters.png"
    argv = ["viz", "clusters", "--model", "textures-mmdit", "--out", str(out)]
    assert main([*argv, "--prompts", DEFAULT_PROMPTS[0]]) == 2
    error = capsys.readouterr().err
    assert "missing backdrop" in error and "on a [TONE] PATTERN background" in error
    assert error.count("\n") == 1 and not out.exists()
