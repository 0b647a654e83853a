"""MAC counting (``catprune.measure``, ``catprune macs``) and the architecture configs it builds on."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TEXT_TOKENS, tiny_pixart, tiny_sd3

from catprune.architectures import ARCHITECTURES, Architecture, load_architecture, resolve_architecture
from catprune.measure import PAPER_MACS, MacsReport, count_macs
from catprune.tools.demo import MODEL as DEMO_MODEL

PAPER_RATIOS = {
    ("sd3-medium", 28): 0.536,
    ("sd3-medium", 50): 0.455,
    ("pixart-sigma", 28): 0.498,
    ("pixart-sigma", 50): 0.410,
}


def tiny_architecture(family: str) -> Architecture:
    """The shared tiny test models (conftest) as architectures: 7 text tokens, toy widths."""
    model = tiny_sd3() if family == "sd3" else tiny_pixart()
    return Architecture(
        f"tiny-{family}", family, dict(model.config), text_tokens=TEXT_TOKENS, default_steps=4
    )


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "catprune", *args], capture_output=True, text=True, timeout=300, check=False
    )


@pytest.fixture(scope="module")
def paper_setting() -> dict[str, MacsReport]:
    """The paper's setting (1024x1024, alpha 0.3, t0 8, CFG), counted once per model on meta."""
    return {name: count_macs(ARCHITECTURES[name], steps=28) for name in ("sd3-medium", "pixart-sigma")}


@pytest.mark.parametrize(("model", "steps"), list(PAPER_RATIOS))
def test_paper_mac_ratios(paper_setting: dict[str, MacsReport], model: str, steps: int) -> None:
    report = dataclasses.replace(paper_setting[model], steps=steps)
    assert report.ratio == pytest.approx(PAPER_RATIOS[model, steps], abs=0.01)


@pytest.mark.parametrize(("model", "steps"), list(PAPER_MACS))
def test_paper_absolute_macs_leave_out_attention(
    paper_setting: dict[str, MacsReport], model: str, steps: int
) -> None:
    """The paper's absolute figures are CFG-batch MACs without the attention products (within 0.5%)."""
    report = dataclasses.replace(paper_setting[model], steps=steps)
    full, cat = report.without_attention
    assert full == pytest.approx(PAPER_MACS[model, steps][0], rel=0.005)
    assert cat == pytest.approx(PAPER_MACS[model, steps][1], rel=0.005)
    assert report.paper() == PAPER_MACS[model, steps]


@pytest.mark.parametrize("model", ["sd3-medium", "pixart-sigma"])
def test_counted_macs_agree_with_the_analytic_count(paper_setting: dict[str, MacsReport], model: str) -> None:
    report = paper_setting[model]
    assert report.analytic_full_step == pytest.approx(report.full_step.macs, rel=0.02)
    assert report.analytic_pruned_step == pytest.approx(report.pruned_step.macs, rel=0.02)
    assert report.fill_step == report.full_step


@pytest.mark.parametrize("model", ["sd3-medium", "pixart-sigma"])
def test_attention_products_match_a_hand_count(paper_setting: dict[str, MacsReport], model: str) -> None:
    """QK^T and AV: queries x keys x width, twice, per block and row (SD3: joint over image + text tokens;
    PixArt: image self-attention plus cross-attention to the text)."""
    report = paper_setting[model]
    config = ARCHITECTURES[model].config
    layers, width = config["num_layers"], config["num_attention_heads"] * config["attention_head_dim"]
    n, k, t = report.image_tokens, report.kept_tokens, report.text_tokens
    if model == "sd3-medium":
        full, pruned = (n + t) * (n + t), (k + t) * (n + t)
    else:
        full, pruned = n * (n + t), k * (n + t)
    per_product = 2 * report.rows * layers * width
    assert report.full_step.attention_macs == per_product * full
    assert report.pruned_step.attention_macs == per_product * pruned


@pytest.mark.parametrize("family", ["sd3", "pixart"])
def test_pruned_step_costs_the_share_of_recomputed_tokens(family: str) -> None:
    """SD3 recomputes K image tokens plus all T text tokens: (K + T) / (N + T) of a full step; PixArt
    recomputes K image tokens and reuses the text's K/V: K / N."""
    report = count_macs(tiny_architecture(family), resolution=256, steps=10, start_step=4)
    n, k, t = report.image_tokens, report.kept_tokens, report.text_tokens
    expected = (k + t) / (n + t) if family == "sd3" else k / n
    assert report.pruned_step.macs / report.full_step.macs == pytest.approx(expected, rel=0.05)
    assert report.step_counts == (3, 1, 6)
    assert report.cat_macs == 4 * report.full_step.macs + 6 * report.pruned_step.macs


def test_no_pruned_steps_when_the_generation_ends_before_t0() -> None:
    report = count_macs(tiny_architecture("pixart"), resolution=128, steps=5, start_step=8)
    assert report.step_counts == (5, 0, 0)
    assert report.ratio == 1.0


def test_named_architectures_have_the_published_sizes() -> None:
    parameters = {
        name: sum(p.numel() for p in arch.build().parameters()) for name, arch in ARCHITECTURES.items()
    }
    assert parameters["sd3-medium"] == 2_028_328_000
    assert round(parameters["sd3.5-medium"] / 1e9, 3) == 2.243
    assert round(parameters["sd3.5-large"] / 1e9, 3) == 8.057
    assert round(parameters["pixart-sigma"] / 1e9, 3) == 0.611
    # FLUX.1-dev's safetensors hold 23,802,816,640 bytes of bf16 weights; schnell has no guidance embedder.
    assert parameters["flux-dev"] == 23_802_816_640 // 2
    assert parameters["flux-dev"] - parameters["flux-schnell"] == 3072 * (256 + 1) + 3072 * (3072 + 1)
    assert {name: arch.text_tokens for name, arch in ARCHITECTURES.items()} == {
        "sd3-medium": 333,
        "sd3.5-medium": 333,
        "sd3.5-large": 333,
        "pixart-sigma": 300,
        "pixart-alpha": 120,
        "flux-dev": 512,
        "flux-schnell": 256,
        "chroma": 512,
        "qwen-image": 128,
        "flux2-dev": 512,
        "flux2-klein": 512,
        "z-image": 128,
        "z-image-turbo": 128,
        "flux3": 320,
        "flux3-distilled": 320,
        "wan2.1-t2v-1.3b": 512,
        "wan2.1-t2v-14b": 512,
        "wan2.1-i2v-14b": 512,
        "hunyuanvideo-1.5": 1985,
        "wan2.2-a14b": 512,
    }
    assert (ARCHITECTURES["flux-dev"].default_steps, ARCHITECTURES["flux-schnell"].default_steps) == (28, 4)


def test_the_demo_model_is_sd3_at_width_256() -> None:
    """``catprune demo``'s miniature SD3: 4 heads x 64, 4 blocks, SD3's 333 text tokens and its pipeline."""
    model = DEMO_MODEL.build()
    assert sum(p.numel() for p in model.parameters()) == 9_057_856
    assert model.inner_dim == 256 and len(model.transformer_blocks) == 4
    assert (DEMO_MODEL.text_tokens, DEMO_MODEL.image_tokens(512)) == (333, 1024)
    assert DEMO_MODEL.guidance_scale == 7.0
    assert DEMO_MODEL.make_scheduler().config.shift == 3.0
    assert DEMO_MODEL.name not in ARCHITECTURES


def test_build_on_meta_has_no_data_and_cut_layers_keep_width() -> None:
    cut = ARCHITECTURES["sd3-medium"].with_layers(2)
    model = cut.build()
    assert all(p.is_meta for p in model.parameters())
    assert len(model.transformer_blocks) == 2 and model.inner_dim == 1536
    assert cut.latent_shape(2, 1024) == (2, 16, 128, 128) and cut.image_tokens(1024) == 4096
    with pytest.raises(ValueError, match="multiple of 16"):
        cut.latent_shape(1, 1000)


def test_random_weights_are_seeded() -> None:
    arch = tiny_architecture("sd3")
    first, second = arch.build("cpu", seed=3), arch.build("cpu", torch.bfloat16, seed=3)
    assert second.pos_embed.proj.weight.dtype == torch.bfloat16
    torch.testing.assert_close(first.pos_embed.proj.weight.to(torch.bfloat16), second.pos_embed.proj.weight)


def test_local_pipeline_folder(tmp_path: Path) -> None:
    """A pipeline folder: transformer config from transformer/, text tokens from the pipeline class."""
    tiny_pixart().save_pretrained(tmp_path / "transformer")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    arch = load_architecture(tmp_path)
    assert (arch.family, arch.text_tokens, arch.weights) == ("pixart", 120, tmp_path / "transformer")
    assert arch.build().config.num_layers == 2
    assert resolve_architecture(tmp_path / "transformer").text_tokens == 300
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        resolve_architecture("nope")


def test_macs_cli_on_a_local_model(tmp_path: Path) -> None:
    tiny_sd3().save_pretrained(tmp_path)
    result = run_cli("macs", "--model", str(tmp_path), "--resolution", "128", "--steps", "10", "--json")
    assert result.returncode == 0, result.stderr
    fields = json.loads(result.stdout)
    assert fields["image_tokens"] == 64 and fields["kept_tokens"] == 19 and fields["text_tokens"] == 333
    assert fields["steps_by_kind"] == {"full": 7, "fill": 1, "pruned": 2}
    assert fields["ratio"] == pytest.approx(fields["cat_macs"] / fields["full_macs"])
    assert fields["full_macs"] == 10 * fields["full_step_macs"]
    assert 0 < fields["pruned_step_macs"] < fields["full_step_macs"] == fields["fill_step_macs"]
    assert fields["without_attention"]["full_macs"] < fields["full_macs"]
    selection = fields["selection"]
    assert selection["noise_shape"] == [1, 64, 16] and selection["flop_counter_macs"] == 0
    assert (
        selection["per_generation_ops"] == selection["clustering_step_ops"] + selection["later_step_ops"] > 0
    )
    assert fields["paper"] is None and fields["rows"] == 2


def test_macs_cli_text_output(tmp_path: Path) -> None:
    tiny_pixart().save_pretrained(tmp_path)
    result = run_cli("macs", "--model", str(tmp_path), "--resolution", "128", "--no-cfg")
    assert result.returncode == 0, result.stderr
    assert "PixArtTransformer2DModel" in result.stdout and "1 row per call (no CFG)" in result.stdout
    assert "ratio CAT / full" in result.stdout and "without attention products" in result.stdout


def test_macs_cli_rejects_an_unknown_model_in_one_line() -> None:
    result = run_cli("macs", "--model", "sd4-giant")
    assert result.returncode == 2 and "unknown model 'sd4-giant'" in result.stderr
    assert "Traceback" not in result.stderr


def test_macs_cli_refuses_a_video_size_for_an_image_model() -> None:
    result = run_cli("macs", "--model", "sd3-medium", "--width", "512")
    assert result.returncode == 2 and "video models only" in result.stderr and "--resolution" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_macs_cli_reproduces_the_paper_for_sd3_at_50_steps() -> None:
    result = run_cli("macs", "--model", "sd3-medium", "--steps", "50", "--json")
    fields = json.loads(result.stdout)
    assert fields["ratio"] == pytest.approx(0.455, abs=0.01)
    assert fields["paper"]["ratio"] == pytest.approx(136.70 / 300.50)
