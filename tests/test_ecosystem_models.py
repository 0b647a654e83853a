"""Pruning where a diffusers user puts it, on the model side: LoRA (peft), dtypes, CPU offload, saving.

Tiny real SD3 components with random weights on the CPU, no downloads. Keep ratio 1.0 recomputes every
token at the pruned steps, through catprune's attention processors: it must give what the unpatched
pipeline gives (atol 1e-5 in float32), which checks that whatever the user combined pruning with (LoRA
layers, a LoRA scale, fused weights, another dtype, offload hooks) also acts at the pruned steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate.hooks import CpuOffload
from conftest import sd3_pipeline, sd3_prompts, seeded_latents, tiny_sd3
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.utils.torch_utils import get_device
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from catprune import CATPruningConfig, apply_cat_pruning, remove_cat_pruning
from catprune.engine import CachingProcessor, PruningEngine

STEPS, START = 6, 3
SIZE = 128  # 16x16 latents (the pipeline's VAE factor is 8 without a VAE): 8x8 = 64 image tokens
KEEP_ALL = CATPruningConfig(keep_ratio=1.0, start_step=START)
PRUNE = CATPruningConfig(keep_ratio=0.3, start_step=START)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
"""The image projections that catprune's processors recompute at pruned steps, and the text ones."""


def generate(pipe: Any, dtype: torch.dtype = torch.float32, **kwargs: Any) -> torch.Tensor:
    """Final latents of a ``STEPS``-step generation of two prompts with CFG, inputs in ``dtype``."""
    prompts = {name: tensor.to(dtype) for name, tensor in sd3_prompts(2).items()}
    return pipe(
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        latents=seeded_latents(2).to(dtype),
        output_type="latent",
        **prompts,
        **kwargs,
    ).images


def assert_pruned(state: PruningEngine, keep_ratio: float) -> None:
    stats = state.stats
    assert (stats.steps, stats.pruned_steps) == (STEPS, STEPS - START)
    assert (stats.image_tokens, stats.kept_tokens) == (64, round(keep_ratio * 64))


def assert_catprune_processors(transformer: torch.nn.Module) -> None:
    for block in transformer.transformer_blocks:
        assert isinstance(block.attn.processor, CachingProcessor)


# --- (3) LoRA on the transformer (peft)


def add_lora(transformer: SD3Transformer2DModel) -> SD3Transformer2DModel:
    """A LoRA adapter that is not a no-op (``init_lora_weights=False``: B is random, not zero), the same
    weights every time."""
    torch.manual_seed(5)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=False)
    transformer.add_adapter(config)
    return transformer


def lora_pipeline() -> StableDiffusion3Pipeline:
    return sd3_pipeline(add_lora(tiny_sd3()))


def pruned_lora_pipeline(order: str, config: CATPruningConfig) -> tuple[Any, PruningEngine]:
    """A pipeline with the LoRA of :func:`add_lora` and pruning, applied in ``order``."""
    if order == "lora-then-prune":
        pipe = lora_pipeline()
        return pipe, apply_cat_pruning(pipe, config)
    pipe = sd3_pipeline(tiny_sd3())
    state = apply_cat_pruning(pipe, config)
    add_lora(pipe.transformer)
    return pipe, state


@pytest.mark.parametrize("order", ["lora-then-prune", "prune-then-lora"])
def test_lora_works_with_pruning_applied_before_or_after_it(order: str) -> None:
    base = generate(sd3_pipeline(tiny_sd3()))
    reference = generate(lora_pipeline())
    assert not torch.allclose(reference, base, atol=1e-3), "the LoRA must change the output"

    pipe, state = pruned_lora_pipeline(order, KEEP_ALL)
    assert isinstance(pipe.transformer.transformer_blocks[0].attn.to_q, BaseTunerLayer)
    assert_catprune_processors(pipe.transformer)
    torch.testing.assert_close(generate(pipe), reference, atol=1e-5, rtol=0)
    assert_pruned(state, 1.0)

    pipe, state = pruned_lora_pipeline(order, PRUNE)
    pruned = generate(pipe)
    assert_pruned(state, 0.3)
    assert torch.isfinite(pruned).all()
    assert not torch.allclose(pruned, reference, atol=1e-4)


def test_lora_scale_passed_in_joint_attention_kwargs() -> None:
    """SD3's pipeline passes ``joint_attention_kwargs`` to the transformer, whose forward (diffusers'
    ``apply_lora_scale``) scales the peft layers by its ``"scale"`` for the call and unscales them after:
    the pruned steps see the scaled LoRA, and the next generation at scale 1.0 is unaffected."""
    unpruned = lora_pipeline()
    full, half = generate(unpruned), generate(unpruned, joint_attention_kwargs={"scale": 0.5})
    assert not torch.allclose(full, half, atol=1e-3), "the scale must change the output"

    pipe, state = pruned_lora_pipeline("lora-then-prune", KEEP_ALL)
    kwargs = {"scale": 0.5}
    torch.testing.assert_close(generate(pipe, joint_attention_kwargs=kwargs), half, atol=1e-5, rtol=0)
    assert_pruned(state, 1.0)
    assert kwargs == {"scale": 0.5}
    torch.testing.assert_close(generate(pipe), full, atol=1e-5, rtol=0)

    pipe, state = pruned_lora_pipeline("lora-then-prune", PRUNE)
    pruned_half = generate(pipe, joint_attention_kwargs={"scale": 0.5})
    assert_pruned(state, 0.3)
    assert not torch.allclose(pruned_half, generate(pipe), atol=1e-3)


def test_fused_unfused_and_unloaded_lora() -> None:
    """The bare transformer's ``fuse_lora`` (peft's merge into the base weights), ``unfuse_lora`` and
    ``unload_lora`` (PeftAdapterMixin), all after pruning was applied."""
    reference = lora_pipeline()
    pipe, state = pruned_lora_pipeline("lora-then-prune", KEEP_ALL)
    unfused = generate(reference)

    for transformer in (reference.transformer, pipe.transformer):
        transformer.fuse_lora()
        assert transformer.transformer_blocks[0].attn.to_q.merged
    fused = generate(reference)
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=0)  # the same LoRA, merged
    torch.testing.assert_close(generate(pipe), fused, atol=1e-5, rtol=0)
    assert_pruned(state, 1.0)

    for transformer in (reference.transformer, pipe.transformer):
        transformer.unfuse_lora()
        assert not transformer.transformer_blocks[0].attn.to_q.merged
    torch.testing.assert_close(generate(pipe), generate(reference), atol=1e-5, rtol=0)

    pipe.transformer.unload_lora()
    assert not isinstance(pipe.transformer.transformer_blocks[0].attn.to_q, BaseTunerLayer)
    assert_catprune_processors(pipe.transformer)
    torch.testing.assert_close(generate(pipe), generate(sd3_pipeline(tiny_sd3())), atol=1e-5, rtol=0)
    assert_pruned(state, 1.0)


@pytest.mark.parametrize("order", ["load-then-prune", "prune-then-load"])
def test_pipeline_load_lora_weights_from_a_local_safetensors_file(order: str, tmp_path: Path) -> None:
    """``pipe.load_lora_weights`` reads a LoRA file saved here (diffusers' own ``save_lora_weights``: no
    download), then the pipeline-level ``fuse_lora(lora_scale=...)``, ``unfuse_lora`` and
    ``unload_lora_weights``."""
    StableDiffusion3Pipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=get_peft_model_state_dict(add_lora(tiny_sd3()))
    )
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    base = generate(sd3_pipeline(tiny_sd3()))
    reference = sd3_pipeline(tiny_sd3())
    reference.load_lora_weights(tmp_path, adapter_name="local")
    with_lora = generate(reference)
    assert not torch.allclose(with_lora, base, atol=1e-3)

    pipe = sd3_pipeline(tiny_sd3())
    if order == "load-then-prune":
        pipe.load_lora_weights(tmp_path, adapter_name="local")
        state = apply_cat_pruning(pipe, KEEP_ALL)
    else:
        state = apply_cat_pruning(pipe, KEEP_ALL)
        pipe.load_lora_weights(tmp_path, adapter_name="local")
    torch.testing.assert_close(generate(pipe), with_lora, atol=1e-5, rtol=0)
    assert_pruned(state, 1.0)

    reference.fuse_lora(lora_scale=0.5)
    pipe.fuse_lora(lora_scale=0.5)
    fused_half = generate(reference)
    assert not torch.allclose(fused_half, with_lora, atol=1e-3)
    torch.testing.assert_close(generate(pipe), fused_half, atol=1e-5, rtol=0)

    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    assert_catprune_processors(pipe.transformer)
    torch.testing.assert_close(generate(pipe), base, atol=1e-5, rtol=0)
    assert_pruned(state, 1.0)


# --- (5) dtypes and devices

REDUCED_PRECISION = {
    # Two units in the last place at the value's magnitude (bfloat16 keeps 8 significant bits: 2^-7
    # between 1 and 2; float16 keeps 11: 2^-10), with the same as an absolute floor for values near 0.
    # Keep 1.0 runs the same arithmetic as diffusers' processor but as different operations (K/V written
    # into a cache, then one attention over it): in reduced precision a different operation order may
    # round an intermediate differently (one ulp), which 2 blocks x 3 pruned steps carry into the latents
    # at about that size. On this machine the results are bit-identical; a wrong dtype or a stale cache
    # is off by far more (bf16 vs float32 here: ~5e-2).
    torch.bfloat16: {"rtol": 2 * 2**-7, "atol": 2 * 2**-7},
    torch.float16: {"rtol": 2 * 2**-10, "atol": 2 * 2**-10},
}


def cache_tensors(state: PruningEngine) -> list[torch.Tensor]:
    return [t for p in state.processors for t in (p.cache.key, p.cache.value)]


@pytest.mark.parametrize("dtype", list(REDUCED_PRECISION), ids=str)
def test_pipe_to_another_dtype_after_pruning_reallocates_the_caches(dtype: torch.dtype) -> None:
    pipe = sd3_pipeline(tiny_sd3())
    state = apply_cat_pruning(pipe, KEEP_ALL)
    reference = generate(sd3_pipeline(tiny_sd3()))
    torch.testing.assert_close(generate(pipe), reference, atol=1e-5, rtol=0)
    float_caches = cache_tensors(state)
    assert {t.dtype for t in float_caches} == {torch.float32}
    float_bytes = sum(p.cache_bytes() for p in state.processors)

    pipe.to(dtype)
    reduced = generate(pipe, dtype)
    assert reduced.dtype == dtype
    assert_pruned(state, 1.0)
    caches = cache_tensors(state)
    assert {t.dtype for t in caches} == {dtype}
    assert not any(new is old for new, old in zip(caches, float_caches, strict=True))
    assert 2 * sum(p.cache_bytes() for p in state.processors) == float_bytes
    unpruned = sd3_pipeline(tiny_sd3()).to(dtype)
    torch.testing.assert_close(reduced, generate(unpruned, dtype), **REDUCED_PRECISION[dtype])

    # Back to float32: the weights keep their rounding to ``dtype``, so the reference makes the same trip.
    pipe.to(torch.float32)
    torch.testing.assert_close(generate(pipe), generate(unpruned.to(torch.float32)), atol=1e-5, rtol=0)
    assert {t.dtype for t in cache_tensors(state)} == {torch.float32}


def test_pruned_steps_run_in_bfloat16() -> None:
    pipe = sd3_pipeline(tiny_sd3())
    state = apply_cat_pruning(pipe, PRUNE)
    pipe.to(torch.bfloat16)
    pruned = generate(pipe, torch.bfloat16)
    assert_pruned(state, 0.3)
    assert pruned.dtype == torch.bfloat16 and torch.isfinite(pruned).all()
    reference = generate(sd3_pipeline(tiny_sd3()).to(torch.bfloat16), torch.bfloat16)
    assert not torch.allclose(pruned, reference, **REDUCED_PRECISION[torch.bfloat16])


HAS_ACCELERATOR = get_device() != "cpu"


@pytest.mark.skipif(HAS_ACCELERATOR, reason="checks what diffusers does on a machine without an accelerator")
@pytest.mark.parametrize("offload", ["enable_model_cpu_offload", "enable_sequential_cpu_offload"])
def test_cpu_offload_without_an_accelerator_is_refused_by_diffusers(offload: str) -> None:
    """diffusers refuses both offloads without an accelerator (no device given), before changing anything:
    the pruned pipeline still runs as before."""
    pipe = sd3_pipeline(tiny_sd3())
    state = apply_cat_pruning(pipe, KEEP_ALL)
    with pytest.raises(RuntimeError, match="requires accelerator, but not found"):
        getattr(pipe, offload)()
    torch.testing.assert_close(generate(pipe), generate(sd3_pipeline(tiny_sd3())), atol=1e-5, rtol=0)
    assert_pruned(state, 1.0)


def offloaded_pruned_pipeline(order: str, config: CATPruningConfig) -> tuple[Any, PruningEngine]:
    """``enable_model_cpu_offload(device="cpu")``: diffusers' documented ``device`` argument, accelerate's
    real offload hooks (moving to the execution device "cpu:0" is a no-op here, the hooks and their
    re-installation after every call are not)."""
    pipe = sd3_pipeline(tiny_sd3())
    if order == "prune-then-offload":
        state = apply_cat_pruning(pipe, config)
        pipe.enable_model_cpu_offload(device="cpu")
    else:
        pipe.enable_model_cpu_offload(device="cpu")
        state = apply_cat_pruning(pipe, config)
    assert isinstance(pipe.transformer._hf_hook, CpuOffload)
    return pipe, state


@pytest.fixture
def offload_calls(monkeypatch: pytest.MonkeyPatch) -> list[torch.nn.Module]:
    """The modules whose call went through accelerate's model-offload hook (which moves them to the
    execution device), in order."""
    calls: list[torch.nn.Module] = []
    pre_forward = CpuOffload.pre_forward

    def counting(self: CpuOffload, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        calls.append(module)
        return pre_forward(self, module, *args, **kwargs)

    monkeypatch.setattr(CpuOffload, "pre_forward", counting)
    return calls


def transformer_calls(calls: list[torch.nn.Module], pipe: Any) -> int:
    return sum(module is pipe.transformer for module in calls)


@pytest.mark.parametrize(
    "order",
    [
        "prune-then-offload",
        "offload-then-prune",
    ],
)
def test_model_cpu_offload_keeps_pruning_every_generation(
    order: str, offload_calls: list[torch.nn.Module]
) -> None:
    """Three generations in a row each equal a fresh pruned pipeline's (keep 0.3: at keep 1.0 a stale
    step plan recomputes every token and hides the difference), every step through the offload hook."""
    fresh = sd3_pipeline(tiny_sd3())
    apply_cat_pruning(fresh, PRUNE)
    expected = generate(fresh)
    pipe, state = offloaded_pruned_pipeline(order, PRUNE)
    steps: list[int] = []
    state.add_observer(lambda record: steps.append(record.step))
    for generation in range(3):
        steps.clear()
        offload_calls.clear()
        pruned = generate(pipe)
        assert steps == list(range(STEPS)), f"generation {generation}: steps seen by pruning"
        torch.testing.assert_close(pruned, expected, atol=1e-5, rtol=0, msg=f"generation {generation}")
        assert_pruned(state, 0.3)
        assert transformer_calls(offload_calls, pipe) == STEPS


def test_remove_cat_pruning_under_model_cpu_offload(offload_calls: list[torch.nn.Module]) -> None:
    unpatched = generate(sd3_pipeline(tiny_sd3()))
    pipe, _ = offloaded_pruned_pipeline("prune-then-offload", PRUNE)
    generate(pipe)
    remove_cat_pruning(pipe)
    for generation in range(2):
        offload_calls.clear()
        output = generate(pipe)
        torch.testing.assert_close(output, unpatched, atol=1e-5, rtol=0, msg=f"generation {generation}")
        assert transformer_calls(offload_calls, pipe) == STEPS, f"generation {generation}: offload hook"


def test_sequential_cpu_offload_behaves_as_without_pruning() -> None:
    """``enable_sequential_cpu_offload(device="cpu")`` fails in accelerate on this machine with or
    without pruning (moving parameters to "meta" after each submodule: a TypeError from
    ``set_module_tensor_to_device``, accelerate 1.15 / torch 2.13); whatever it does, pruning must not
    change it."""

    def outcome(pipe: Any) -> Any:
        pipe.enable_sequential_cpu_offload(device="cpu")
        try:
            return generate(pipe)
        except Exception as error:
            return type(error)

    unpatched = outcome(sd3_pipeline(tiny_sd3()))
    pipe = sd3_pipeline(tiny_sd3())
    apply_cat_pruning(pipe, KEEP_ALL)
    patched = outcome(pipe)
    if isinstance(unpatched, torch.Tensor):
        torch.testing.assert_close(patched, unpatched, atol=1e-5, rtol=0)
    else:
        assert patched is unpatched


# --- (8) saving


def saved_files(folder: Path) -> dict[str, Any]:
    """Every file under ``folder``: JSON parsed, safetensors as their tensors."""
    files: dict[str, Any] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix == ".json":
            files[str(path.relative_to(folder))] = json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            files[str(path.relative_to(folder))] = load_file(path)
        elif path.is_file():
            files[str(path.relative_to(folder))] = path.read_bytes()
    return files


@pytest.mark.parametrize("what", ["pipeline", "transformer"])
def test_save_pretrained_of_a_patched_model_writes_the_original_only(what: str, tmp_path: Path) -> None:
    original = sd3_pipeline(tiny_sd3())
    reference = generate(original)
    original_processors = {name: type(p) for name, p in original.transformer.attn_processors.items()}
    pipe = sd3_pipeline(tiny_sd3())
    state = apply_cat_pruning(pipe, PRUNE)
    generate(pipe)  # caches allocated, a pruned generation done

    def save(target: Any, folder: Path) -> None:
        (target if what == "pipeline" else target.transformer).save_pretrained(folder)

    save(original, tmp_path / "unpatched")
    save(pipe, tmp_path / "patched")
    unpatched_files, patched_files = saved_files(tmp_path / "unpatched"), saved_files(tmp_path / "patched")
    assert patched_files.keys() == unpatched_files.keys()
    for name, content in patched_files.items():
        if name.endswith(".safetensors"):
            assert content.keys() == unpatched_files[name].keys(), name
            for key, tensor in content.items():
                assert torch.equal(tensor, unpatched_files[name][key]), key
        else:
            assert content == unpatched_files[name], name
            assert "catprune" not in json.dumps(content).lower(), name

    if what == "pipeline":
        absent = {name: None for name, component in original.components.items() if component is None}
        loaded = StableDiffusion3Pipeline.from_pretrained(tmp_path / "patched", **absent)
        loaded.set_progress_bar_config(disable=True)
    else:
        loaded = sd3_pipeline(SD3Transformer2DModel.from_pretrained(tmp_path / "patched"))
    transformer = loaded.transformer
    assert not hasattr(transformer, "_catprune_engine")
    assert {name: type(p) for name, p in transformer.attn_processors.items()} == original_processors
    assert not any(isinstance(p, CachingProcessor) for p in transformer.attn_processors.values())
    assert not getattr(getattr(transformer, "_diffusers_hook", None), "hooks", {})
    torch.testing.assert_close(generate(loaded), reference, atol=0, rtol=0)

    generate(pipe)  # saving left the patched pipeline pruning
    assert_pruned(state, 0.3)
