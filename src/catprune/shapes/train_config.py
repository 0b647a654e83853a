"""What defines a training run of a shapes model (:class:`TrainConfig`) and the training sets it draws
from: numpy only, so that ``catprune train-shapes --help`` shows the defaults without importing torch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from . import scenes, textures

Arch = Literal["mmdit", "pixart"]
ARCHES: tuple[str, ...] = ("mmdit", "pixart")
HEAD_DIM = 32


@dataclass(frozen=True)
class DataSet:
    """A procedural training set and what the model built for it depends on."""

    make_dataset: Callable[[int, int, str, int], tuple[np.ndarray, list[str]]]
    object_masks: Callable[[int, int, str, int], np.ndarray]
    image_size: int
    vocabulary: tuple[str, ...]
    flow_shift: float
    """The MMDiT sampler's timestep shift: none for 32x32 pixels; SD3's 3 at 64x64, where the
    broad-spectrum textures keep much of their signal at moderate noise."""


DATASETS: dict[str, DataSet] = {
    "shapes": DataSet(scenes.make_dataset, scenes.object_masks, 32, scenes.VOCABULARY, 1.0),
    "textures": DataSet(
        textures.make_dataset, textures.object_masks, textures.IMAGE_SIZE, textures.VOCABULARY, 3.0
    ),
}


@dataclass
class TrainConfig:
    """Everything that defines a run; saved with its checkpoints."""

    arch: str = "mmdit"
    data: str = "shapes"
    width: int = 96
    layers: int = 5
    text_layers: int = 2
    batch_size: int = 32
    lr: float = 6e-4
    warmup_steps: int = 150
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    bf16: bool = True
    """Autocast matmuls to bfloat16 (weights, optimizer and EMA stay float32): twice as fast on CPUs with
    AVX512-BF16, which is how the shipped models were trained."""
    steps: int | None = None
    minutes: float | None = None
    seed: int = 0
    object_weight: float | None = None
    """Loss weight of the named objects' pixels relative to the backdrop's (None: unweighted; each
    image's weights are scaled to average 1). On textures most of the loss is backdrop detail that the
    caption does not fix, whose gradient noise drowns the few pixels the caption decides. But it biases a
    model that cannot yet place the objects towards painting their colours wherever one might be (tried
    on textures-mmdit, not shipped: docs/shapes-models.md). Besides the budget, the only setting a
    resumed run may change."""

    def __post_init__(self) -> None:
        if self.arch not in ARCHES:
            raise ValueError(f"arch must be one of {', '.join(ARCHES)}, got {self.arch!r}")
        if self.data not in DATASETS:
            raise ValueError(f"data must be one of {', '.join(DATASETS)}, got {self.data!r}")
        if (self.steps is None) == (self.minutes is None):
            raise ValueError("give exactly one training budget: steps or minutes")
        if self.width % HEAD_DIM:
            raise ValueError(f"width must be a multiple of {HEAD_DIM}, got {self.width}")
        if self.object_weight is not None and not self.object_weight > 0:
            raise ValueError(f"object_weight must be positive, got {self.object_weight}")
