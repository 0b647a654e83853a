"""What an adapter tells the shared mechanism about one transformer class."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from ..pruning import Processor, PruningState


def linear_macs(*modules: nn.Module | None) -> int:
    """Multiply-accumulates per token of every ``nn.Linear`` inside ``modules``."""
    return sum(
        layer.in_features * layer.out_features
        for module in modules
        if module is not None
        for layer in module.modules()
        if isinstance(layer, nn.Linear)
    )


class ModelAdapter:
    """Names the modules of a transformer class and says which attention is which.

    The mechanism (``catprune.pruning``) gathers the selected tokens after ``embedder``, scatters them
    back after ``output_projection`` and installs the processors returned by ``attention_processors``.
    """

    model_class: ClassVar[type[nn.Module]]
    embedder: ClassVar[str] = "pos_embed"
    output_projection: ClassVar[str] = "proj_out"

    def token_grid(self, model: nn.Module, hidden_states: torch.Tensor) -> tuple[int, int]:
        """The (height, width) of the image token grid for a latent batch (B, C, H, W)."""
        patch = model.config.patch_size
        return hidden_states.shape[-2] // patch, hidden_states.shape[-1] // patch

    def noise_channels(self, model: nn.Module) -> int:
        """How many leading output channels form the noise prediction (all of them by default)."""
        return model.out_channels

    def noise_tokens(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """Output tokens (B, N, p*p*C_out) -> their noise channels (B, N, p*p*C_noise)."""
        kept = self.noise_channels(model)
        if kept == model.out_channels:
            return tokens
        return tokens.unflatten(-1, (-1, model.out_channels))[..., :kept].flatten(-2)

    def is_auxiliary_call(self, arguments: dict[str, Any]) -> bool:
        """Whether a call is an extra evaluation inside a step (runs unpruned, is not counted as a step)."""
        return False

    def text_tokens(self, arguments: dict[str, Any]) -> int:
        text = arguments.get("encoder_hidden_states")
        return 0 if text is None else text.shape[1]

    def attention_processors(self, model: nn.Module, state: PruningState) -> Iterator[Processor]:
        raise NotImplementedError

    text_embedder: ClassVar[str]
    """The module that projects the text embeddings (run on every step, for every text token)."""

    def step_macs(
        self, model: nn.Module, image_queries: int, image_tokens: int, text_tokens: int, pruned: bool
    ) -> int:
        """MACs of one transformer call per sample, from the layer shapes: ``image_queries`` of the
        ``image_tokens`` go through the blocks. adaLN and timestep embeddings, the same in every step and
        tiny, are left out."""
        embedder = model.get_submodule(self.embedder)
        patchify = sum(conv.weight.numel() for conv in embedder.modules() if isinstance(conv, nn.Conv2d))
        total = image_tokens * patchify
        total += image_queries * linear_macs(model.get_submodule(self.output_projection))
        total += text_tokens * linear_macs(model.get_submodule(self.text_embedder))
        for block in model.transformer_blocks:
            total += self.block_macs(block, image_queries, image_tokens, text_tokens, pruned)
        return total

    def block_macs(
        self, block: nn.Module, image_queries: int, image_tokens: int, text_tokens: int, pruned: bool
    ) -> int:
        """MACs of one block per sample (see :meth:`step_macs`)."""
        raise NotImplementedError
