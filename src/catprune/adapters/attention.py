"""Caching processors for diffusers' ``Attention`` layers, shared by the adapters whose models use them.

:class:`CachedSelfAttentionProcessor` is image self-attention over all image tokens (PixArt's ``attn1``,
SD3.5's image-only ``attn2``); an adapter whose attention also mixes in other tokens (SD3's joint
attention) subclasses it and says how (:meth:`CachedSelfAttentionProcessor.extra_projections`,
:meth:`CachedSelfAttentionProcessor.finish`). Tensors are (B, n, heads, head_dim) with tokens second,
as in the caches.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..pruning import CachingProcessor, StepMode

Projections = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(query, key, value), each (B, n, heads, head_dim)."""


def split_heads(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, n, heads * d) -> (B, n, heads, d): tokens stay the second dimension, as in the caches."""
    return tensor.unflatten(-1, (heads, -1))


def attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention over (B, n, heads, d) tensors, as diffusers' processors compute it: -> (B, n, heads*d)."""
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask
    )  # (B, heads, n, d)
    return out.transpose(1, 2).flatten(2).to(query.dtype)  # (B, n, heads * d)


def project_out(attn: Any, out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """The output projection of diffusers' ``Attention`` (with its optional residual and rescaling)."""
    out = attn.to_out[1](attn.to_out[0](out))
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


IMAGE_PROJECTIONS = ("to_q", "to_k", "to_v", "norm_q", "norm_k")
"""Names of the layers that project the image tokens in diffusers' ``Attention``: Q, K, V, Q norm, K norm."""


def projections(attn: Any, tokens: Tensor, names: tuple[str, str, str, str, str]) -> Projections:
    """Q, K, V of ``tokens`` (B, n, D) through the layers named ``names`` (see :data:`IMAGE_PROJECTIONS`),
    q/k-normalised as the layer does."""
    to_q, to_k, to_v, norm_q, norm_k = (getattr(attn, name) for name in names)
    query = split_heads(to_q(tokens), attn.heads)  # (B, n, h, d)
    key = split_heads(to_k(tokens), attn.heads)  # (B, n, h, d)
    value = split_heads(to_v(tokens), attn.heads)  # (B, n, h, d)
    if norm_q is not None:
        query = norm_q(query)
    if norm_k is not None:
        key = norm_k(key)
    return query, key, value


class CachedSelfAttentionProcessor(CachingProcessor):
    """Self-attention over all image tokens, with K/V cached per layer.

    At the fill step it computes K and V for all image tokens and fills the cache (image tokens first,
    then the rows of :meth:`extra_projections`); at a pruned step it computes Q, K, V for the selected
    image tokens only, writes K and V into the cache at their positions, rewrites the extra rows, and
    attends over the whole cache.

    With ``capture_attention`` (set by ``ModelAdapter.processors`` on one layer for attention strategies)
    it also caches the image queries the same way and stores the attention map in ``state.attention_map``.
    """

    capture_attention = False

    def __init__(self, attention: torch.nn.Module, state: Any) -> None:
        super().__init__(attention, state)
        self.query: torch.Tensor | None = None
        """(B, N, h, d) image queries of every token, kept only when capturing attention."""

    def release(self) -> None:
        super().release()
        self.query = None

    def cache_bytes(self) -> int:
        query = 0 if self.query is None else self.query.numel() * self.query.element_size()
        return super().cache_bytes() + query

    def extra_projections(self, attn: Any, context: Tensor | None) -> Projections | None:
        """Q, K, V of tokens that every step recomputes in full and that join the attention after the
        image tokens (none for plain self-attention)."""
        return None

    def finish(self, attn: Any, image_out: Tensor, extra_out: Tensor | None) -> Any:
        """What the layer returns, from the projected image output and the extra tokens' attention output."""
        return image_out

    def attend(self, attn: Any, hidden_states: Tensor, context: Tensor | None, mask: Tensor | None) -> Any:
        if mask is not None:
            raise NotImplementedError("CAT pruning does not support masked image self-attention")
        query, key, value = projections(attn, hidden_states, IMAGE_PROJECTIONS)  # (B, n, h, d), n = N or K
        extra = self.extra_projections(attn, context)  # (B, T, h, d) each, or None
        num_image, num_queries = self.state.num_tokens, hidden_states.shape[1]
        if self.state.mode is StepMode.FILL:
            self.cache.fill(key, value, extra=0 if extra is None else extra[1].shape[1])
        else:
            self.cache.update(self.state.indices, key, value, num_image)
        if extra is not None:
            self.cache.write_extra(extra[1], extra[2], num_image)
            query = torch.cat([query, extra[0]], dim=1)  # (B, n + T, h, d)
        if self.capture_attention:
            self._capture_attention(attn, query, num_queries)
        out = attend(query, self.cache.key, self.cache.value)  # (B, n + T, h * d)
        image_out = project_out(attn, out[:, :num_queries], hidden_states)
        return self.finish(attn, image_out, None if extra is None else out[:, num_queries:])

    def _capture_attention(self, attn: Any, query: torch.Tensor, num_queries: int) -> None:
        """Update the image query cache from ``query`` ([recomputed image tokens, extra tokens]) and store
        the head-averaged attention probabilities of the prompt rows over all tokens (image first); the
        extra Q K^T product is added to the generation's MACs."""
        image_query = query[:, :num_queries]
        if self.state.mode is StepMode.FILL:
            self.query = image_query.clone()
        else:
            index = self.state.indices[:, :, None, None].expand_as(image_query)
            self.query.scatter_(1, index, image_query)
        queries = torch.cat([self.query, query[:, num_queries:]], dim=1)  # (B, M, h, d)
        state = self.state
        queries, keys = state.prompt_half(queries).float(), state.prompt_half(self.cache.key).float()
        heads = queries.shape[2]
        attention = sum(
            torch.softmax(attn.scale * queries[:, :, h] @ keys[:, :, h].transpose(1, 2), dim=-1)
            for h in range(heads)
        )  # (P, M, M)
        state.attention_map = attention / heads
        rows, length = queries.shape[:2]
        state.stats.macs += rows * length * length * heads * queries.shape[3]
