"""Word-level tokenizer and a small trained text encoder for the shapes caption grammar.

The tokenizer is rebuilt from the vocabulary stored in the encoder's config, so a saved model needs
no tokenizer files. The empty prompt (classifier-free guidance's unconditional input) is a lone start
token, so every caption has at least one token to attend to.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from .scenes import VOCABULARY

PAD, START = "<pad>", "<start>"
MAX_WORDS = 23
"""The longest grammar caption has 21 words (two objects with four-word position phrases)."""


class ShapesTokenizer:
    """Maps prompts to (ids, mask) of shape (B, 1 + max_words); case and extra spaces are ignored."""

    def __init__(self, vocabulary: Sequence[str], max_words: int = MAX_WORDS) -> None:
        self.words = tuple(vocabulary)
        self.max_words = max_words
        self._ids = {word: i for i, word in enumerate((PAD, START, *self.words))}

    @property
    def size(self) -> int:
        return len(self._ids)

    def __call__(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = torch.zeros(len(prompts), 1 + self.max_words, dtype=torch.long)
        ids[:, 0] = self._ids[START]
        for row, prompt in enumerate(prompts):
            words = prompt.lower().split()
            unknown = sorted({w for w in words if w not in self.words})
            if unknown:
                raise ValueError(
                    f"unknown word(s) {', '.join(map(repr, unknown))} in prompt {prompt!r}; "
                    f"this model knows only: {' '.join(self.words)}"
                )
            if len(words) > self.max_words:
                raise ValueError(f"prompt has {len(words)} words, this model reads at most {self.max_words}")
            ids[row, 1 : 1 + len(words)] = torch.tensor([self._ids[w] for w in words], dtype=torch.long)
        return ids, ids != self._ids[PAD]


class ShapesTextEncoder(ModelMixin, ConfigMixin):
    """Token + position embeddings and a few transformer layers, trained jointly with the diffusion model.

    Contextual layers (not just a lookup) let each word see its neighbours, so a colour is bound to the
    shape and position of its own phrase before the image model reads it. Returns per-token embeddings
    (B, L, dim) and a pooled vector (B, pooled_dim): the masked mean, projected, for the MMDiT's AdaLN.
    """

    @register_to_config
    def __init__(
        self,
        vocabulary: Sequence[str] = VOCABULARY,
        max_words: int = MAX_WORDS,
        dim: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        pooled_dim: int = 128,
    ) -> None:
        super().__init__()
        self.tokenizer = ShapesTokenizer(vocabulary, max_words)
        self.token_embedding = nn.Embedding(self.tokenizer.size, dim)
        self.position_embedding = nn.Parameter(torch.zeros(1, 1 + max_words, dim))
        layer = nn.TransformerEncoderLayer(
            dim, num_heads, dim_feedforward=4 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.pooled_projection = nn.Linear(dim, pooled_dim)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.02)

    def tokenize(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenizer(prompts)
        return ids.to(self.device), mask.to(self.device)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.token_embedding(ids) + self.position_embedding[:, : ids.shape[1]]
        hidden = self.norm(self.layers(hidden, src_key_padding_mask=~mask))
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1)
        return hidden, self.pooled_projection(pooled)

    def encode(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(embeddings, pooled, mask); an unknown word raises ValueError listing the vocabulary."""
        ids, mask = self.tokenize(prompts)
        hidden, pooled = self(ids, mask)
        return hidden, pooled, mask
