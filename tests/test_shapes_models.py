"""The shapes models: tokenizer and text encoder, pipelines, CAT on them, training, ``generate``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from catprune import CATPruningConfig, apply_cat_pruning, remove_cat_pruning
from catprune.cli import main
from catprune.runtime import run_generation
from catprune.shapes import VOCABULARY, heldout_captions, score, textures
from catprune.shapes.pipelines import (
    SHIPPED_MODELS,
    ShapesMMDiTPipeline,
    ShapesPixArtPipeline,
    load_shapes_pipeline,
    model_image_size,
    prompt_grammar,
    shipped_model_path,
)
from catprune.shapes.text import MAX_WORDS, ShapesTextEncoder, ShapesTokenizer
from catprune.shapes.training import TrainConfig, build_pipeline
from catprune.tools.generate import LABEL_HEIGHT, LEGEND_HEIGHT, MARGIN, PANEL, SelectionCounter

PROMPT = (
    "a large red circle at the top left and a small blue square at the bottom right on a white background"
)
ARCH_CLASSES = {"mmdit": ShapesMMDiTPipeline, "pixart": ShapesPixArtPipeline}
COMPARE_SIZE = (4 * PANEL + 5 * MARGIN, MARGIN + LABEL_HEIGHT + PANEL + LEGEND_HEIGHT + MARGIN)


def tiny_pipeline(arch: str) -> ShapesMMDiTPipeline | ShapesPixArtPipeline:
    pipe = build_pipeline(TrainConfig(arch=arch, width=32, layers=1, text_layers=1, steps=1))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Saved tiny random pipelines, one per architecture."""
    folders = {}
    for arch in ARCH_CLASSES:
        folders[arch] = tmp_path_factory.mktemp(arch) / "pipeline"
        tiny_pipeline(arch).save_pretrained(folders[arch], safe_serialization=True)
    return folders


def sample(pipe, steps: int = 4, **kwargs) -> torch.Tensor:
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return pipe([PROMPT, "a small green triangle in the center on a gray background"],
                num_inference_steps=steps, latents=noise, output_type="pt", **kwargs).images  # fmt: skip


def test_tokenizer_pads_after_a_start_token() -> None:
    tokenizer = ShapesTokenizer(VOCABULARY)
    ids, mask = tokenizer(["A red  circle on a white background", ""])
    assert ids.shape == mask.shape == (2, 1 + MAX_WORDS)
    assert mask.sum(1).tolist() == [8, 1]
    assert torch.equal(ids[0, :8], tokenizer("a red circle on a white background")[0][0, :8])


def test_unknown_word_lists_the_vocabulary() -> None:
    with pytest.raises(ValueError, match="unknown word") as error:
        ShapesTokenizer(VOCABULARY)("a pink circle on a white background")
    assert "'pink'" in str(error.value)
    assert all(word in str(error.value) for word in VOCABULARY)
    with pytest.raises(ValueError, match="at most"):
        ShapesTokenizer(VOCABULARY)(" ".join(["a"] * (MAX_WORDS + 1)))


def test_text_encoder_outputs_tokens_and_pooled_vector() -> None:
    encoder = ShapesTextEncoder(dim=32, num_layers=1, num_heads=1, pooled_dim=16)
    embeds, pooled, mask = encoder.encode([PROMPT, ""])
    assert embeds.shape == (2, 1 + MAX_WORDS, 32)
    assert pooled.shape == (2, 16)
    assert mask.dtype == torch.bool


@pytest.mark.parametrize("arch", ARCH_CLASSES)
def test_save_and_load_round_trip(arch: str, tiny_folders: dict[str, Path]) -> None:
    folder = tiny_folders[arch]
    assert sorted(p.name for p in folder.iterdir()) == [
        "model_index.json",
        "scheduler",
        "text_encoder",
        "transformer",
    ]
    assert list(folder.glob("*/*.safetensors")) and not list(folder.glob("**/*.bin"))
    loaded = load_shapes_pipeline(folder)
    assert type(loaded) is ARCH_CLASSES[arch]
    assert loaded.config.guidance_scale == tiny_pipeline(arch).config.guidance_scale
    torch.testing.assert_close(sample(loaded), sample(tiny_pipeline(arch)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ARCH_CLASSES)
def test_cat_pruning_runs_on_the_pipelines(arch: str) -> None:
    pipe = tiny_pipeline(arch)
    reference = sample(pipe, steps=5)
    state = apply_cat_pruning(pipe, CATPruningConfig(keep_ratio=0.3, start_step=2))
    pruned = sample(pipe, steps=5)
    assert state.stats.pruned_steps == 3 and state.stats.image_tokens == 256
    assert state.stats.macs < state.stats.full_macs
    assert not torch.equal(pruned, reference)
    remove_cat_pruning(pipe)
    apply_cat_pruning(pipe, CATPruningConfig(keep_ratio=1.0, start_step=2))
    torch.testing.assert_close(sample(pipe, steps=5), reference, rtol=0, atol=1e-5)
    remove_cat_pruning(pipe)


def test_generate_counts_how_often_each_token_is_recomputed() -> None:
    """The selection-frequency panel: per token, the share of pruned steps that recomputed it (last row)."""
    pipe = tiny_pipeline("mmdit")
    counter, chosen = SelectionCounter(), []

    def keep_indices(record) -> None:
        if record.indices is not None:
            chosen.append(record.indices[-1].clone())

    config = CATPruningConfig(keep_ratio=0.3, start_step=2)
    result = run_generation(pipe, PROMPT, 5, 0, config, observers=[counter, keep_indices])
    stats = result.stats
    assert len(chosen) == stats.pruned_steps == 3
    expected = np.zeros(stats.image_tokens)
    for indices in chosen:
        np.add.at(expected, indices.numpy(), 1)
    frequency = counter.frequency()
    np.testing.assert_allclose(frequency, expected / stats.pruned_steps)
    assert frequency.sum() == pytest.approx(stats.kept_tokens)

    unpruned = SelectionCounter()
    run_generation(pipe, PROMPT, 3, 0, CATPruningConfig.unpruned(), observers=[unpruned])
    assert np.array_equal(unpruned.frequency(), np.zeros(stats.image_tokens))


def test_the_empty_prompt_is_the_unconditional_input() -> None:
    pipe = tiny_pipeline("mmdit")
    text = pipe.encode_prompt(["a red circle on a white background"], do_classifier_free_guidance=True)
    assert text.embeds.shape[0] == 2 and text.mask[0].sum() == 1


def cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "catprune", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, check=False)


@pytest.mark.slow
def test_training_resumes_after_being_killed(tmp_path: Path) -> None:
    tiny = ["--arch", "mmdit", "--out", str(tmp_path), "--width", "32", "--layers", "1", "--batch-size", "4"]
    tiny += ["--checkpoint-every", "2", "--threads", "1"]
    state_file = tmp_path / "checkpoint" / "state.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "catprune", "train-shapes", *tiny, "--steps", "100000"],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not (state_file.is_file() and json.loads(state_file.read_text())["step"] >= 2):
            assert process.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.2)
    finally:
        process.kill()
        process.wait()
    stopped_at = json.loads(state_file.read_text())["step"]
    assert (tmp_path / "checkpoint" / "optimizer.safetensors").is_file()
    result = cli("train-shapes", *tiny, "--steps", str(stopped_at + 2))
    assert result.returncode == 0, result.stderr
    assert f"resuming from step {stopped_at}" in result.stdout
    assert json.loads(state_file.read_text())["step"] == stopped_at + 2
    assert load_shapes_pipeline(tmp_path / "pipeline").transformer.config.num_layers == 1


@pytest.mark.slow
def test_training_saves_a_checkpoint_when_terminated(tmp_path: Path) -> None:
    """SIGTERM (a job scheduler, ``kill``) saves the last step, though no periodic checkpoint was due."""
    tiny = ["--arch", "pixart", "--out", str(tmp_path), "--width", "32", "--layers", "1", "--batch-size", "4"]
    command = [sys.executable, "-m", "catprune", "train-shapes", *tiny, "--checkpoint-every", "100000"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([*command, "--steps", "100000"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env)  # fmt: skip
    try:
        assert process.stdout is not None
        for line in process.stdout:  # the progress bar's first update: training has started
            if "step" in line:
                break
        time.sleep(1)
        process.terminate()
        output = process.communicate(timeout=120)[0]
    finally:
        process.kill()
    step = json.loads((tmp_path / "checkpoint" / "state.json").read_text())["step"]
    assert step > 0 and f"checkpoint of step {step} saved" in output


def model_for(arch: str, tiny_folders: dict[str, Path]) -> str:
    """The shipped model once it exists, else the tiny folder."""
    name = f"shapes-{arch}"
    return name if (shipped_model_path(name) / "model_index.json").is_file() else str(tiny_folders[arch])


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCH_CLASSES)
def test_generate_compare_offline_in_a_subprocess(
    arch: str, tiny_folders: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "compare.png"
    result = cli("generate", PROMPT, "--model", model_for(arch, tiny_folders), "--compare", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "PSNR of CAT against full" in result.stdout and "GMACs" in result.stdout
    with Image.open(out) as image:
        assert image.size == COMPARE_SIZE
        pixels = np.asarray(image.convert("RGB"))
    legend = pixels[MARGIN + LABEL_HEIGHT + PANEL + 4, -MARGIN - PANEL : -MARGIN]
    assert (legend[0] != legend[-1]).any(), "the selection-frequency legend is missing"


def test_generate_without_out_writes_image_png_here(
    tiny_folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The newcomer's command needs no ``--out``: image.png (compare.png with ``--compare``) in the
    current folder."""
    monkeypatch.chdir(tmp_path)
    assert main(["generate", PROMPT, "--model", str(tiny_folders["pixart"]), "--steps", "10"]) == 0
    assert [path.name for path in tmp_path.iterdir() if path.suffix == ".png"] == ["image.png"]


def test_generate_writes_an_upscaled_image(tiny_folders: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "cat.png"
    assert (
        main(["generate", PROMPT, "--model", str(tiny_folders["pixart"]), "--steps", "10", "--out", str(out)])
        == 0
    )
    with Image.open(out) as image:
        assert image.size == (PANEL, PANEL)
    assert "GMACs" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("prompt", "model", "message"),
    [
        ("a pink circle on a white background", "tiny", "unknown word(s) 'pink'"),
        (PROMPT, "missing", "no such folder"),
    ],
)
def test_generate_errors_are_one_line(prompt, model, message, tiny_folders, tmp_path, capsys) -> None:
    path = str(tiny_folders["mmdit"]) if model == "tiny" else str(tmp_path / "no-such-model")
    assert main(["generate", prompt, "--model", path, "--steps", "10", "--out", str(tmp_path / "x.png")]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error and "Traceback" not in error


SWAPPED = (
    "a small blue square at the bottom right and a large red circle at the top left on a white background"
)


def test_generate_reads_objects_in_any_order_as_the_canonical_caption(
    tiny_folders: dict[str, Path], tmp_path: Path, capsys
) -> None:
    model = str(tiny_folders["mmdit"])
    for prompt, name in ((PROMPT, "canonical.png"), (SWAPPED, "swapped.png")):
        assert (
            main(["generate", prompt, "--model", model, "--steps", "10", "--out", str(tmp_path / name)]) == 0
        )
    assert f"prompt read as: {PROMPT}" in capsys.readouterr().out
    with Image.open(tmp_path / "canonical.png") as canonical, Image.open(tmp_path / "swapped.png") as swapped:
        assert np.array_equal(np.asarray(canonical), np.asarray(swapped))


@pytest.mark.parametrize(
    ("prompt", "problem"),
    [
        ("", "empty prompt"),
        ("red circle", "missing background"),
        ("circle red a large on a white background", "got 'circle red a large'"),
        (
            "a large red circle at the top left and a small blue square at the top left on a white "
            "background",
            "two objects at the same position",
        ),
    ],
)
def test_generate_refuses_prompts_outside_the_grammar_showing_it(
    prompt: str, problem: str, tiny_folders: dict[str, Path], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "x.png"
    assert main(["generate", prompt, "--model", str(tiny_folders["mmdit"]), "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert problem in error and "\n" not in error and not out.exists()
    assert 'e.g. "a large red circle at the top left on a white background"' in error


def test_generate_help_shows_the_grammar(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = capsys.readouterr().out
    assert "Prompts of the shipped shapes models" in help_text
    assert all(word in help_text for word in ("at the bottom right", "triangle", "orange", "gray"))
    assert "Prompts of textures-mmdit (64x64)" in help_text and "on a [TONE] PATTERN background" in help_text
    assert all(word in help_text for word in (*textures.PATTERNS, *textures.TONES, "textures-mmdit"))


@pytest.mark.parametrize("name", SHIPPED_MODELS)
def test_shipped_models_are_small_safetensors(name: str) -> None:
    folder = shipped_model_path(name)
    if not (folder / "model_index.json").is_file():
        pytest.skip(f"{name} is not trained yet")
    weights = list(folder.glob("*/*.safetensors"))
    assert len(weights) == 2 and all(f.stat().st_size <= 25 * 2**20 for f in weights)
    assert not list(folder.glob("**/*.bin"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["shapes-mmdit", "shapes-pixart"])
def test_shipped_models_draw_held_out_captions(name: str) -> None:
    """The shipped weights, full and CAT-pruned, draw what 8 held-out captions say (checked from pixels).

    Held-out captions hold colour-shape pairs never seen in training. The bar (6 of 8 fully right) is
    under the measured accuracy of both models (docs/shapes-models.md), above that of an untrained one.
    """
    if not (shipped_model_path(name) / "model_index.json").is_file():
        pytest.skip(f"{name} is not trained yet")
    pipe = load_shapes_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    captions = heldout_captions(8, seed=1)
    noise = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for pruned in (False, True):
        if pruned:
            apply_cat_pruning(pipe, CATPruningConfig(keep_ratio=0.3, start_step=8))
        images = pipe(captions, num_inference_steps=28, latents=noise, output_type="np").images
        remove_cat_pruning(pipe)
        right = [bool(score(image, caption)["full"]) for image, caption in zip(images, captions, strict=True)]
        assert sum(right) >= 6, f"{'CAT' if pruned else 'full'}: {right} for {captions}"


# --- textures-mmdit: 64x64 pixels, a 32x32 token grid, the textures grammar -------------------------------

TEXTURED = (
    "a large red circle at the top left and a small blue square at the bottom right on a gray striped "
    "background"
)
TEXTURED_SWAPPED = (
    "a small blue square at the bottom right and a large red circle at the top left on a Gray striped "
    "background."
)


def test_the_textures_model_is_shipped_and_loads_by_name() -> None:
    assert "textures-mmdit" in SHIPPED_MODELS
    assert (prompt_grammar("textures-mmdit"), model_image_size("textures-mmdit")) == ("textures", 64)
    assert [prompt_grammar(name) for name in ("shapes-mmdit", "shapes-pixart")] == ["shapes", "shapes"]
    assert prompt_grammar("stabilityai/stable-diffusion-3-medium-diffusers") is None
    pipe = load_shapes_pipeline("textures-mmdit")
    assert type(pipe) is ShapesMMDiTPipeline and pipe.image_size == 64
    assert pipe.transformer.config.patch_size == 2 and pipe.transformer.config.pos_embed_max_size == 32
    assert tuple(pipe.text_encoder.config.vocabulary) == textures.VOCABULARY
    assert pipe.scheduler.config.shift == 3.0


def upscaled_64x64(out: Path) -> bool:
    """Whether a written PNG is a 64x64 image upscaled to ``PANEL`` (nearest: blocks of equal pixels)."""
    with Image.open(out) as image:
        pixels = np.asarray(image.convert("RGB"))
    block = PANEL // 64
    return pixels.shape == (PANEL, PANEL, 3) and np.array_equal(
        pixels, pixels[::block, ::block].repeat(block, 0).repeat(block, 1)
    )


# The fewest steps ``generate`` takes: pruning starts at step 2 at the earliest (t0 - 2 is the reference).
FEWEST = ("--steps", "3", "--start-step", "2")


def test_generate_reads_a_textured_prompt_for_the_textures_model(tmp_path: Path, capsys) -> None:
    out = tmp_path / "textured.png"
    assert main(["generate", TEXTURED_SWAPPED, "--model", "textures-mmdit", *FEWEST, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"prompt read as: {TEXTURED}" in printed and "GMACs" in printed
    assert upscaled_64x64(out)


@pytest.mark.slow
def test_generate_draws_a_textured_prompt_with_the_textures_model_in_a_subprocess(tmp_path: Path) -> None:
    """By name, offline, as installed: the prompt read in the textures grammar, a 64x64 image upscaled.
    Most of its time is the new process's start (importing torch and diffusers)."""
    out = tmp_path / "textured.png"
    args = ("--model", "textures-mmdit", *FEWEST, "--threads", "1")
    result = cli("generate", TEXTURED_SWAPPED, *args, "--out", str(out), timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"prompt read as: {TEXTURED}" in result.stdout and "GMACs" in result.stdout
    assert upscaled_64x64(out)


@pytest.mark.parametrize(
    ("prompt", "model", "problem", "example"),
    [
        (PROMPT, "textures-mmdit", "missing backdrop", "on a gray striped background"),
        ("a red circle on a striped background", "textures-mmdit", "got 'a red circle'", "PATTERN:"),
        (TEXTURED, "shapes-mmdit", "unknown word(s) 'striped'", "on a white background"),
    ],
)
def test_generate_refuses_a_prompt_of_the_other_grammar_showing_the_model_s(
    prompt: str, model: str, problem: str, example: str, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "x.png"
    assert main(["generate", prompt, "--model", model, "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert problem in error and example in error and "\n" not in error and not out.exists()


def test_generate_size_options_name_the_textures_model_s_size(tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "x.png")
    assert main(["generate", TEXTURED, "--model", "textures-mmdit", "--height", "128", "--out", out]) == 2
    assert "--height: textures-mmdit draws 64x64 images" in capsys.readouterr().err
