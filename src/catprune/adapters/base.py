"""What an adapter tells the shared mechanism about one transformer class."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
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

    def step_macs(
        self, model: nn.Module, image_queries: int, image_tokens: int, text_tokens: int, pruned: bool
    ) -> int:
        """MACs of one transformer call per sample, from the layer shapes (adaLN and embeddings of the
        timestep, which cost the same in every step and are tiny, are left out)."""
        raise NotImplementedError

    def blocks(self, model: nn.Module) -> Iterable[nn.Module]:
        return model.transformer_blocks

    def embedding_macs(self, model: nn.Module, image_tokens: int, image_queries: int) -> int:
        """Patch embedding (always all tokens) and output projection (only the recomputed tokens)."""
        embedder = model.get_submodule(self.embedder)
        patchify = sum(conv.weight.numel() for conv in embedder.modules() if isinstance(conv, nn.Conv2d))
        return image_tokens * patchify + image_queries * linear_macs(
            model.get_submodule(self.output_projection)
        )
