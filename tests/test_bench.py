"""``catprune bench``: its denoising loop is the pipelines' loop, and its report has the documented fields."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    TEXT_TOKENS,
    pixart_pipeline,
    pixart_prompts,
    sd3_pipeline,
    sd3_prompts,
    seeded_latents,
    tiny_pixart,
    tiny_sd3,
    tiny_wan,
    wan_pipeline,
)
from diffusers import AutoencoderKL, FluxPipeline

from catprune.architectures import ARCHITECTURES, Architecture
from catprune.measure import alternating_medians, busy_note, denoise


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "catprune", "bench", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_denoise_is_the_sd3_pipeline_loop() -> None:
    transformer = tiny_sd3()
    arch = Architecture("tiny-sd3", "sd3", dict(transformer.config), text_tokens=TEXT_TOKENS, default_steps=4)
    prompts, latents = sd3_prompts(1), seeded_latents(1)
    expected = sd3_pipeline(transformer)(
        **prompts,
        latents=latents,
        num_inference_steps=4,
        guidance_scale=arch.guidance_scale,
        output_type="latent",
    ).images
    conditioning = {
        "encoder_hidden_states": torch.cat([prompts["negative_prompt_embeds"], prompts["prompt_embeds"]]),
        "pooled_projections": torch.cat(
            [prompts["negative_pooled_prompt_embeds"], prompts["pooled_prompt_embeds"]]
        ),
    }
    with torch.inference_mode():
        got = denoise(transformer, arch, latents, conditioning, steps=4, cfg=True)
    torch.testing.assert_close(got, expected)


def test_denoise_is_the_pixart_sigma_pipeline_loop() -> None:
    transformer = tiny_pixart()
    arch = Architecture(
        "tiny-pixart", "pixart", dict(transformer.config), text_tokens=TEXT_TOKENS, default_steps=4
    )
    prompts, latents = pixart_prompts(1), seeded_latents(1)
    expected = pixart_pipeline(transformer)(
        **prompts,
        latents=latents,
        num_inference_steps=4,
        guidance_scale=arch.guidance_scale,
        use_resolution_binning=False,
        output_type="latent",
    ).images
    conditioning = {
        "encoder_hidden_states": torch.cat([prompts["negative_prompt_embeds"], prompts["prompt_embeds"]]),
        "encoder_attention_mask": torch.cat(
            [prompts["negative_prompt_attention_mask"], prompts["prompt_attention_mask"]]
        ),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }
    with torch.inference_mode():
        got = denoise(transformer, arch, latents, conditioning, steps=4, cfg=True)
    torch.testing.assert_close(got, expected)


def test_denoise_is_the_wan_pipeline_loop_with_cfg_as_two_calls() -> None:
    """Wan's CFG: a conditional then an unconditional call per step, each under its ``cache_context``."""
    transformer = tiny_wan()
    arch = Architecture("tiny-wan", "wan", dict(transformer.config), text_tokens=8, default_steps=4)
    pipe = wan_pipeline(transformer)
    pipe.scheduler = arch.make_scheduler()
    generator = torch.Generator().manual_seed(1)
    prompt, negative = (torch.randn(1, 8, 32, generator=generator) for _ in range(2))
    latents = torch.randn(1, 4, 2, 8, 8, generator=generator)  # (B, C, latent frames, H, W)
    expected = pipe(
        prompt_embeds=prompt,
        negative_prompt_embeds=negative,
        guidance_scale=arch.guidance_scale,
        height=64,
        width=64,
        num_frames=5,
        num_inference_steps=4,
        latents=latents,
        output_type="latent",
    ).frames
    contexts, original = [], transformer.cache_context
    transformer.cache_context = lambda name, **kwargs: contexts.append(name) or original(name, **kwargs)
    calls = []
    transformer.register_forward_pre_hook(lambda module, args: calls.append(len(contexts)))
    with torch.inference_mode():
        got = denoise(
            transformer,
            arch,
            latents,
            {"encoder_hidden_states": prompt},
            steps=4,
            cfg=True,
            uncond_conditioning={"encoder_hidden_states": negative},
        )
    torch.testing.assert_close(got, expected)
    assert contexts == ["cond", "uncond"] * 4 and calls == list(range(1, 9))  # each call in its own context


@pytest.mark.slow
def test_bench_cli_on_a_local_model(tmp_path: Path) -> None:
    tiny_sd3().save_pretrained(tmp_path)
    result = run_bench(
        "--model", str(tmp_path), "--resolution", "128", "--steps", "5", "--start-step", "3",
        "--repeats", "2", "--device", "cpu", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    fields = json.loads(result.stdout)
    assert fields["weights"] == str(tmp_path) and (fields["device"], fields["dtype"]) == ("cpu", "float32")
    assert (fields["image_tokens"], fields["kept_tokens"], fields["text_tokens"]) == (64, 19, 333)
    assert (fields["rows"], fields["pruned_steps"], fields["repeats"]) == (2, 2, 2)
    assert fields["scheduler"] == "FlowMatchEulerDiscreteScheduler" and "text encoding" in fields["timed"]
    for kind in ("full_seconds", "cat_seconds"):
        spread = fields[kind]
        assert len(spread["all"]) == 2 and spread["min"] <= spread["median"] <= spread["max"]
    assert fields["speedup"] == pytest.approx(
        fields["full_seconds"]["median"] / fields["cat_seconds"]["median"]
    )
    assert (
        fields["mac_bound"] == pytest.approx(fields["full_macs"] / fields["cat_macs"])
        and fields["mac_bound"] > 1
    )
    assert fields["efficiency"] == pytest.approx(fields["speedup"] / fields["mac_bound"])
    assert fields["selection_seconds"] > 0 and 0 < fields["selection_share"] < 1
    # Per block (joint attention): K and V for 64 image + 333 text tokens, 2 rows, width 32, float32.
    assert fields["kv_cache_bytes"] == 2 * 2 * 2 * (64 + 333) * 32 * 4
    assert fields["peak_memory_bytes"] is None
    assert fields["compile"] == "none" and set(fields["warmup_seconds"]) == {"full", "cat"}
    assert all(
        fields[name] is None for name in ("decode_seconds", "end_to_end_seconds", "end_to_end_speedup")
    )


@pytest.mark.parametrize("name", ["sd3-medium", "pixart-sigma", "flux-dev"])
def test_each_family_decodes_its_latents_with_its_pipelines_vae(name: str) -> None:
    """``--decode``: the family's VAE config, random weights, fed as its pipeline feeds it (Flux unpacked
    as ``FluxPipeline._unpack_latents`` does)."""
    architecture = ARCHITECTURES[name]
    vae = architecture.build_vae(64, "cpu")
    assert vae.config.latent_channels == (4 if name == "pixart-sigma" else 16)
    latents = torch.randn(architecture.latent_shape(2, 64), generator=torch.Generator().manual_seed(0))
    if name == "flux-dev":
        expected = FluxPipeline._unpack_latents(latents, 64, 64, vae_scale_factor=8)
        assert torch.equal(architecture.adapter.latent_image(latents, 64), expected)
    with torch.no_grad():
        images = architecture.decode(vae, latents, 64)
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()


@pytest.mark.slow
def test_bench_cli_reports_end_to_end_times_with_the_decode(tmp_path: Path) -> None:
    """A local pipeline folder's own VAE config is decoded with; a bare transformer folder whose latents do
    not fit the family's VAE is refused with what to give instead."""
    tiny_sd3().save_pretrained(tmp_path / "transformer")
    options = ("--resolution", "64", "--steps", "4", "--start-step", "2", "--repeats", "2", "--device", "cpu")
    refused = run_bench("--model", str(tmp_path / "transformer"), *options, "--decode")
    assert refused.returncode == 2 and "give its pipeline folder" in refused.stderr
    vae = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
    )  # fmt: skip
    vae.save_pretrained(tmp_path / "vae")
    result = run_bench("--model", str(tmp_path), *options, "--decode", "--json")
    assert result.returncode == 0, result.stderr
    fields = json.loads(result.stdout)
    assert len(fields["decode_seconds"]["all"]) == 4 and fields["decode_seconds"]["min"] > 0
    for kind in ("full", "cat"):
        total, loop = fields["end_to_end_seconds"][kind], fields[f"{kind}_seconds"]
        assert len(total["all"]) == 2 and total["median"] > loop["median"]
    totals = fields["end_to_end_seconds"]
    assert fields["end_to_end_speedup"] == pytest.approx(totals["full"]["median"] / totals["cat"]["median"])


@pytest.mark.slow
def test_bench_cli_with_random_weights_of_a_named_architecture() -> None:
    result = run_bench(
        "--model", "pixart-sigma", "--random-weights", "--layers", "1", "--resolution", "128", "--steps", "4",
        "--start-step", "2", "--repeats", "1", "--device", "cpu",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "pixart-sigma (1 layers), random weights, cpu float32" in result.stdout
    assert "DPMSolverMultistepScheduler" in result.stdout and "speedup" in result.stdout
    assert "efficiency" in result.stdout and "K/V cache" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("how", ["regional", "full"])
def test_bench_cli_with_compilation(tmp_path: Path, how: str) -> None:
    """Both models compiled alike (inductor, fullgraph): compilation lands in the warm-up, apart."""
    tiny_sd3().save_pretrained(tmp_path)
    result = run_bench(
        "--model", str(tmp_path), "--resolution", "128", "--steps", "5", "--start-step", "3",
        "--repeats", "1", "--device", "cpu", "--compile", how, "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    fields = json.loads(result.stdout)
    assert fields["compile"] == how and fields["pruned_steps"] == 2 and fields["cuda_graphs"] is False
    warmup, timed = fields["warmup_seconds"], fields["cat_seconds"]["median"]
    assert set(warmup) == {"full", "cat"} and warmup["cat"] > timed  # the warm-up compiled


@pytest.mark.slow
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (("--cuda-graphs",), "--cuda-graphs needs --compile regional or full"),
        (("--cuda-graphs", "--compile", "full", "--device", "cpu"), "--cuda-graphs needs a CUDA device"),
    ],
)
def test_bench_cli_refuses_cuda_graphs_where_they_cannot_run(options: tuple[str, ...], message: str) -> None:
    result = run_bench("--model", "sd3-medium", "--random-weights", "--layers", "1", *options)
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_bench_cli_needs_random_weights_for_a_named_architecture() -> None:
    result = run_bench("--model", "sd3-medium")
    assert result.returncode == 2 and "add --random-weights" in result.stderr
    assert "Traceback" not in result.stderr


def test_alternating_medians_alternate_and_take_medians() -> None:
    order: list[str] = []
    times = {"a": iter([3.0, 1.0, 2.0]), "b": iter([5.0, 9.0, 4.0])}

    def call(name: str) -> float:
        order.append(name)
        return next(times[name])

    medians, cpu_share = alternating_medians({"a": lambda: call("a"), "b": lambda: call("b")}, 3)
    assert order == ["a", "b"] * 3 and medians == {"a": 2.0, "b": 5.0} and cpu_share >= 0


def test_busy_note_on_one_thread_reads_the_cpu_share() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert busy_note(1.0) == ""
        assert busy_note(0.4).startswith("the machine was busy: the timed runs got 40% of a CPU core")
    finally:
        torch.set_num_threads(threads)
