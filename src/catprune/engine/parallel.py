"""CAT pruning under diffusers' context parallelism (Ulysses): each of P processes recomputes 1/P of the
selected tokens and keeps the K/V caches of 1/P of the heads.

diffusers' context parallelism (``model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=P))``
after ``torch.distributed.init_process_group``) splits the token sequence into P contiguous shares where the
model's ``_cp_plan`` says, runs every attention as Ulysses does (an all-to-all turns (the process's tokens,
all heads) into (all tokens, H/P heads) and back) and all-gathers the output tokens at the end. With CAT
pruning on top:

- **Full steps** run diffusers' own context-parallel path, untouched.
- **Selection** is the same on every process: it reads the pass's output tokens, which diffusers' all-gather
  gives every process whole, and keeps K tokens, K rounded up to a multiple of P (:meth:`TokenShard.kept`).
- **Gather.** At a pruned step the CAT gather takes the process's contiguous share of the sorted selected
  tokens (K / P: :attr:`StepContext.local_indices`) and diffusers' splits of the image tokens (the adapter's
  :class:`ParallelPlan`) are left out (:class:`PrunedStepSplits`); its splits of the text stay.
- **Attention.** The caching processors exchange Q, K, V as Ulysses does (:class:`HeadExchange`, diffusers'
  all-to-all): every process then holds every recomputed token for its H/P heads, writes their K/V into its
  head-sharded cache (B, L, H/P, d) at their global positions, attends over the whole cache and exchanges
  the output back. The fill step does the same with all tokens, so each process fills its heads' 1/P of the
  caches.
- **Scatter.** diffusers' all-gather at the model's output gives every process the K recomputed tokens in
  the sorted order, which the scatter puts into the output cache as in one process.

Refused (:func:`parallelize`): ring attention, Ulysses "anything" (uneven shares), a model whose adapter
declares no :class:`ParallelPlan`, and strategies that capture an attention map.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from diffusers.hooks.context_parallel import _CONTEXT_PARALLEL_INPUT_HOOK_TEMPLATE, ContextParallelSplitHook
from diffusers.models.attention_dispatch import _all_to_all_dim_exchange
from torch import Tensor

from .context import StepMode, StepSlot, TokenShard

KeyValue = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class ParallelPlan:
    """An adapter's declaration that its model runs pruned under context parallelism: where the model's
    ``_cp_plan`` splits the image tokens."""

    image_splits: Mapping[str, tuple[str | int, ...]]
    """Module name in ``_cp_plan`` -> the entries of its split (input names, output indices) that cut the
    image tokens: left out at pruned steps, where the CAT gather takes the process's share instead."""
    splits_text: bool = False
    """Whether the plan splits the text tokens too (Flux's joint attention), not only the image tokens."""


class HeadExchange:
    """Ulysses' all-to-all among the P processes of a context-parallel group (diffusers'
    ``_all_to_all_dim_exchange``)."""

    def __init__(self, group: dist.ProcessGroup, world: int) -> None:
        self.group = group
        self.world = world

    def to_heads(self, tokens: Tensor) -> Tensor:
        """(B, s, H, d) this process's tokens, all heads -> (B, P s, H/P, d) every process's tokens (in rank
        order), this process's heads."""
        return _all_to_all_dim_exchange(tokens, scatter_idx=2, gather_idx=1, group=self.group)

    def to_tokens(self, heads: Tensor) -> Tensor:
        """The inverse of :meth:`to_heads`: (B, P s, H/P, d) -> (B, s, H, d)."""
        return _all_to_all_dim_exchange(heads, scatter_idx=1, gather_idx=2, group=self.group)

    def whole_segments(self, *segments: Tensor) -> list[Tensor]:
        """The segments of a layer's sequence (text, image tokens...) as this process holds them, its share
        of each (B, s_i, H, d) -> each whole segment (B, P s_i, H/P, d) in order, this process's heads: one
        all-to-all, then every process's shares put side by side."""
        sizes = [segment.shape[1] for segment in segments]
        local = torch.cat(segments, dim=1) if len(segments) > 1 else segments[0]  # (B, S, H, d)
        by_rank = self.to_heads(local).unflatten(1, (self.world, -1))  # (B, P, S, H/P, d)
        return [part.flatten(1, 2) for part in by_rank.split(sizes, dim=2)]  # (B, P s_i, H/P, d) each

    def whole_keys_values(
        self, key: Tensor, value: Tensor, lead: KeyValue | None, trail: KeyValue | None
    ) -> tuple[Tensor, Tensor, KeyValue | None, KeyValue | None]:
        """A caching processor's K/V (see ``CachingProcessor.store``) of this process's tokens, all heads,
        -> those of every process's tokens in the layer's order, this process's heads (keys and values
        stacked on the batch: one exchange)."""
        parts = [part for part in (lead, (key, value), trail) if part is not None]
        stacked = self.whole_segments(*(torch.cat(part) for part in parts))  # (2B, P s_i, H/P, d) each
        whole = iter([tuple(segment.chunk(2)) for segment in stacked])
        new_lead = None if lead is None else next(whole)
        new_key, new_value = next(whole)
        new_trail = None if trail is None else next(whole)
        return new_key, new_value, new_lead, new_trail  # type: ignore[return-value]


class PrunedStepSplits:
    """diffusers' split hook of one module (``ContextParallelSplitHook``), with its image-token entries left
    out at pruned steps, where the CAT gather takes the process's share of the selected tokens instead; a
    handle: :meth:`remove` puts the hook back as it was."""

    def __init__(
        self,
        hook: ContextParallelSplitHook,
        module: torch.nn.Module,
        image_entries: Iterable[Any],
        slot: StepSlot,
    ) -> None:
        self.hook = hook
        self.slot = slot
        excluded = set(image_entries)
        text_entries = {name: entry for name, entry in hook.metadata.items() if name not in excluded}
        self.pruned_hook = ContextParallelSplitHook(text_entries, hook.parallel_config)
        self.pruned_hook.initialize_hook(module)
        hook.fn_ref.pre_forward = self.pre_forward
        hook.fn_ref.post_forward = self.post_forward

    def _active(self) -> ContextParallelSplitHook:
        return self.pruned_hook if self.slot.mode is StepMode.PRUNED else self.hook

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict]:
        return self._active().pre_forward(module, *args, **kwargs)

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        return self._active().post_forward(module, output)

    def remove(self) -> None:
        self.hook.fn_ref.pre_forward = self.hook.pre_forward
        self.hook.fn_ref.post_forward = self.hook.post_forward


def context_parallel_config(model: torch.nn.Module) -> Any:
    """The model's ``ContextParallelConfig`` where ``enable_parallelism`` set one, else None."""
    config = getattr(model, "_parallel_config", None)
    return None if config is None else config.context_parallel_config


def _split_hook(model: torch.nn.Module, module_name: str) -> ContextParallelSplitHook | None:
    registry = getattr(model.get_submodule(module_name), "_diffusers_hook", None)
    name = _CONTEXT_PARALLEL_INPUT_HOOK_TEMPLATE.format(module_name)
    hook = None if registry is None else registry.get_hook(name)
    return hook if isinstance(hook, ContextParallelSplitHook) else None


def check_context_parallel(model: torch.nn.Module, plan: ParallelPlan | None) -> None:
    """Refuse, in one error that says why and what to do, a context parallelism that CAT pruning cannot run
    under (nothing to check on a model without context parallelism)."""
    config = context_parallel_config(model)
    if config is None:
        return
    name = type(model).__name__
    if config.ring_degree > 1:
        raise RuntimeError(
            f"CAT pruning does not support ring attention (ContextParallelConfig(ring_degree="
            f"{config.ring_degree})) on this {name}: ring attention needs an attention backend that returns "
            "the log-sum-exp (flash, cuDNN; none on a CPU), and CAT pruning's K/V caches are sharded by "
            "heads, the layout Ulysses' all-to-all gives. Use ContextParallelConfig(ulysses_degree=P) instead"
        )
    if config.ulysses_anything:
        raise RuntimeError(
            "CAT pruning under context parallelism needs the same share of the tokens on every process: "
            "ContextParallelConfig(ulysses_anything=True) is not supported; use an image size whose tokens "
            "divide by the processes"
        )
    if plan is None:
        raise RuntimeError(
            f"CAT pruning does not support context parallelism on {name} yet (its adapter declares no "
            "ParallelPlan); it does on WanTransformer3DModel and FluxTransformer2DModel"
        )
    missing = [
        f"{module or 'the model'}: {', '.join(map(str, entries))}"
        for module, entries in plan.image_splits.items()
        if (hook := _split_hook(model, module)) is None or not set(entries) <= set(hook.metadata)
    ]
    if missing:
        raise RuntimeError(
            f"CAT pruning: the context-parallel plan applied to this {name} does not split the image tokens "
            f"where diffusers' {name}._cp_plan does ({'; '.join(missing)}); enable parallelism with the "
            "model's own plan (enable_parallelism(config=...) without cp_plan)"
        )


def check_enabled_before_pruning(model: torch.nn.Module, shard: TokenShard | None) -> None:
    """At a generation's first step: refuse context parallelism enabled after ``apply_cat_pruning`` (its
    attention processors were CAT pruning's then, so diffusers could not give the model's own processors
    the parallel config)."""
    if shard is None and context_parallel_config(model) is not None:
        raise RuntimeError(
            f"CAT pruning: context parallelism was enabled on this {type(model).__name__} after "
            "apply_cat_pruning, which diffusers cannot combine (the model's own attention processors did not "
            "get the parallel config). Load the transformer again, call enable_parallelism, then "
            "apply_cat_pruning"
        )


def parallelize(
    model: torch.nn.Module, plan: ParallelPlan | None, slot: StepSlot, processors: Iterable[Any]
) -> tuple[TokenShard | None, list[Any]]:
    """Make pruning run under the model's context parallelism, if any: every caching processor exchanges
    its tokens for heads, and diffusers' splits of the image tokens give way to the CAT gather at pruned
    steps. Returns this process's shard (None without context parallelism) and the handles to remove.
    Checks everything (:func:`check_context_parallel`) before it changes anything."""
    config = context_parallel_config(model)
    if config is None:
        return None, []
    check_context_parallel(model, plan)
    assert plan is not None
    processors = list(processors)
    if any(getattr(processor, "capture_attention", False) for processor in processors):
        raise RuntimeError(
            "CAT pruning: token-choice strategies that read an attention map are not supported under "
            "context parallelism (each process holds the attention of its heads only)"
        )
    group = config._flattened_mesh.get_group()
    world = dist.get_world_size(group)
    shard = TokenShard(dist.get_rank(group), world, plan.splits_text)
    exchange = HeadExchange(config._ulysses_mesh.get_group(), config.ulysses_degree)
    for processor in processors:
        processor.exchange = exchange
    handles = [
        PrunedStepSplits(hook, model.get_submodule(module), entries, slot)
        for module, entries in plan.image_splits.items()
        if (hook := _split_hook(model, module)) is not None
    ]
    return shard, handles
