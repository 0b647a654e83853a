"""Pruning combined with diffusers components that change the attention or reuse computation across steps.

Each combination works or is refused with an error naming it and saying what to do, in both orders:
when ``apply_cat_pruning`` finds it (nothing changes), and at the next generation's first step when it
was added after pruning was applied. Tiny real components with random weights, no downloads: the
IP-Adapter is loaded through ``pipe.load_ip_adapter`` from a state dict of diffusers' own modules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import (
    pixart_pipeline,
    pixart_prompts,
    sd3_pipeline,
    sd3_prompts,
    seeded_latents,
    tiny_pixart,
    tiny_sd3,
)
from diffusers import SD3Transformer2DModel, StableDiffusion3PAGPipeline
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    HookRegistry,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    apply_faster_cache,
    apply_first_block_cache,
    apply_mag_cache,
    apply_pyramid_attention_broadcast,
)
from diffusers.models.attention_processor import (
    AttnProcessor,
    AttnProcessor2_0,
    SD3IPAdapterJointAttnProcessor2_0,
)
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.embeddings import IPAdapterTimeImageProjection

from catprune import CATPruningConfig, apply_cat_pruning, remove_cat_pruning
from catprune.compatibility import enabled_caches

STEPS, START = 6, 3
CONFIG = CATPruningConfig(keep_ratio=0.3, start_step=START)
IMAGE_EMBED_DIM = 16


def generate_sd3(pipe: Any, **extra: Any) -> torch.Tensor:
    return pipe(
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        latents=seeded_latents(1),
        output_type="latent",
        **sd3_prompts(1),
        **extra,
    ).images


def generate_pixart(pipe: Any) -> torch.Tensor:
    return pipe(
        height=128,
        width=128,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        latents=seeded_latents(1),
        output_type="latent",
        use_resolution_binning=False,
        **pixart_prompts(1),
    ).images


MODELS: dict[str, tuple[Callable[[], Any], Callable[[Any], torch.Tensor]]] = {
    "sd3": (lambda: sd3_pipeline(tiny_sd3()), generate_sd3),
    "pixart": (lambda: pixart_pipeline(tiny_pixart()), generate_pixart),
}


def snapshot(transformer: torch.nn.Module) -> dict[str, Any]:
    """What apply_cat_pruning may change: processors (by identity), diffusers hooks, the pruning state."""
    return {
        "processors": {
            name: module.processor
            for name, module in transformer.named_modules()
            if hasattr(module, "processor")
        },
        "hooks": {
            name: list(module._diffusers_hook.hooks)
            for name, module in transformer.named_modules()
            if hasattr(module, "_diffusers_hook")
        },
        "forward": transformer.forward,
        "state": "_catprune_engine" in transformer.__dict__,
    }


def assert_unchanged(transformer: torch.nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(transformer)
    assert after["processors"].keys() == before["processors"].keys()
    for name, processor in before["processors"].items():
        assert after["processors"][name] is processor, name
    assert after["hooks"] == before["hooks"]
    assert after["forward"] == before["forward"]
    assert not after["state"]


# --- IP-Adapter (SD3)


def tiny_ip_adapter(transformer: SD3Transformer2DModel, seed: int = 5) -> dict[str, dict[str, torch.Tensor]]:
    """An SD3 IP-Adapter state dict in the layout ``pipe.load_ip_adapter`` takes, with random weights: one
    ``SD3IPAdapterJointAttnProcessor2_0`` per attention layer and the timestep-aware image projection."""
    torch.manual_seed(seed)
    width = transformer.config.attention_head_dim * transformer.config.num_attention_heads
    # The loader reads the projection's heads as to_q rows // 64 and builds 4 layers: keep those defaults.
    image_proj = IPAdapterTimeImageProjection(
        embed_dim=IMAGE_EMBED_DIM, output_dim=width, hidden_dim=64, heads=1, num_queries=4, timestep_in_dim=32
    )
    processors = [
        SD3IPAdapterJointAttnProcessor2_0(
            hidden_size=width,
            ip_hidden_states_dim=width,
            head_dim=transformer.config.attention_head_dim,
            timesteps_emb_dim=64,
        )
        for _ in transformer.attn_processors
    ]
    return {
        "image_proj": image_proj.state_dict(),
        "ip_adapter": {
            f"{index}.{key}": value
            for index, processor in enumerate(processors)
            for key, value in processor.state_dict().items()
        },
    }


def load_tiny_ip_adapter(pipe: Any) -> None:
    pipe.load_ip_adapter(
        tiny_ip_adapter(pipe.transformer), image_encoder_folder=None, low_cpu_mem_usage=False
    )


def image_prompt() -> dict[str, torch.Tensor]:
    """Precomputed image embeddings [negative, positive], as the pipeline takes them under CFG."""
    return {
        "ip_adapter_image_embeds": torch.randn(
            2, 1, IMAGE_EMBED_DIM, generator=torch.Generator().manual_seed(9)
        )
    }


@pytest.mark.parametrize("sd35", [False, True], ids=["sd3", "sd3.5"])
def test_an_ip_adapter_loaded_before_is_refused_and_nothing_changes(sd35: bool) -> None:
    pipe = sd3_pipeline(tiny_sd3(sd35=sd35))
    plain = generate_sd3(pipe)
    load_tiny_ip_adapter(pipe)
    assert pipe.is_ip_adapter_active
    reference = generate_sd3(pipe, **image_prompt())
    assert not torch.allclose(reference, plain, atol=1e-4)  # the image prompt matters
    before = snapshot(pipe.transformer)
    with pytest.raises(RuntimeError, match=r"cannot be combined with an IP-Adapter") as error:
        apply_cat_pruning(pipe, CONFIG)
    assert "SD3IPAdapterJointAttnProcessor2_0" in str(error.value)
    assert "pipe.unload_ip_adapter() before apply_cat_pruning" in str(error.value)
    assert "transformer_blocks.0.attn" in str(error.value)
    assert_unchanged(pipe.transformer, before)
    assert torch.equal(generate_sd3(pipe, **image_prompt()), reference)

    # As the error says: without the IP-Adapter, pruning applies and prunes.
    pipe.unload_ip_adapter()
    state = apply_cat_pruning(pipe, CONFIG)
    generate_sd3(pipe)
    assert (state.stats.steps, state.stats.pruned_steps) == (STEPS, STEPS - START)


def test_an_ip_adapter_loaded_after_apply_is_refused_at_the_next_generation() -> None:
    pipe = sd3_pipeline(tiny_sd3())
    state = apply_cat_pruning(pipe, CONFIG)
    generate_sd3(pipe)
    load_tiny_ip_adapter(pipe)
    for extra in ({}, image_prompt()):
        with pytest.raises(
            RuntimeError, match=r"IP-Adapter: one was loaded after apply_cat_pruning"
        ) as error:
            generate_sd3(pipe, **extra)
        assert "SD3IPAdapterJointAttnProcessor2_0" in str(error.value)
        assert "remove_cat_pruning(pipe)" in str(error.value)

    # As the error says, to use the IP-Adapter: remove pruning and load it again; it then computes exactly
    # as on a pipeline that never had pruning.
    remove_cat_pruning(pipe)
    load_tiny_ip_adapter(pipe)
    fresh = sd3_pipeline(tiny_sd3())
    load_tiny_ip_adapter(fresh)
    assert torch.equal(generate_sd3(pipe, **image_prompt()), generate_sd3(fresh, **image_prompt()))

    # And to prune without it: unload, remove, apply again.
    pipe.unload_ip_adapter()
    remove_cat_pruning(pipe)
    state = apply_cat_pruning(pipe, CONFIG)
    generate_sd3(pipe)
    assert (state.stats.steps, state.stats.pruned_steps) == (STEPS, STEPS - START)


# --- other attention processors


class ScaledAttnProcessor(AttnProcessor2_0):
    """A user's processor: diffusers' attention, scaled (what it adds is lost if pruning replaces it)."""

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return 0.5 * super().__call__(*args, **kwargs)


def test_a_custom_processor_before_apply_is_refused_and_nothing_changes() -> None:
    pipe = pixart_pipeline(tiny_pixart())
    pipe.transformer.transformer_blocks[1].attn1.set_processor(ScaledAttnProcessor())
    before = snapshot(pipe.transformer)
    with pytest.raises(
        RuntimeError, match=r"cannot be combined with the attention processor ScaledAttnProcessor"
    ):
        apply_cat_pruning(pipe, CONFIG)
    assert_unchanged(pipe.transformer, before)


@pytest.mark.parametrize("name", list(MODELS))
def test_a_processor_installed_after_apply_is_refused_and_remove_restores(name: str) -> None:
    make, generate = MODELS[name]
    pipe = make()
    reference = generate(pipe)
    apply_cat_pruning(pipe, CONFIG)
    generate(pipe)
    pipe.transformer.set_attn_processor(AttnProcessor())
    with pytest.raises(
        RuntimeError, match=r"were replaced after apply_cat_pruning, by AttnProcessor"
    ) as error:
        generate(pipe)
    assert "transformer_blocks.0.attn" in str(error.value)
    remove_cat_pruning(pipe)
    assert torch.equal(generate(pipe), reference)


def pag_pipeline() -> StableDiffusion3PAGPipeline:
    return sd3_pipeline(tiny_sd3(), None, StableDiffusion3PAGPipeline, pag_applied_layers=["blocks.1"])


def test_perturbed_attention_guidance_installing_its_processors_per_call_is_refused() -> None:
    """The PAG pipeline puts its processors on the PAG layers at every call (over CAT pruning's)."""
    pipe = pag_pipeline()
    reference = generate_sd3(pipe, pag_scale=3.0)
    apply_cat_pruning(pipe, CONFIG)
    with pytest.raises(RuntimeError, match=r"transformer_blocks.1.attn .* by PAGCFGJointAttnProcessor2_0"):
        generate_sd3(pipe, pag_scale=3.0)
    remove_cat_pruning(pipe)
    assert torch.equal(generate_sd3(pipe, pag_scale=3.0), reference)


@pytest.mark.parametrize(
    ("name", "plain_variant"),
    [
        ("sd3", lambda transformer: transformer.fuse_qkv_projections()),  # FusedJointAttnProcessor2_0
        ("pixart", lambda transformer: transformer.set_default_attn_processor()),  # AttnProcessor
    ],
    ids=["sd3-fused-qkv", "pixart-default-processor"],
)
def test_plain_diffusers_processors_work(name: str, plain_variant: Callable[[Any], None]) -> None:
    """diffusers' other plain processors compute the same attention: keep 1.0 equals the unpatched model."""
    make, generate = MODELS[name]
    pipe = make()
    plain_variant(pipe.transformer)
    reference = generate(pipe)
    state = apply_cat_pruning(pipe, CATPruningConfig(keep_ratio=1.0, start_step=START))
    # float32 rounding differs between the processors' kernels; it grows with the latents' magnitude.
    tolerance = 1e-5 * (1.0 + float(reference.abs().max()))
    torch.testing.assert_close(generate(pipe), reference, atol=tolerance, rtol=0)
    assert state.stats.pruned_steps == STEPS - START


# --- diffusers' caches


CACHES: dict[str, tuple[str, Callable[[torch.nn.Module], None]]] = {
    "first-block-cache": (
        "FirstBlockCache",
        lambda model: apply_first_block_cache(model, FirstBlockCacheConfig(threshold=0.05)),
    ),
    "pyramid-attention-broadcast": (
        "PyramidAttentionBroadcast",
        lambda model: apply_pyramid_attention_broadcast(
            model,
            PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=2, current_timestep_callback=lambda: 500
            ),
        ),
    ),
    "faster-cache": (
        "FasterCache",
        lambda model: apply_faster_cache(
            model,
            FasterCacheConfig(spatial_attention_block_skip_range=2, current_timestep_callback=lambda: 500),
        ),
    ),
    "mag-cache": (
        "MagCache",
        lambda model: apply_mag_cache(
            model, MagCacheConfig(mag_ratios=[1.0] * STEPS, num_inference_steps=STEPS)
        ),
    ),
}
"""diffusers' caches applied with their hooks (SD3 and PixArt have no ``enable_cache`` in diffusers 0.42)."""


def remove_cache_hooks(model: torch.nn.Module) -> None:
    """What the error says to do for a cache applied without ``enable_cache``."""
    for hooks in enabled_caches(model).values():
        for hook in hooks:
            HookRegistry.check_if_exists_or_initialize(model).remove_hook(hook, recurse=True)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("cache", list(CACHES))
def test_a_cache_enabled_before_is_refused_and_nothing_changes(cache: str, name: str) -> None:
    make, generate = MODELS[name]
    cache_name, enable = CACHES[cache]
    pipe = make()
    enable(pipe.transformer)
    before = snapshot(pipe.transformer)
    with pytest.raises(
        RuntimeError, match=rf"cannot be combined with diffusers' {cache_name}, enabled on"
    ) as error:
        apply_cat_pruning(pipe, CONFIG)
    assert "before apply_cat_pruning (remove its hooks" in str(error.value)
    assert_unchanged(pipe.transformer, before)

    remove_cache_hooks(pipe.transformer)
    state = apply_cat_pruning(pipe, CONFIG)
    generate(pipe)
    assert (state.stats.steps, state.stats.pruned_steps) == (STEPS, STEPS - START)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("cache", list(CACHES))
def test_a_cache_enabled_after_apply_is_refused_at_the_next_generation(cache: str, name: str) -> None:
    make, generate = MODELS[name]
    cache_name, enable = CACHES[cache]
    pipe = make()
    reference = generate(pipe)
    state = apply_cat_pruning(pipe, CONFIG)
    pruned = generate(pipe)
    enable(pipe.transformer)
    with pytest.raises(
        RuntimeError, match=rf"diffusers' {cache_name}, enabled on .* after apply_cat_pruning"
    ):
        generate(pipe)

    # Either way out that the error gives: disable the cache and prune, or remove pruning.
    remove_cache_hooks(pipe.transformer)
    assert torch.equal(generate(pipe), pruned)
    assert (state.stats.steps, state.stats.pruned_steps) == (STEPS, STEPS - START)
    remove_cat_pruning(pipe)
    assert torch.equal(generate(pipe), reference)


class CacheableSD3(SD3Transformer2DModel, CacheMixin):
    """SD3 with diffusers' ``enable_cache`` / ``disable_cache``, as models with ``CacheMixin`` have them."""


def cacheable_sd3_pipeline() -> Any:
    tiny = tiny_sd3()
    transformer = CacheableSD3.from_config(tiny.config).eval()
    transformer.load_state_dict(tiny.state_dict())
    return sd3_pipeline(transformer)


def test_enable_cache_is_refused_in_both_orders_with_disable_cache_as_the_way_out() -> None:
    pipe = cacheable_sd3_pipeline()
    reference = generate_sd3(pipe)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.05))
    before = snapshot(pipe.transformer)
    with pytest.raises(
        RuntimeError, match=r"diffusers' FirstBlockCache, enabled on this CacheableSD3"
    ) as error:
        apply_cat_pruning(pipe, CONFIG)
    assert "pipe.transformer.disable_cache()" in str(error.value)
    assert_unchanged(pipe.transformer, before)

    pipe.transformer.disable_cache()
    apply_cat_pruning(pipe, CONFIG)
    pruned = generate_sd3(pipe)
    assert not torch.allclose(pruned, reference, atol=1e-4)
    pipe.transformer.enable_cache(PyramidAttentionBroadcastConfig(current_timestep_callback=lambda: 500))
    with pytest.raises(RuntimeError, match=r"PyramidAttentionBroadcast, enabled on .* after") as error:
        generate_sd3(pipe)
    assert "pipe.transformer.disable_cache()" in str(error.value)
    pipe.transformer.disable_cache()
    assert torch.equal(generate_sd3(pipe), pruned)


# --- without any of them


@pytest.mark.parametrize("name", list(MODELS))
def test_a_plain_pipeline_passes_the_checks_at_every_generation(name: str) -> None:
    make, generate = MODELS[name]
    pipe = make()
    state = apply_cat_pruning(pipe, CONFIG)
    assert len(state.checks) >= 2
    for _ in range(2):
        generate(pipe)
        assert (state.stats.steps, state.stats.pruned_steps) == (STEPS, STEPS - START)
    for check in state.checks:
        check()
