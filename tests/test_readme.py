"""The README's Python example runs as written, against a tiny local SD3 pipeline (random weights, CPU).

The test extracts the single ```python block of the README's "## Use it in two lines" section, swaps
only the model id for the folder of a tiny complete ``StableDiffusion3Pipeline`` (transformer, VAE,
scheduler, both CLIP text encoders, T5, and their tokenizers, all built offline), and runs it as a script.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_vae
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from PIL import Image
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Use it in two lines"
MODEL_ID = "stabilityai/stable-diffusion-3-medium-diffusers"

LATENT_CHANNELS = 4
CLIP_WIDTH = 32  # each CLIP encoder's hidden size; their concatenation (64) is padded to T5's width
CLIP_PROJECTION = 16  # each CLIP encoder's pooled output; concatenated: the transformer's pooled input
T5_WIDTH = 64  # the transformer's joint_attention_dim
CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def _clip_tokenizer() -> CLIPTokenizer:
    """A byte-level BPE CLIP tokenizer over the lowercase letters, without merges: a word becomes its
    letters (the last one suffixed ``</w>``); anything else maps to the unk token (``<|endoftext|>``)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = [*CLIP_SPECIALS, *letters, *(f"{letter}</w>" for letter in letters)]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _t5_tokenizer() -> T5Tokenizer:
    """A unigram T5 tokenizer over the lowercase letters: a word becomes ``▁`` and its letters."""
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab = specials + [(letter, -3.0) for letter in "abcdefghijklmnopqrstuvwxyz"]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=256)


def _clip_encoder(seed: int) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=64,
        hidden_size=CLIP_WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=CLIP_PROJECTION,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModelWithProjection(config).eval()


def tiny_sd3_pipeline() -> StableDiffusion3Pipeline:
    """A complete SD3 pipeline at toy size: 32x32 images (16x16 latents, 64 image tokens)."""
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=T5_WIDTH,
        caption_projection_dim=32,
        pooled_projection_dim=2 * CLIP_PROJECTION,
        out_channels=LATENT_CHANNELS,
        pos_embed_max_size=32,
    ).eval()
    vae = tiny_vae(LATENT_CHANNELS)
    torch.manual_seed(0)
    text_encoder_3 = T5EncoderModel(
        T5Config(
            vocab_size=32,
            d_model=T5_WIDTH,
            d_kv=8,
            d_ff=64,
            num_layers=1,
            num_heads=2,
            decoder_start_token_id=0,
        )
    ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=_clip_encoder(1),
        tokenizer=_clip_tokenizer(),
        text_encoder_2=_clip_encoder(2),
        tokenizer_2=_clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=_t5_tokenizer(),
    )


@pytest.fixture(scope="module")
def tiny_sd3_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-sd3")
    tiny_sd3_pipeline().save_pretrained(folder)
    return folder


def readme_example() -> str:
    """The one ```python block of the README section ``SECTION``."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.find(f"\n{SECTION}\n")
    assert start >= 0, f"README.md has no section {SECTION!r}"
    end = readme.find("\n## ", start + len(SECTION) + 2)
    section = readme[start : end if end >= 0 else len(readme)]
    blocks = re.findall(r"^```python\n(.*?)^```$", section, flags=re.DOTALL | re.MULTILINE)
    assert len(blocks) == 1, f"README section {SECTION!r} has {len(blocks)} ```python blocks, expected one"
    return blocks[0]


@pytest.mark.slow
def test_readme_example_runs(tiny_sd3_folder: Path, tmp_path: Path) -> None:
    code = readme_example()
    assert code.count(f'"{MODEL_ID}"') == 1, f"the README example should load {MODEL_ID!r} exactly once"
    code = code.replace(f'"{MODEL_ID}"', repr(str(tiny_sd3_folder)))
    # Offline: nothing may be fetched. One thread: the toy model's steps are tiny, and on a busy machine
    # PyTorch's thread pool makes them ten times slower.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"README example failed:\n{result.stdout}\n{result.stderr}"
    with Image.open(tmp_path / "teddy.png") as image:
        image.load()
        assert image.size == (32, 32)
    last_line = result.stdout.strip().splitlines()[-1]
    pruned_steps, macs_fraction = last_line.split()
    assert int(pruned_steps) == 20, last_line  # 28 steps, pruned from step 8 on
    assert 0.0 < float(macs_fraction) < 1.0, last_line


def readme_test_command() -> str:
    """The README's quick-start command that runs the tests."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = [
        line for line in readme.splitlines() if line.startswith("python3 -m venv") and "-m pytest" in line
    ]
    lines = [line.strip() for line in lines]
    assert len(lines) == 1, f"README.md should give one test command, found {len(lines)}"
    return lines[0]


def test_ci_runs_the_readme_test_command_then_the_slow_tests() -> None:
    """CI runs what the README tells a user to run (the tests not marked slow, reporting the slowest), then
    the slow ones, so that both stay green and the README's command stays within its budget."""
    command = readme_test_command()
    assert '-m "not slow"' in command and "--durations=10" in command
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci and "set -euo pipefail" in ci
    slow = [line for line in ci if "-m pytest" in line and "-m slow" in line]
    assert len(slow) == 1 and ci.index(slow[0]) > ci.index(command)
