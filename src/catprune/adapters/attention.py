"""Caching processors for diffusers' attention layers, shared by the adapters whose models use them.

:class:`CachedSelfAttentionProcessor` is image self-attention over all image tokens (PixArt's ``attn1``,
SD3.5's image-only ``attn2``); :class:`JointAttentionProcessor` adds the text tokens that every step
recomputes (the joint attention of SD3's blocks and Flux's double-stream blocks). Where the model passes
a rotary embedding (Flux) it is applied to queries and keys before K/V are cached: positions do not move.
Tensors are (B, n, heads, head_dim) with tokens second, as in the caches.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..engine import CachingProcessor, StepContext, StepMode, StepSlot
from ..engine.parallel import HeadExchange
from .base import linear_macs

Projections = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(query, key, value), each (B, n, heads, head_dim)."""


def split_heads(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, n, heads * d) -> (B, n, heads, d): tokens stay the second dimension, as in the caches."""
    return tensor.unflatten(-1, (heads, -1))


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None = None,
    exchange: HeadExchange | None = None,
) -> torch.Tensor:
    """Attention over (B, n, heads, d) tensors, as diffusers' processors compute it: -> (B, n, heads*d).
    With ``exchange`` (context parallelism) the queries are this process's tokens with all heads and the
    keys and values every token with this process's heads (a head-sharded cache): the queries are
    exchanged for its heads, and the output back."""
    if exchange is not None:
        if mask is not None:
            raise NotImplementedError("CAT pruning: an attention mask under context parallelism")
        query = exchange.to_heads(query)  # (B, P n, heads / P, d)
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask
    ).transpose(1, 2)  # (B, n, heads, d)
    if exchange is not None:
        out = exchange.to_tokens(out)  # (B, n, heads, d): this process's tokens, all heads
    return out.flatten(2).to(query.dtype)  # (B, n, heads * d)


def project_out(attn: Any, out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """The output projection of diffusers' attention layers (with ``Attention``'s optional residual and
    rescaling; ``FluxAttention`` has neither)."""
    out = attn.to_out[1](attn.to_out[0](out))
    if getattr(attn, "residual_connection", False):
        out = out + residual
    return out / getattr(attn, "rescale_output_factor", 1.0)


Rotary = tuple[torch.Tensor, torch.Tensor]
"""(cos, sin) of a rotary embedding: (S, d) for every row alike, or (B, S, d) per row (a pruned step's
selected tokens, see ``catprune.adapters.flux``)."""


def rotate(tensor: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """Rotary position embedding of (B, S, heads, d) queries or keys, channel pairs interleaved as
    diffusers' ``apply_rotary_emb(..., use_real=True, sequence_dim=1)`` rotates them, in float32."""
    cos, sin = (part[None] if part.ndim == 2 else part for part in rotary)  # (B or 1, S, d)
    cos, sin = cos[:, :, None], sin[:, :, None]  # (B or 1, S, 1, d)
    real, imaginary = tensor.unflatten(-1, (-1, 2)).unbind(-1)  # (B, S, h, d/2) each
    rotated = torch.stack([-imaginary, real], dim=-1).flatten(3)  # (B, S, h, d)
    return (tensor.float() * cos + rotated.float() * sin).to(tensor.dtype)


def real_rotary(frequencies: Tensor) -> Rotary:
    """Complex rotary frequencies (..., S, d/2) -> (cos, sin), each (..., S, d), with each frequency on its
    pair of interleaved channels: the rotation that Qwen-Image's and Z-Image's processors do by complex
    multiplication."""
    return frequencies.real.repeat_interleave(2, dim=-1), frequencies.imag.repeat_interleave(2, dim=-1)


def split_rotary(rotary: Rotary | None, leading: int) -> tuple[Rotary | None, Rotary | None]:
    """A rotary embedding over [``leading`` tokens, the rest] cut into the two parts (None stays None)."""
    if rotary is None:
        return None, None
    cos, sin = rotary
    return (cos[..., :leading, :], sin[..., :leading, :]), (cos[..., leading:, :], sin[..., leading:, :])


def query_mask(mask: Tensor | None, context: StepContext, lead: int) -> Tensor | None:
    """An attention mask over the layer's whole sequence (B, h or 1, L, L), as the model builds it from its
    call arguments (Chroma's text mask: ``m[q] * m[k]``), -> its rows of the queries that go through the
    block: at a pruned step the ``lead`` rows (text first, where the layer starts with it), the selected
    image tokens and the rest; its keys stay the whole sequence, as the K/V caches hold it. A mask that
    broadcasts over the queries (one row) is returned as it is."""
    if mask is None or mask.dim() != 4 or mask.shape[2] == 1:
        return mask
    return context.gather(mask.transpose(1, 2), lead).transpose(1, 2)  # (B, h or 1, lead + K + R..., L)


IMAGE_PROJECTIONS = ("to_q", "to_k", "to_v", "norm_q", "norm_k")
"""Names of the layers that project the image tokens in diffusers' ``Attention``: Q, K, V, Q norm, K norm."""


TEXT_PROJECTIONS = ("add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k")
"""The layers of a joint attention (SD3, Flux) that project the text tokens: Q, K, V, Q norm, K norm."""


FUSED_PROJECTIONS = {"to_q": "to_qkv", "add_q_proj": "to_added_qkv"}
"""The one layer that diffusers' ``fuse_qkv_projections()`` makes of a set of Q, K, V projections (keyed by
the query layer's name): one matrix product instead of three where the model was fused."""


def projections(
    attn: Any,
    tokens: Tensor,
    names: tuple[str, str, str, str, str],
    rotary: Rotary | None = None,
    upcast: bool = False,
) -> Projections:
    """Q, K, V of ``tokens`` (B, n, D) through the layers named ``names`` (see :data:`IMAGE_PROJECTIONS`),
    or their fused layer where the model's projections were fused, q/k-normalised as the layer does, then
    q/k rotated by ``rotary`` (n rows) if given; with ``upcast`` q/k are normalised and rotated in float32
    and cast back to V's dtype (FLUX.3's processor, whose q/k norms stay in float32)."""
    to_q, to_k, to_v, norm_q, norm_k = (getattr(attn, name) for name in names)
    fused = (
        getattr(attn, FUSED_PROJECTIONS[names[0]], None)
        if getattr(attn, "fused_projections", False)
        else None
    )
    if fused is not None:
        query, key, value = fused(tokens).chunk(3, dim=-1)  # (B, n, h * d) each
    else:
        query, key, value = to_q(tokens), to_k(tokens), to_v(tokens)  # (B, n, h * d) each
    query = split_heads(query, attn.heads)  # (B, n, h, d)
    key = split_heads(key, attn.heads)  # (B, n, h, d)
    value = split_heads(value, attn.heads)  # (B, n, h, d)
    if upcast:
        query, key = query.float(), key.float()
    if norm_q is not None:
        query = norm_q(query)
    if norm_k is not None:
        key = norm_k(key)
    if rotary is not None:
        query, key = rotate(query, rotary), rotate(key, rotary)
    if upcast:
        query, key = query.to(value.dtype), key.to(value.dtype)
    return query, key, value


class PositionalRotaryCall:
    """Mixin for the caching processor of an attention layer that calls its processor as ``(attn,
    hidden_states, attention_mask, image_rotary_emb)`` positionally (FLUX.2's parallel self-attention,
    FLUX.3's attention): it names them, as ``CachingProcessor`` reads positional inputs in the order of
    diffusers' ``Attention`` (``encoder_hidden_states`` first)."""

    def __call__(
        self,
        attn: Any,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        image_rotary_emb: Rotary | None = None,
    ) -> Any:
        return super().__call__(  # type: ignore[misc]
            attn, hidden_states, attention_mask=attention_mask, image_rotary_emb=image_rotary_emb
        )


class CachedSelfAttentionProcessor(CachingProcessor):
    """Self-attention over all image tokens, with K/V cached per layer.

    At the fill step it computes K and V for all image tokens and fills the cache (image tokens first,
    then the rows of :meth:`extra_projections`); at a pruned step it computes Q, K, V for the selected
    image tokens only, writes K and V into the cache at their positions, rewrites the extra rows, and
    attends over the whole cache.

    With ``capture_attention`` (set by ``PruningAdapter.processors`` on one layer for attention strategies)
    it also caches the image queries the same way and leaves the attention map in the slot's capture.
    """

    capture_attention = False
    upcast_qk = False
    """Whether q/k are normalised and rotated in float32 (see :func:`projections`)."""
    extra_rotary = True
    """Whether the model's rotary table has rows for the extra (text) tokens before the image's (Flux's
    [text, image]); False where it covers the image tokens only and the text is not rotated (HunyuanVideo
    1.5)."""

    def __init__(self, attention: torch.nn.Module, slot: StepSlot, extra_first: bool = False) -> None:
        super().__init__(attention, slot, extra_first)
        self.query: torch.Tensor | None = None
        """(B, N, h, d) image queries of every token, kept only when capturing attention."""

    def release(self) -> None:
        super().release()
        self.query = None

    def take_rows(self, rows: slice) -> None:
        super().take_rows(rows)
        if self.query is not None:
            self.query = self.query[rows]

    def cache_bytes(self) -> int:
        query = 0 if self.query is None else self.query.numel() * self.query.element_size()
        return super().cache_bytes() + query

    def extra_projections(
        self, attn: Any, context: Tensor | None, rotary: Rotary | None
    ) -> Projections | None:
        """Q, K, V of tokens that every step recomputes in full and that join the attention after the
        image tokens (none for plain self-attention); ``rotary`` has their rows."""
        return None

    def finish(self, attn: Any, image_out: Tensor, extra_out: Tensor | None) -> Any:
        """What the layer returns, from the projected image output and the extra tokens' attention output."""
        return image_out

    def attend(
        self, attn: Any, tokens: Tensor, context: Tensor | None, mask: Tensor | None, rotary: Rotary | None
    ) -> Any:
        # A rotary embedding's rows: [text, image] (Flux's order); at a pruned step the selected image rows.
        if self.extra_rotary:
            text_rotary, image_rotary = split_rotary(rotary, 0 if context is None else context.shape[1])
        else:
            text_rotary, image_rotary = None, rotary
        query, key, value = projections(
            attn, tokens, IMAGE_PROJECTIONS, image_rotary, self.upcast_qk
        )  # (B, n + R, h, d) each
        extra = self.extra_projections(attn, context, text_rotary)  # (B, T, h, d) each, or None
        extra_kv = None if extra is None else (extra[1], extra[2])
        if self.extra_first:
            self.store(key, value, lead=extra_kv)
        else:
            self.store(key, value, trail=extra_kv)
        if self.capture_attention:
            self._capture_attention(attn, query, None if extra is None else extra[0])
        keys, values = self.cached()  # (B, L, h, d) each, in the layer's order
        lead = extra[0].shape[1] if extra is not None and self.extra_first else 0
        mask = query_mask(mask, self.context, lead)  # the rows of the queries below, over all L keys
        if extra is None:
            out = attend(query, keys, values, mask, self.exchange)  # (B, n + R, h * d)
            return self.finish(attn, project_out(attn, out, tokens), None)
        num_extra, num_stream = extra[0].shape[1], query.shape[1]
        queries = [extra[0], query] if self.extra_first else [query, extra[0]]
        out = attend(torch.cat(queries, dim=1), keys, values, mask, self.exchange)  # (B, L', h * d), in order
        if self.extra_first:
            image_out, extra_out = out[:, num_extra:], out[:, :num_extra]
        else:
            image_out, extra_out = out[:, :num_stream], out[:, num_stream:]
        return self.finish(attn, project_out(attn, image_out, tokens), extra_out)

    def _capture_attention(self, attn: Any, image_query: Tensor, extra_query: Tensor | None) -> None:
        """Update the image query cache from ``image_query`` (the recomputed image tokens) and leave the
        head-averaged attention probabilities of the prompt rows over all tokens (image first, then the
        others) in the slot's capture, with the MACs of the extra Q K^T product."""
        step = self.context
        if step.mode is StepMode.FILL:
            self.query = image_query.clone()
        else:
            index = step.indices[:, :, None, None].expand_as(image_query)
            self.query.scatter_(1, index, image_query)
        extra_queries = () if extra_query is None else (extra_query,)
        queries = torch.cat([self.query, *extra_queries], dim=1)  # (B, M, h, d)
        cache = self.cache
        keys = torch.cat([cache.image_rows(cache.key), cache.other_rows(cache.key)], dim=1)  # (B, M, h, d)
        queries = step.row_layout.prompt_rows(queries).float()
        keys = step.row_layout.prompt_rows(keys).float()
        heads = queries.shape[2]
        attention = sum(
            torch.softmax(attn.scale * queries[:, :, h] @ keys[:, :, h].transpose(1, 2), dim=-1)
            for h in range(heads)
        )  # (P, M, M)
        rows, length = queries.shape[:2]
        self.slot.capture.map = attention / heads
        self.slot.capture.macs = rows * length * length * heads * queries.shape[3]


class JointAttentionProcessor(CachedSelfAttentionProcessor):
    """Joint attention of image and text tokens (SD3's blocks, Flux's double-stream blocks): the text
    tokens' Q, K, V (``add_*_proj``) join the image tokens' every step, and their output goes through
    ``to_add_out`` unless the block is ``context_pre_only``."""

    def extra_projections(
        self, attn: Any, context: Tensor | None, rotary: Rotary | None
    ) -> Projections | None:
        if context is None:
            return None
        return projections(attn, context, TEXT_PROJECTIONS, rotary)  # (B, T, h, d) each

    def finish(self, attn: Any, image_out: Tensor, extra_out: Tensor | None) -> Any:
        if extra_out is None:
            return image_out
        if not getattr(attn, "context_pre_only", False):  # FLUX.2's attention has no such attribute
            extra_out = attn.to_add_out(extra_out)
        return image_out, extra_out


def joint_block_macs(
    block: torch.nn.Module,
    image_queries: int,
    image_tokens: int,
    text_tokens: int,
    mlps: tuple[str, str] = ("ff", "ff_context"),
) -> int:
    """MACs per sample of a block with a joint attention (``attn``) and separate MLPs for image and text
    tokens, named ``mlps`` (SD3's and Flux's ``ff``, ``ff_context``; Qwen-Image's ``img_mlp``,
    ``txt_mlp``)."""
    attn = block.attn
    image_mlp, text_mlp = (getattr(block, name) for name in mlps)  # None: no text MLP (SD3's last)
    image = linear_macs(attn.to_q, attn.to_k, attn.to_v, attn.to_out, image_mlp)
    text = linear_macs(attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.to_add_out, text_mlp)
    # QK^T and AV: queries x keys x width, twice.
    joint = 2 * (image_queries + text_tokens) * (image_tokens + text_tokens) * attn.inner_dim
    return image_queries * image + text_tokens * text + joint
