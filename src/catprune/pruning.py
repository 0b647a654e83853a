"""The model-agnostic pruning mechanism: step tracking, token gather/scatter and per-block K/V caches.

How a pruned step runs, for any diffusion transformer whose blocks act on tokens one by one except in
attention (SD3's MMDiT, PixArt's DiT): a hook on the patch embedder keeps only the selected image tokens,
so the blocks' own forward code runs unchanged on K instead of N tokens; the attention processors
recompute K and V for the selected tokens only and attend over a per-block cache that holds them for all
image tokens; a hook on the output projection puts the new outputs of the selected tokens into the
previous step's output. An adapter (``catprune.adapters``) only names the modules and says which
attention is which.

Strategies that rank tokens by attention (``at-edm``) get one block's attention map: the self-attention
processor of the middle block then also caches the image tokens' queries and, at the fill step and each
pruned step, computes the head-averaged attention probabilities of all tokens (fresh queries and keys for
the recomputed tokens, cached ones for the others), which fused attention kernels do not return. Other
strategies pay nothing for it.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook

from .config import CATPruningConfig
from .strategies import TokenSelector

STEP_HOOK = "catprune_step"
GATHER_HOOK = "catprune_gather"
SCATTER_HOOK = "catprune_scatter"


class StepMode(enum.Enum):
    FULL = "full"
    """The unpatched computation (steps before t0 - 1, and auxiliary calls such as skip-layer guidance)."""
    FILL = "fill"
    """A full step that also fills the K/V caches: step t0 - 1."""
    PRUNED = "pruned"
    """Only the selected image tokens go through the blocks."""


@dataclass
class GenerationStats:
    """What pruning did during one generation (one denoising loop)."""

    steps: int = 0
    pruned_steps: int = 0
    image_tokens: int = 0
    kept_tokens: int = 0
    text_tokens: int = 0
    macs: int = 0
    """Transformer MACs of this generation's steps, from the layer shapes (see ``ModelAdapter.step_macs``)."""
    full_macs: int = 0
    """The same steps without pruning."""

    @property
    def macs_fraction(self) -> float:
        return self.macs / self.full_macs if self.full_macs else 1.0


class PruningState:
    """Per-model state of one generation, shared by the hooks and the attention processors.

    A generation starts when the pipeline encodes its prompt (applied to a pipeline), when the timestep
    does not decrease (applied to a bare transformer), when the batch or the token grid changes, or on
    an explicit :meth:`begin_generation` or :meth:`reset`.
    """

    def __init__(self, config: CATPruningConfig, adapter: Any, model: torch.nn.Module) -> None:
        self.config = config
        self.adapter = adapter
        self.model = model
        self.selector = TokenSelector(config)
        self.processors: list[_CachingProcessor] = []
        self.explicit_generations = False
        """Set once a caller (the pipeline hook, or a user) starts generations with :meth:`begin_generation`;
        from then on timesteps are not read."""
        self.cfg: bool | None = None
        self.forced_indices: torch.Tensor | None = None
        self._signature = inspect.signature(model.forward)
        self._macs_memo: dict[tuple[int, int, int, bool], int] = {}
        self.stats = GenerationStats()
        self.reset()

    def reset(self) -> None:
        """Forget everything about the current generation (caches are kept allocated for reuse)."""
        self.step = 0
        self.mode = StepMode.FULL
        self.counting = False
        self.indices: torch.Tensor | None = None
        self.last_output: torch.Tensor | None = None
        self.attention_map: torch.Tensor | None = None
        """(P, M, M) attention probabilities of the latest step, kept only for attention strategies."""
        self._shape: tuple[int, int, int] | None = None
        self._last_timestep: float | None = None
        self.selector.reset()
        for processor in self.processors:
            processor.reset()
        self.stats = GenerationStats()

    def begin_generation(self, cfg: bool | None = None) -> None:
        """Start a new generation explicitly; ``cfg`` says whether the batch is [uncond..., cond...] pairs
        (None: as ``config.row_pairing`` says). Applied to a pipeline, its prompt encoding calls this."""
        self.reset()
        self.explicit_generations = True
        self.cfg = cfg

    def release_caches(self) -> None:
        """End the current generation and free its attention caches (K/V of every image token per block:
        1.2 GiB for SD3-medium at 1024x1024 with CFG); the next generation allocates them again. For
        between generations, when other work needs the memory; ``stats`` keep the generation's counts."""
        stats = self.stats
        self.reset()
        self.stats = stats
        for processor in self.processors:
            processor.release()

    def force_indices(self, indices: torch.Tensor | None) -> None:
        """For measurement: pruned steps recompute ``indices`` (B, K) int64, K = ``config.num_kept(N)``,
        instead of the selector's choice (None: the selector again); kept across :meth:`reset`.

        Counting MACs on the ``meta`` device (no data to select from) and timing a pruned step without its
        selection need it."""
        self.forced_indices = indices

    @property
    def paired_rows(self) -> bool:
        """Whether the batch is ``[uncond..., cond...]`` with one selection per prompt shared by both rows."""
        if self.cfg is not None:
            return self.cfg
        return self.config.row_pairing == "cfg"

    def begin_step(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        arguments = self._signature.bind_partial(*args, **kwargs).arguments
        if self.adapter.is_auxiliary_call(arguments):
            self.counting = False
            self.mode = StepMode.FULL
            return
        hidden_states = arguments["hidden_states"]
        height, width = self.adapter.token_grid(self.model, hidden_states)
        shape = (hidden_states.shape[0], height, width)
        if self._is_new_generation(shape, arguments.get("timestep")):
            self.reset()
        self.counting = True
        self._shape = shape
        self.height, self.width = height, width
        self.num_tokens = height * width
        self.num_kept = self.config.num_kept(self.num_tokens)
        self.text_tokens = self.adapter.text_tokens(arguments)

        start = self.config.start_step
        if self.step < start - 1:
            self.mode = StepMode.FULL
        elif self.step == start - 1:
            self.mode = StepMode.FILL
        else:
            self.mode = StepMode.PRUNED
            self.indices = self._select() if self.forced_indices is None else self.forced_indices

    def _is_new_generation(self, shape: tuple[int, int, int], timestep: Any) -> bool:
        if self._shape is not None and shape != self._shape:
            return True
        if self.explicit_generations or timestep is None:
            return False
        # A bare transformer: a timestep that does not decrease starts a new generation. Reading it is
        # one scalar host read per call; pipelines avoid it (their prompt encoding starts a generation).
        value = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        new = self._last_timestep is not None and value >= self._last_timestep
        self._last_timestep = value
        return new

    def end_step(self) -> None:
        if not self.counting:
            return
        stats, batch = self.stats, self._shape[0]
        tokens, text = self.num_tokens, self.text_tokens
        full = batch * self._step_macs(tokens, tokens, text, pruned=False)
        pruned = self.mode is StepMode.PRUNED
        stats.steps += 1
        stats.full_macs += full
        stats.image_tokens, stats.text_tokens = tokens, text
        if pruned:
            stats.pruned_steps += 1
            stats.kept_tokens = self.num_kept
            stats.macs += batch * self._step_macs(self.num_kept, tokens, text, pruned=True)
        else:
            stats.macs += full
        self.step += 1

    def _step_macs(self, queries: int, tokens: int, text: int, pruned: bool) -> int:
        """Per-sample MACs of a call, memoised: walking the modules every step would cost host time."""
        key = (queries, tokens, text, pruned)
        if key not in self._macs_memo:
            self._macs_memo[key] = self.adapter.step_macs(self.model, queries, tokens, text, pruned)
        return self._macs_memo[key]

    def prompt_half(self, tensor: torch.Tensor) -> torch.Tensor:
        """The rows that drive selection: one per prompt, the conditional half under CFG."""
        if not self.paired_rows:
            return tensor
        if tensor.shape[0] % 2:
            raise ValueError(
                f"row pairing 'cfg' needs an even batch [uncond..., cond...], got {tensor.shape[0]} rows"
            )
        return tensor[tensor.shape[0] // 2 :]

    def _prompt_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """The output tokens that drive selection (see :meth:`prompt_half`), noise channels only."""
        return self.adapter.noise_tokens(self.model, self.prompt_half(tokens))

    def _select(self) -> torch.Tensor:
        assert self.last_output is not None
        indices = self.selector.select(
            self._prompt_rows(self.last_output), self.height, self.width, self.num_kept, self.attention_map
        )
        return torch.cat([indices, indices]) if self.paired_rows else indices

    def gather(self, tokens: torch.Tensor) -> torch.Tensor:
        """Keep the selected image tokens: (B, N, D) -> (B, K, D) at a pruned step."""
        if self.mode is not StepMode.PRUNED:
            return tokens
        return tokens.gather(1, self.indices[..., None].expand(-1, -1, tokens.shape[-1]))

    def scatter_output(self, tokens: torch.Tensor) -> torch.Tensor:
        """The transformer's output tokens (B, n, p*p*C): unselected tokens reuse the previous step's."""
        if not self.counting:
            return tokens
        if self.mode is StepMode.PRUNED:
            assert self.last_output is not None
            index = self.indices[..., None].expand(-1, -1, tokens.shape[-1])
            tokens = self.last_output.scatter(1, index, tokens.to(self.last_output.dtype))
        start = self.config.start_step
        if self.step == start - 2:
            self.selector.set_reference(self._prompt_rows(tokens))
        if self.step >= start - 1:
            self.last_output = tokens
        return tokens


class _StepHook(ModelHook):
    """On the transformer: decides each call's mode before it runs and counts the step after."""

    _is_stateful = True

    def __init__(self, state: PruningState) -> None:
        super().__init__()
        self.state = state

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any], dict]:
        self.state.begin_step(args, kwargs)
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        self.state.end_step()
        return output

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state.reset()
        return module


class _OutputHook(ModelHook):
    """Runs ``fn`` on a module's output (the embedder's gather, the output projection's scatter)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def post_forward(self, module: torch.nn.Module, output: torch.Tensor) -> torch.Tensor:
        return self.fn(output)


def _split_heads(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, n, heads * d) -> (B, n, heads, d): tokens stay the second dimension, as in the caches."""
    return tensor.unflatten(-1, (heads, -1))


def _attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention over (B, n, heads, d) tensors, as diffusers' processors compute it: -> (B, n, heads*d)."""
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2).flatten(2).to(query.dtype)


def _project_out(attn: Any, out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """The output projection of diffusers' ``Attention`` (with its optional residual and rescaling)."""
    out = attn.to_out[1](attn.to_out[0](out))
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


class _CachingProcessor:
    """An attention processor with a K/V cache: full steps run the block's original processor untouched,
    the fill step and pruned steps run :meth:`attend`."""

    def __init__(self, attention: Any, state: PruningState) -> None:
        self.attention = attention
        self.original = attention.processor
        self.state = state
        self.key: torch.Tensor | None = None
        self.value: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget what belongs to one generation."""

    def release(self) -> None:
        self.key = self.value = None

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.key, self.value) if t is not None)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        if self.state.mode is StepMode.FULL:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        return self.attend(attn, hidden_states, encoder_hidden_states, attention_mask)

    def attend(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
    ) -> Any:
        raise NotImplementedError


class CachedSelfAttentionProcessor(_CachingProcessor):
    """Self-attention over all image tokens, optionally joint with text tokens (SD3's MMDiT attention).

    At the fill step it computes K and V for all image tokens and keeps them in a per-block cache laid
    out as ``[image tokens, text tokens]`` (kept allocated for the next generation of the same shape); at
    a pruned step it computes Q, K, V for the selected image tokens only, writes K and V into the cache at
    their positions, writes the text tokens' fresh K and V, and attends over the whole cache.

    With ``capture_attention`` (set by :func:`attach` on one block for attention strategies) it also
    caches the image queries the same way and stores the attention map in ``state.attention_map``.
    """

    capture_attention = False
    query: torch.Tensor | None = None

    def release(self) -> None:
        super().release()
        self.query = None

    def cache_bytes(self) -> int:
        query = 0 if self.query is None else self.query.numel() * self.query.element_size()
        return super().cache_bytes() + query

    def attend(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
    ) -> Any:
        if attention_mask is not None:
            raise NotImplementedError("CAT pruning does not support masked image self-attention")
        heads = attn.heads
        query = _split_heads(attn.to_q(hidden_states), heads)
        key = _split_heads(attn.to_k(hidden_states), heads)
        value = _split_heads(attn.to_v(hidden_states), heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        num_image = self.state.num_tokens
        num_text = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        if self.state.mode is StepMode.FILL:
            self._allocate(key, num_image + num_text)
            self.key[:, :num_image] = key
            self.value[:, :num_image] = value
        else:
            index = self.state.indices[:, :, None, None].expand_as(key)
            self.key[:, :num_image].scatter_(1, index, key)
            self.value[:, :num_image].scatter_(1, index, value)

        if encoder_hidden_states is not None:
            text_query = _split_heads(attn.add_q_proj(encoder_hidden_states), heads)
            text_key = _split_heads(attn.add_k_proj(encoder_hidden_states), heads)
            text_value = _split_heads(attn.add_v_proj(encoder_hidden_states), heads)
            if attn.norm_added_q is not None:
                text_query = attn.norm_added_q(text_query)
            if attn.norm_added_k is not None:
                text_key = attn.norm_added_k(text_key)
            self.key[:, num_image:] = text_key
            self.value[:, num_image:] = text_value
            query = torch.cat([query, text_query], dim=1)

        if self.capture_attention:
            self._capture_attention(attn, query, hidden_states.shape[1])
        out = _attend(query, self.key, self.value)
        num_queries = hidden_states.shape[1]
        image_out = _project_out(attn, out[:, :num_queries], hidden_states)
        if encoder_hidden_states is None:
            return image_out
        text_out = out[:, num_queries:]
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        return image_out, text_out

    def _capture_attention(self, attn: Any, query: torch.Tensor, num_queries: int) -> None:
        """Update the image query cache from ``query`` ([recomputed image tokens, text tokens]) and store
        the head-averaged attention probabilities of the prompt rows over all tokens (image first); the
        extra Q K^T product is added to the generation's MACs."""
        image_query = query[:, :num_queries]
        if self.state.mode is StepMode.FILL:
            self.query = image_query.clone()
        else:
            index = self.state.indices[:, :, None, None].expand_as(image_query)
            self.query.scatter_(1, index, image_query)
        queries = torch.cat([self.query, query[:, num_queries:]], dim=1)
        queries, keys = self.state.prompt_half(queries).float(), self.state.prompt_half(self.key).float()
        heads = queries.shape[2]
        attention = sum(
            torch.softmax(attn.scale * queries[:, :, h] @ keys[:, :, h].transpose(1, 2), dim=-1)
            for h in range(heads)
        )
        self.state.attention_map = attention / heads
        rows, length = queries.shape[:2]
        self.state.stats.macs += rows * length * length * heads * queries.shape[3]

    def _allocate(self, like: torch.Tensor, length: int) -> None:
        shape = (like.shape[0], length, *like.shape[2:])
        if (
            self.key is None
            or self.key.shape != shape
            or self.key.dtype != like.dtype
            or self.key.device != like.device
        ):
            self.key = like.new_empty(shape)
            self.value = like.new_empty(shape)


class ReusedTextAttentionProcessor(_CachingProcessor):
    """Cross-attention from image tokens to text tokens (PixArt): the text's K and V do not change between
    steps, so from the fill step on they are computed once per generation and reused; queries are
    computed for the image tokens that go through the block (the selected ones at a pruned step)."""

    def reset(self) -> None:
        self.release()

    def attend(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        batch, heads = hidden_states.shape[0], attn.heads
        if self.key is None:
            self.key = _split_heads(attn.to_k(encoder_hidden_states), heads)
            self.value = _split_heads(attn.to_v(encoder_hidden_states), heads)
            if attn.norm_k is not None:
                self.key = attn.norm_k(self.key)
        query = _split_heads(attn.to_q(hidden_states), heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        mask = None
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, self.key.shape[1], batch)
            mask = mask.view(batch, heads, -1, mask.shape[-1])
        return _project_out(attn, _attend(query, self.key, self.value, mask), hidden_states)


Processor = _CachingProcessor


def attached_state(model: torch.nn.Module) -> PruningState | None:
    """The pruning state of a transformer, or None when pruning is not applied to it."""
    return getattr(model, "_catprune_state", None)


def attach(model: torch.nn.Module, adapter: Any, config: CATPruningConfig) -> PruningState:
    """Install the hooks and processors on ``model``; everything is resolved before anything changes."""
    state = PruningState(config, adapter, model)
    state.processors = list(adapter.attention_processors(model, state))
    if state.selector.needs_attention:
        self_attention = [p for p in state.processors if isinstance(p, CachedSelfAttentionProcessor)]
        self_attention[len(self_attention) // 2].capture_attention = True
    embedder = model.get_submodule(adapter.embedder)
    projection = model.get_submodule(adapter.output_projection)

    HookRegistry.check_if_exists_or_initialize(model).register_hook(_StepHook(state), STEP_HOOK)
    HookRegistry.check_if_exists_or_initialize(embedder).register_hook(_OutputHook(state.gather), GATHER_HOOK)
    HookRegistry.check_if_exists_or_initialize(projection).register_hook(
        _OutputHook(state.scatter_output), SCATTER_HOOK
    )
    for processor in state.processors:
        processor.attention.set_processor(processor)
    model._catprune_state = state
    return state


def detach(model: torch.nn.Module) -> None:
    """Exact inverse of :func:`attach`: the original processors and forward methods come back."""
    state = attached_state(model)
    if state is None:
        return
    for processor in state.processors:
        processor.attention.set_processor(processor.original)
        processor.release()
    adapter = state.adapter
    for module, name in (
        (model.get_submodule(adapter.output_projection), SCATTER_HOOK),
        (model.get_submodule(adapter.embedder), GATHER_HOOK),
        (model, STEP_HOOK),
    ):
        HookRegistry.check_if_exists_or_initialize(module).remove_hook(name, recurse=False)
    del model._catprune_state
