"""Each documented error is raised for its bad input, and nothing is half-applied after it."""

from __future__ import annotations

import pytest
import torch
from conftest import sd3_pipeline, seeded_latents, tiny_sd3
from diffusers import UNet2DModel

from catprune import CATPruningConfig, apply_cat_pruning, remove_cat_pruning


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"keep_ratio": 0.0}, "keep_ratio"),
        ({"keep_ratio": 1.5}, "keep_ratio"),
        ({"start_step": 1}, "start_step"),
        ({"start_step": 2.5}, "start_step"),
        ({"num_clusters": 0}, "num_clusters"),
        ({"cluster_feature_scale": -1.0}, "cluster_feature_scale"),
        ({"noise_fraction": 1.2}, "noise_fraction"),
        ({"ewma_decay": 1.0}, "ewma_decay"),
        ({"kmeans_iterations": 0}, "kmeans_iterations"),
        ({"seed": "zero"}, "seed"),
        ({"row_pairing": "pairs"}, "row_pairing"),
    ],
)
def test_bad_config_raises_value_error(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CATPruningConfig(**settings)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"keep_ratio": "0.3"},
            r"keep_ratio must be a finite number, got '0.3' \(str\); write keep_ratio=0.3$",
        ),
        ({"keep_ratio": None}, r"keep_ratio must be a finite number, got None \(NoneType\)$"),
        ({"keep_ratio": float("nan")}, "keep_ratio must be a finite number"),
        ({"start_step": "8"}, r"start_step must be an integer, got '8' \(str\); write start_step=8$"),
        ({"num_clusters": True}, r"num_clusters must be an integer, got True \(bool\)$"),
        (
            {"cluster_feature_scale": "big"},
            r"cluster_feature_scale must be a finite number, got 'big' \(str\)$",
        ),
        ({"noise_fraction": [0.25]}, "noise_fraction must be a finite number"),
        ({"ewma_decay": "0.5"}, "ewma_decay must be a finite number"),
        ({"kmeans_iterations": 30.0}, "kmeans_iterations must be an integer"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"kept_multiple": "64"}, "kept_multiple must be an integer"),
        ({"refresh_steps": -1}, "refresh_steps must be a sequence of integers"),
    ],
)
def test_a_setting_of_the_wrong_type_is_one_line_that_names_the_type(settings: dict, message: str) -> None:
    """Not Python's own "'<' not supported between instances of 'float' and 'str'": the field, the type it
    takes, and what was given. A TypeError that is also a ValueError, as every other bad setting is."""
    with pytest.raises(TypeError, match=message) as error:
        CATPruningConfig(**settings)
    assert isinstance(error.value, ValueError)
    assert "\n" not in str(error.value) and str(error.value).startswith("CATPruningConfig: ")


def test_numbers_of_other_numeric_types_are_accepted() -> None:
    import numpy as np

    config = CATPruningConfig(keep_ratio=1, start_step=np.int64(5), noise_fraction=np.float32(0.5))
    assert (config.keep_ratio, config.start_step, config.num_kept(10)) == (1, 5, 10)


def test_defaults_are_the_papers() -> None:
    config = CATPruningConfig()
    assert (config.keep_ratio, config.start_step, config.num_clusters) == (0.3, 8, 20)
    assert (config.cluster_feature_scale, config.noise_fraction, config.ewma_decay) == (0.05, 0.25, 0.5)
    assert config.num_kept(4096) == 1229


def test_unsupported_model_raises_type_error_naming_the_supported_classes() -> None:
    unet = UNet2DModel(
        sample_size=8,
        block_out_channels=(8,),
        down_block_types=("DownBlock2D",),
        up_block_types=("UpBlock2D",),
        norm_num_groups=4,
        layers_per_block=1,
    )
    forward = unet.forward
    with pytest.raises(TypeError, match=r"SD3Transformer2DModel.*PixArtTransformer2DModel"):
        apply_cat_pruning(unet)
    assert unet.forward == forward and not hasattr(unet, "_catprune_engine")
    with pytest.raises(TypeError, match="pipeline"):
        apply_cat_pruning("not a model")
    with pytest.raises(TypeError, match="CATPruningConfig"):
        apply_cat_pruning(tiny_sd3(), {"keep_ratio": 0.3})


def test_applying_twice_is_a_clear_error_and_keeps_the_first_application() -> None:
    pipe = sd3_pipeline(tiny_sd3())
    state = apply_cat_pruning(pipe, CATPruningConfig(keep_ratio=0.5))
    with pytest.raises(RuntimeError, match=r"already applied.*remove_cat_pruning"):
        apply_cat_pruning(pipe, CATPruningConfig(keep_ratio=0.2))
    with pytest.raises(RuntimeError, match="already applied"):
        apply_cat_pruning(pipe.transformer)
    assert pipe.transformer._catprune_engine is state
    remove_cat_pruning(pipe)
    with pytest.warns(
        UserWarning, match=r"^CAT pruning is not applied to this SD3Transformer2DModel: nothing"
    ):
        remove_cat_pruning(pipe)  # removing again changes nothing, and says so
    apply_cat_pruning(pipe, CATPruningConfig(keep_ratio=0.2))


def test_cfg_row_pairing_needs_an_even_batch() -> None:
    transformer = tiny_sd3()
    apply_cat_pruning(transformer, CATPruningConfig(start_step=2, row_pairing="cfg"))
    inputs = {"encoder_hidden_states": torch.randn(3, 7, 32), "pooled_projections": torch.randn(3, 16)}
    with torch.no_grad(), pytest.raises(ValueError, match="even batch"):
        for timestep in (900.0, 800.0, 700.0):
            transformer(seeded_latents(3), timestep=torch.tensor([timestep] * 3), **inputs)


def test_unknown_strategy_fails_at_apply_and_changes_nothing() -> None:
    transformer = tiny_sd3()
    with pytest.raises(ValueError, match="unknown token-choice strategy"):
        apply_cat_pruning(transformer, CATPruningConfig(strategy="best"))
    assert not hasattr(transformer, "_catprune_engine")
    assert all(
        type(m.processor).__module__.startswith("diffusers")
        for m in transformer.modules()
        if hasattr(m, "processor")
    )
