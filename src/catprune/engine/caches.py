"""What pruned steps reuse: the K/V caches of the attention layers, the output tokens of each pass, and
the per-token histories of the extrapolation options; and the base of the adapters' caching processors.

All of it stays on the device and is updated in place at fixed addresses, with no host reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..errors import CacheMemoryError
from ..formatting import format_count
from .context import StepContext, StepMode, StepSlot

if TYPE_CHECKING:
    from .parallel import HeadExchange


def cache_memory_message(required: int, device: torch.device | str, free: int | None = None) -> str:
    """The one line that says the K/V caches of a pass do not fit, and what to do."""
    available = "" if free is None else f" ({format_count(free, 'B')} free)"
    return (
        f"CAT pruning: the K/V caches need about {format_count(required, 'B')} per pass (every layer's "
        f"keys and values of every image token; a second pass under CFG as two calls needs as much again) "
        f"and cannot be allocated on {device}{available}: lower the resolution, frames or batch, or run "
        "without pruning"
    )


class TokenHistory:
    """The values of a per-token tensor (B, N, ...) at the last times each token was computed, for a
    forecast in time of the tokens not recomputed (``kv_extrapolation``, ``output_extrapolation``): first
    order (``order=1``, the line through the last two computations) or second (``order=2``, the parabola
    through the last three, Newton's divided differences at unequal times). The current values live with
    the caller; this keeps the earlier ones and the times, all on the device (no host reads)."""

    def __init__(self, order: int = 1) -> None:
        self.order = order
        self.previous: Tensor | None = None
        """(B, N, ...) each token's values at its computation before the last."""
        self.older: Tensor | None = None
        """(B, N, ...) at the one before that (order 2 only)."""
        self.last_time: Tensor | None = None
        """(B, N) float32: when each token was last computed."""
        self.previous_time: Tensor | None = None
        """(B, N) float32: when it was computed before that (equal to ``last_time``: no slope yet)."""
        self.older_time: Tensor | None = None
        """(B, N) float32: the time of ``older`` (equal to ``previous_time``: no curvature yet)."""

    def record_all(self, current: Tensor | None, time: Tensor, computed: Tensor) -> None:
        """Every token is computed at ``time`` (B,): a fill or refresh step. ``current`` (the values from
        before, or None at a generation's fill step) becomes the previous values; ``computed`` the shape."""
        rows, tokens = computed.shape[:2]
        now = time[:, None].expand(rows, tokens)  # (B, N)
        if current is None or self.previous is None or self.previous.shape != current.shape:
            self.previous = computed.detach().clone()
            self.last_time, self.previous_time = now.clone(), now.clone()
            if self.order == 2:
                self.older, self.older_time = computed.detach().clone(), now.clone()
            return
        if self.order == 2:
            self.older.copy_(self.previous)
            self.older_time.copy_(self.previous_time)
        self.previous.copy_(current)
        self.previous_time.copy_(self.last_time)
        self.last_time.copy_(now)

    def record(self, current: Tensor, indices: Tensor, time: Tensor) -> None:
        """Tokens ``indices`` (B, K) are recomputed at ``time`` (B,); call before ``current`` (B, N, ...)
        is overwritten at them."""
        index = indices.view(*indices.shape, *(1,) * (current.dim() - 2)).expand(
            *indices.shape, *current.shape[2:]
        )  # (B, K, ...)
        if self.order == 2:
            self.older.scatter_(1, index, self.previous.gather(1, index))
            self.older_time.scatter_(1, indices, self.previous_time.gather(1, indices))
        self.previous.scatter_(1, index, current.gather(1, index))
        self.previous_time.scatter_(1, indices, self.last_time.gather(1, indices))
        self.last_time.scatter_(1, indices, time[:, None].expand_as(indices).to(self.last_time.dtype))

    def extrapolate(self, current: Tensor, time: Tensor) -> Tensor:
        """``current`` (B, N, ...), each token as last computed, moved to ``time`` (B,) along the line
        through its last two computations (order 2: the parabola through its last three); tokens
        computed at ``time`` and tokens with one computation only are returned as they are, tokens with
        two only are moved along the line."""
        span = self.last_time - self.previous_time  # (B, N)
        safe_span = torch.where(span != 0, span, torch.ones_like(span))
        ahead = time[:, None] - self.last_time  # (B, N)
        coefficient = torch.where(span != 0, ahead / safe_span, 0.0)  # (B, N)
        moved = current + _per_token(coefficient, current) * (current - self.previous)
        if self.order == 1:
            return moved  # (B, N, ...)
        # Newton: p(t) = y0 + (t - t0) [y0, y1] + (t - t0)(t - t1) [y0, y1, y2], with
        # [y0, y1, y2] = ([y0, y1] - [y1, y2]) / (t0 - t2); zero where a span is zero (two computations).
        older_span = self.previous_time - self.older_time  # (B, N)
        whole_span = self.last_time - self.older_time  # (B, N)
        defined = (span != 0) & (older_span != 0) & (whole_span != 0)
        one = torch.ones_like(span)
        curvature = torch.where(
            defined,
            ahead * (time[:, None] - self.previous_time) / torch.where(defined, whole_span, one),
            0.0,
        )  # (B, N): (t - t0)(t - t1) / (t0 - t2)
        first = torch.where(defined, curvature / torch.where(defined, span, one), 0.0)
        second = torch.where(defined, curvature / torch.where(defined, older_span, one), 0.0)
        return (
            moved
            + _per_token(first, current) * (current - self.previous)
            - _per_token(second, current) * (self.previous - self.older)
        )  # (B, N, ...)

    def take_rows(self, rows: Tensor) -> None:
        """Keep only batch rows ``rows`` (CFG truncation)."""
        if self.previous is not None:
            self.previous = self.previous[rows]
            self.last_time, self.previous_time = self.last_time[rows], self.previous_time[rows]
        if self.older is not None:
            self.older, self.older_time = self.older[rows], self.older_time[rows]

    def release(self) -> None:
        self.previous = self.last_time = self.previous_time = None
        self.older = self.older_time = None

    def tensors(self) -> list[Tensor]:
        """The kept values (for memory accounting)."""
        return [t for t in (self.previous, self.older) if t is not None]


def _per_token(coefficient: Tensor, like: Tensor) -> Tensor:
    """(B, N) coefficients shaped to broadcast over ``like`` (B, N, ...), in its dtype."""
    return coefficient.view(*coefficient.shape, *(1,) * (like.dim() - 2)).to(like.dtype)


class KVCache:
    """Keys and values of one attention layer over its whole sequence, in the order the layer attends
    over it, so that the fill step computes exactly what the model computes.

    Layout ``(B, L, heads, head_dim)``: rows before the image tokens (Flux's text), the N image tokens
    (raster order) from ``image_start``, then the rest (fixed tokens, SD3's text). Pruned steps write the
    recomputed image tokens at their positions and rewrite the other rows, which every step recomputes.
    With ``extrapolate`` the image tokens' K/V also keep a :class:`TokenHistory`, and
    :meth:`attention_inputs` moves the ones not recomputed to the current time.
    """

    def __init__(self, extrapolate: int = 0, storage_dtype: torch.dtype | None = None) -> None:
        self.key: Tensor | None = None
        self.value: Tensor | None = None
        self.image_start = 0
        self.num_image = 0
        self.histories = (TokenHistory(extrapolate), TokenHistory(extrapolate)) if extrapolate else None
        """Histories of the image tokens' keys and values, with ``extrapolate``."""
        self.storage_dtype = storage_dtype
        """The dtype ``key`` and ``value`` are kept in (``cache_dtype``; None: as computed)."""
        self.scales: tuple[Tensor, Tensor] | None = None
        """(B, L, 1, 1) each, in the computed dtype: the scale of every row of ``key`` and ``value`` when
        they are kept in float8 (a stored row times its scale is the computed row)."""
        self.compute_dtype: torch.dtype | None = None
        """The dtype K/V are computed in (read back in it)."""
        self.working: tuple[Tensor, Tensor] | None = None
        """Kept in another dtype: the K and V (B, L, h, d) the current call attends over, in the computed
        dtype (set by :meth:`fill` and :meth:`update`, taken by :meth:`attention_inputs`)."""

    def image_rows(self, tensor: Tensor) -> Tensor:
        """The image tokens' rows (B, N, h, d) of a tensor in this layout (a view)."""
        return tensor[:, self.image_start : self.image_start + self.num_image]

    def other_rows(self, tensor: Tensor) -> Tensor:
        """The rows that are not image tokens (B, L - N, h, d), in order (a new tensor when on both sides)."""
        end = self.image_start + self.num_image
        if self.image_start == 0:
            return tensor[:, end:]
        return torch.cat([tensor[:, : self.image_start], tensor[:, end:]], dim=1)

    def fill(
        self,
        key: Tensor,
        value: Tensor,
        image_start: int,
        num_image: int,
        time: Tensor | None = None,
        refresh: bool = False,
    ) -> None:
        """The whole sequence's K/V (B, L, h, d) at ``time`` (B,), at the fill step or a ``refresh`` step
        (which keeps the extrapolation history going); the image tokens are rows ``image_start`` on."""
        storage = self.storage_dtype or key.dtype
        if self.key is None or (self.key.shape, self.key.dtype, self.key.device, self.compute_dtype) != (
            key.shape,
            storage,
            key.device,
            key.dtype,
        ):
            self.key = torch.empty_like(key, dtype=storage)  # (B, L, h, d)
            self.value = torch.empty_like(value, dtype=storage)  # (B, L, h, d)
            if storage.itemsize == 1:
                self.scales = (key.new_empty(*key.shape[:2], 1, 1), key.new_empty(*key.shape[:2], 1, 1))
            self.compute_dtype = key.dtype
            refresh = False
        self.image_start, self.num_image = image_start, num_image
        if self.histories is not None:
            assert time is not None
            pairs = zip(self.histories, (self.key, self.value), (key, value), strict=True)
            for history, cached, new in pairs:
                previous = self.image_rows(cached) if refresh else None
                history.record_all(previous, time, self.image_rows(new))
        self.working = None
        self.write(0, key, value)
        if self.key.dtype != key.dtype:
            self.working = (key, value)  # the fill step attends over K/V as computed

    def update(self, indices: Tensor, key: Tensor, value: Tensor, time: Tensor | None = None) -> None:
        """The recomputed image tokens' K/V (B, K, h, d) at ``time`` (B,), written at their positions
        ``indices`` (B, K)."""
        index = indices[:, :, None, None].expand_as(key)  # (B, K, h, d)
        if self.histories is not None:
            assert time is not None
            for history, cached in zip(self.histories, (self.key, self.value), strict=True):
                history.record(self.image_rows(cached), indices, time)
        if self.key.dtype != self.compute_dtype:
            self.working = self._read_back()
            for working, new in zip(self.working, (key, value), strict=True):
                self.image_rows(working).scatter_(1, index, new)
        for cached, scale, (stored, stored_scale) in self._stored_pairs(key, value):
            if scale is not None:  # float8 as its bytes: CPU scatter has no float8 kernel
                cached, stored = cached.view(torch.uint8), stored.view(torch.uint8)
            self.image_rows(cached).scatter_(1, index, stored)
            if scale is not None:
                self.image_rows(scale).scatter_(1, index[..., :1, :1], stored_scale)

    def write(self, start: int, key: Tensor, value: Tensor) -> None:
        """Rows recomputed at every step (B, r, h, d), from row ``start`` on."""
        end = start + key.shape[1]
        if self.working is not None:  # this step attends over the rows as computed
            for working, new in zip(self.working, (key, value), strict=True):
                working[:, start:end].copy_(new)
        for cached, scale, (stored, stored_scale) in self._stored_pairs(key, value):
            cached[:, start:end].copy_(stored)
            if scale is not None:
                scale[:, start:end].copy_(stored_scale)

    def _stored_pairs(
        self, key: Tensor, value: Tensor
    ) -> list[tuple[Tensor, Tensor | None, tuple[Tensor, Tensor | None]]]:
        """(cached, its scales, (new rows as stored, their scales)) for the keys and the values."""
        assert self.key is not None and self.value is not None
        scales = self.scales or (None, None)
        return [
            (self.key, scales[0], self._stored(key)),
            (self.value, scales[1], self._stored(value)),
        ]

    def _stored(self, rows: Tensor) -> tuple[Tensor, Tensor | None]:
        """Computed rows (B, r, h, d) as the cache keeps them: in its dtype, and in float8 divided by
        their scale (B, r, 1, 1) that maps each row's largest magnitude to float8's largest, 448 (one scale
        per token: a plain cast saturates above 448 and flushes values below 2^-10 to zero; on the shipped
        models' caches the scaled cast's relative error is also lower, docs/measurement.md)."""
        assert self.key is not None
        if self.scales is None:
            return rows.to(self.key.dtype), None  # the same tensor when kept as computed
        largest = torch.finfo(self.key.dtype).max
        scale = rows.abs().amax(dim=(2, 3), keepdim=True).clamp_min(1e-12) / largest  # (B, r, 1, 1)
        return (rows / scale).to(self.key.dtype), scale

    def _read_back(self) -> tuple[Tensor, Tensor]:
        """The cached K and V (B, L, h, d) each, in the computed dtype (new tensors)."""
        assert self.key is not None and self.value is not None
        if self.scales is None:
            return self.key.to(self.compute_dtype), self.value.to(self.compute_dtype)
        return (
            self.key.to(self.compute_dtype) * self.scales[0],
            self.value.to(self.compute_dtype) * self.scales[1],
        )

    def attention_inputs(self, time: Tensor | None) -> tuple[Tensor, Tensor]:
        """The K and V to attend over: the cache; kept in another dtype, the cache read back with the rows
        written in this step as computed (a recomputed token attends with its exact K/V, so keep 1.0 reads
        nothing rounded); with the image tokens extrapolated to ``time`` when the cache keeps histories
        (new tensors then; the cache itself keeps the computed values)."""
        if self.histories is None:
            if self.working is None:
                return self.key, self.value
            working, self.working = self.working, None
            return working
        assert time is not None
        moved = []
        for history, cached in zip(self.histories, (self.key, self.value), strict=True):
            tensor = cached.clone()  # (B, L, h, d)
            image = self.image_rows(tensor)
            image.copy_(history.extrapolate(image, time))
            moved.append(tensor)
        return moved[0], moved[1]

    def keep(self, key: Tensor, value: Tensor) -> None:
        """Hold K/V that do not change within a generation as they are (a cross-attention's text)."""
        self.key, self.value = key, value

    def take_rows(self, rows: Tensor) -> None:
        """Keep only batch rows ``rows`` (CFG truncation)."""
        if self.key is not None:
            self.key, self.value = self.key[rows], self.value[rows]
        if self.scales is not None:
            self.scales = (self.scales[0][rows], self.scales[1][rows])
        for history in self.histories or ():
            history.take_rows(rows)

    @property
    def empty(self) -> bool:
        return self.key is None

    def release(self) -> None:
        self.key = self.value = self.scales = self.working = None
        for history in self.histories or ():
            history.release()

    def nbytes(self) -> int:
        kept = [t for history in self.histories or () for t in history.tensors()]
        tensors = [t for t in (self.key, self.value, *(self.scales or ()), *kept) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


class OutputCache:
    """The output tokens (B, N, C) of one pass at its latest step: pruned steps scatter their recomputed
    tokens into it, the rest are reused (or extrapolated in time with ``extrapolate``)."""

    def __init__(self, extrapolate: int = 0) -> None:
        self.tokens: Tensor | None = None
        """(B, N, C) every image token's output as last computed, kept from the fill step on: one tensor
        updated in place."""
        self.history = TokenHistory(extrapolate) if extrapolate else None

    def complete(self, output: Tensor, context: StepContext) -> tuple[Tensor, Tensor]:
        """A call's output at the scatter point (B, n + R, C), n the image tokens that went through the
        blocks -> (what the model returns, (B, N + R, C); every image token's output as computed, (B, N,
        C)). Traced by ``torch.compile`` with the forward: it reads only the context's mode, flags and
        sizes, and updates the kept tokens in place."""
        fixed = context.fixed_tokens
        image = output[:, : context.num_queries] if fixed else output  # (B, n, C)
        history = self.history if context.mode is not StepMode.FULL else None
        if context.mode is StepMode.PRUNED:
            assert self.tokens is not None and context.indices is not None
            if history is not None:
                history.record(self.tokens, context.indices, context.timestep)
            index = context.indices[..., None].expand(-1, -1, image.shape[-1])  # (B, K, C)
            image = self.tokens.scatter(1, index, image.to(self.tokens.dtype))  # (B, N, C)
        elif history is not None:  # the fill step or a refresh step: every token computed now
            history.record_all(self.tokens if context.refreshing else None, context.timestep, image)
        if context.keeps_output:
            if self.tokens is None or self.tokens.shape != image.shape or self.tokens.dtype != image.dtype:
                self.tokens = image.clone()  # (B, N, C), the kept tokens' buffer
            else:
                self.tokens.copy_(image)
        computed = image
        if history is not None and context.mode is StepMode.PRUNED:
            image = history.extrapolate(image, context.timestep)  # (B, N, C), what the scheduler steps with
        if fixed:
            image = torch.cat([image, output[:, context.num_queries :]], dim=1)  # (B, N + R, C)
        return image, computed

    def take_rows(self, rows: Tensor) -> None:
        if self.tokens is not None:
            self.tokens = self.tokens[rows]
        if self.history is not None:
            self.history.take_rows(rows)


PassKey = tuple[str | None, int]

PROCESSOR_INPUTS = ("encoder_hidden_states", "attention_mask", "image_rotary_emb")
"""The inputs of diffusers' attention processors after ``hidden_states``, in their positional order."""


class CachingProcessor:
    """Base of the adapters' attention processors: full steps run the layer's original processor untouched,
    the fill step and pruned steps run :meth:`attend` (the adapter's), with :attr:`cache` to keep K/V in
    (one per pass of a step, switched by :meth:`enter_pass` before the call, so that a compiled layer reads
    the same attribute in every pass).

    A processor reads only its :class:`StepSlot`'s context, never the engine.
    ``extra_first``: the layer attends over [extra (text) tokens, image tokens] (Flux) rather than
    [image, extra] (SD3): its caches and attention keep the model's order (see :class:`KVCache`)."""

    def __init__(self, attention: torch.nn.Module, slot: StepSlot, extra_first: bool = False) -> None:
        self.attention = attention
        self.original = attention.processor
        self.slot = slot
        self.extra_first = extra_first
        self.extrapolate = 0
        """The order of ``kv_extrapolation`` (0: none; set by the engine): the caches' histories."""
        self.cache_dtype: torch.dtype | None = None
        """The caches' storage dtype (``cache_dtype``; None: as computed; set by the engine)."""
        self.caches: dict[PassKey, KVCache] = {}
        """The K/V cache of each pass."""
        self.cache: KVCache | None = None
        """The current pass's K/V cache."""
        self.exchange: HeadExchange | None = None
        """Under context parallelism (set by ``catprune.engine.parallel``): K/V are exchanged for this
        process's heads of every token before they are cached, and attention exchanges its queries alike."""

    @property
    def context(self) -> StepContext:
        context = self.slot.context
        assert context is not None
        return context

    def enter_pass(self, key: PassKey) -> None:
        """Make pass ``key``'s cache the current one (created empty the first time)."""
        if key not in self.caches:
            self.caches[key] = KVCache(self.extrapolate, self.cache_dtype)
        self.cache = self.caches[key]

    def store(
        self,
        key: Tensor,
        value: Tensor,
        lead: tuple[Tensor, Tensor] | None = None,
        trail: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        """The call's K/V (B, n + R, h, d) of the image tokens that went through the block (then the
        fixed tokens), with the K/V of the rows every step recomputes before (``lead``) or after
        (``trail``) them in the layer's sequence (text): all into the cache, in the layer's order."""
        context = self.context
        cache = self.cache
        assert cache is not None
        if self.exchange is not None:  # this process's tokens, all heads -> every token, its heads
            key, value, lead, trail = self.exchange.whole_keys_values(key, value, lead, trail)
        start = 0 if lead is None else lead[0].shape[1]
        if context.mode is StepMode.FILL:
            keys = [part[0] for part in (lead, (key, value), trail) if part is not None]
            values = [part[1] for part in (lead, (key, value), trail) if part is not None]
            whole_key = keys[0] if len(keys) == 1 else torch.cat(keys, dim=1)  # (B, L, h, d)
            whole_value = values[0] if len(values) == 1 else torch.cat(values, dim=1)  # (B, L, h, d)
            try:
                cache.fill(
                    whole_key, whole_value, start, context.num_tokens, context.timestep, context.refreshing
                )
            except torch.OutOfMemoryError:
                raise CacheMemoryError(cache_memory_message(context.cache_bytes, key.device)) from None
            return
        queries = context.num_queries
        cache.update(context.indices, key[:, :queries], value[:, :queries], context.timestep)
        if lead is not None:
            cache.write(0, *lead)
        after = start + context.num_tokens
        if context.fixed_tokens:
            cache.write(after, key[:, queries:], value[:, queries:])
        if trail is not None:
            cache.write(after + context.fixed_tokens, *trail)

    def cached(self) -> tuple[Tensor, Tensor]:
        """The K and V to attend over (see :meth:`KVCache.attention_inputs`)."""
        assert self.cache is not None
        return self.cache.attention_inputs(self.context.timestep)

    def take_rows(self, rows: Tensor) -> None:
        for cache in self.caches.values():
            cache.take_rows(rows)

    def release(self) -> None:
        """Forget a generation's caches: the next fill step allocates them again, so that every generation
        runs the same code (compiled blocks then find the same path in each one)."""
        self.caches.clear()
        self.cache = None

    def cache_bytes(self) -> int:
        return sum(cache.nbytes() for cache in self.caches.values())

    def __call__(self, attn: torch.nn.Module, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.slot.mode is StepMode.FULL:
            return self.original(attn, hidden_states, *args, **kwargs)
        # diffusers' attention layers pass these positionally (FluxAttention) or by name (Attention).
        inputs = dict(zip(PROCESSOR_INPUTS, args, strict=False)) | kwargs
        context, mask, rotary = (inputs.get(name) for name in PROCESSOR_INPUTS)
        return self.attend(attn, hidden_states, context, mask, rotary)

    def attend(
        self, attn: Any, tokens: Tensor, context: Tensor | None, mask: Tensor | None, rotary: Any
    ) -> Any:
        """The layer's output at the fill step and at pruned steps: ``tokens`` (B, n, D) are what goes
        through the block (the image tokens, or Flux's single stream), ``context`` the other input (text)
        and ``mask`` its mask, ``rotary`` the rotary embedding (cos, sin) where the model has one."""
        raise NotImplementedError
