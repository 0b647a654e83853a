"""What CAT pruning can be combined with on a diffusers model, checked where a user combines it.

Each combination either works or is refused with an error that names it and says what to do instead,
never a crash deep inside diffusers and never a silently wrong image. Either side can come first, so every
combination is checked twice: by :func:`check_before_apply` when ``apply_cat_pruning`` is called (before
anything changes), and by the checks :func:`generation_checks` returns, which ``apply_cat_pruning`` puts in
``PruningEngine.checks`` so that they run at every generation's first step (for what was added after
pruning was applied).

Refused, because pruned steps would compute something else than the model as the user configured it:

- a transformer compiled whole before pruning is applied: graphs dynamo compiled before would not see
  pruning's hooks (compiled after ``apply_cat_pruning``, they contain them);

- attention processors other than diffusers' plain ones on the layers CAT pruning replaces (an IP-Adapter's
  ``SD3IPAdapterJointAttnProcessor2_0``, perturbed-attention guidance, a custom processor): at pruned steps
  CAT pruning's processors compute plain attention and the other processor never runs;
- diffusers' caches (``enable_cache`` or ``diffusers.hooks.apply_*``: FirstBlockCache, Pyramid Attention
  Broadcast, FasterCache, TaylorSeer, MagCache, ...): they reuse outputs computed for all image tokens at
  earlier steps, while pruned steps run the blocks on the selected tokens only;
- context parallelism that pruning cannot run under (ring attention, a model without a ``ParallelPlan``:
  ``catprune.engine.parallel``, checked when pruning is applied), or enabled after ``apply_cat_pruning``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import diffusers.models.attention_processor as diffusers_processors
from diffusers.utils.torch_utils import is_compiled_module
from torch import nn

from .adapters import ModelAdapter
from .config import CATPruningConfig
from .engine import CachingProcessor, PruningEngine, StepSlot
from .engine.parallel import check_enabled_before_pruning

PLAIN_PROCESSORS = (
    "AttnProcessor",
    "AttnProcessor2_0",
    "AttnProcessorNPU",
    "XFormersAttnProcessor",
    "FusedAttnProcessor2_0",
    "JointAttnProcessor2_0",
    "XFormersJointAttnProcessor",
    "FusedJointAttnProcessor2_0",
)
"""diffusers' processors (by class name) that compute plain softmax attention through the layer's own
projections, as CAT pruning's processors recompute it at pruned steps; only these (and a layer class's own
default processor, see :func:`is_plain`) may run a layer that pruning replaces. Exact classes: a subclass
may add to the attention, so it is refused like any other."""

CACHE_HOOK_MODULES = {
    "first_block_cache": "FirstBlockCache",
    "pyramid_attention_broadcast": "PyramidAttentionBroadcast",
    "faster_cache": "FasterCache",
    "taylorseer_cache": "TaylorSeerCache",
    "mag_cache": "MagCache",
    "sea_cache": "SeaCache",
    "text_kv_cache": "TextKVCache",
}
"""diffusers' cache techniques by the module of ``diffusers.hooks`` that defines their hooks; a hook from
another module of ``diffusers.hooks`` whose name ends in ``cache`` counts as a cache too (a newer one)."""

_CACHES_REASON = (
    "a diffusers cache reuses what the model computed for all image tokens at earlier steps (block or "
    "attention outputs, predictions), while CAT pruning's steps run the blocks on the selected tokens "
    "only, so the two would mix outputs of different computations (a crash or a wrong image)"
)


def plain_processor_classes() -> tuple[type, ...]:
    """The classes of :data:`PLAIN_PROCESSORS` that this diffusers version has."""
    classes = (getattr(diffusers_processors, name, None) for name in PLAIN_PROCESSORS)
    return tuple(cls for cls in classes if isinstance(cls, type))


def is_plain(layer: nn.Module, model_processors: tuple[type, ...] = ()) -> bool:
    """Whether ``layer`` runs one of :data:`PLAIN_PROCESSORS`, its class's own default processor
    (``FluxAttention``'s ``FluxAttnProcessor``: plain attention too, defined beside the model) or one of
    ``model_processors``, the model's own plain processors that its adapter names (Qwen-Image's)."""
    processor_class = type(layer.processor)
    return (
        processor_class in plain_processor_classes()
        or processor_class in model_processors
        or processor_class is getattr(type(layer), "_default_processor_cls", None)
    )


def is_ip_adapter_processor(processor: object) -> bool:
    """Whether ``processor`` is one of diffusers' IP-Adapter processors
    (``SD3IPAdapterJointAttnProcessor2_0``, ``IPAdapterAttnProcessor2_0``, ...): told apart so that the
    error can say how to unload one."""
    return "IPAdapter" in type(processor).__name__


def replaced_layers(model: nn.Module, adapter: ModelAdapter, config: CATPruningConfig) -> list[nn.Module]:
    """The attention layers whose processors ``apply_cat_pruning`` would replace, resolved as ``attach``
    resolves them (with a throwaway slot; nothing is installed)."""
    return [processor.attention for processor in adapter.attention_processors(model, StepSlot())]


def check_before_apply(model: nn.Module, adapter: ModelAdapter, config: CATPruningConfig) -> None:
    """Everything ``apply_cat_pruning`` refuses to combine with, before it changes anything."""
    check_attention_processors(model, replaced_layers(model, adapter, config), adapter.plain_processors)
    check_no_cache(model)


def check_not_compiled_whole(model: nn.Module) -> None:
    """Refuse a transformer compiled whole (``torch.compile(model)``, ``model.compile()``) before pruning:
    dynamo does not guard on module hooks, so graphs it compiled before would run on without the hooks
    pruning adds. Compiled whole after ``apply_cat_pruning``, the hooks are in the graphs; regional
    compilation (of the blocks) works in either order."""
    if not is_compiled_module(model) and getattr(model, "_compiled_call_impl", None) is None:
        return
    raise RuntimeError(
        f"this {type(getattr(model, '_orig_mod', model)).__name__} was compiled whole before "
        "apply_cat_pruning: graphs compiled before would not see pruning. Apply CAT pruning to the "
        "uncompiled model, then compile it (torch.compile(pipe.transformer, fullgraph=True) or "
        "pipe.transformer.compile(fullgraph=True)); compiling its blocks (regional compilation) works "
        "in either order"
    )


def generation_checks(model: nn.Module, state: PruningEngine) -> list[Callable[[], None]]:
    """The checks to run at every generation's first step, for what was combined after pruning was applied:
    for ``PruningEngine.checks``."""
    return [
        lambda: check_processors_installed(model, state.processors),
        lambda: check_no_cache(model, after_apply=True),
        lambda: check_enabled_before_pruning(model, state.shard),
    ]


# --- attention processors


def check_attention_processors(
    model: nn.Module, layers: Iterable[nn.Module], model_processors: tuple[type, ...] = ()
) -> None:
    """Refuse to replace a processor that is not one of diffusers' plain ones (:data:`PLAIN_PROCESSORS`).

    CAT pruning runs a layer's processor only at full steps; at the fill and pruned steps its own processor
    recomputes plain attention. Whatever another processor adds (an IP-Adapter's image prompt) would then
    be missing from every pruned step: a wrong image, with no error."""
    foreign = [(layer, layer.processor) for layer in layers if not is_plain(layer, model_processors)]
    if not foreign:
        return
    where = f"{_layer_names(model, [layer for layer, _ in foreign])} of this {type(model).__name__}"
    what = _class_names(processor for _, processor in foreign)
    if any(is_ip_adapter_processor(processor) for _, processor in foreign):
        raise RuntimeError(
            f"CAT pruning cannot be combined with an IP-Adapter: its attention processors ({what}) run "
            f"{where}, and CAT pruning would replace them (the image prompt would be missing from every "
            "pruned step). Call pipe.unload_ip_adapter() before apply_cat_pruning, or generate with the "
            "IP-Adapter without CAT pruning."
        )
    raise RuntimeError(
        f"CAT pruning cannot be combined with the attention processor {what} on {where}: CAT pruning "
        "replaces these layers' processors and computes plain attention at pruned steps, so what "
        f"{what} adds would be missing there. Supported processors: {', '.join(PLAIN_PROCESSORS)}. Put "
        "diffusers' default processors back before apply_cat_pruning (the component that installed "
        f"{what} says how to remove it), or generate without CAT pruning."
    )


def check_processors_installed(model: nn.Module, processors: Iterable[CachingProcessor]) -> None:
    """At a generation's first step: refuse when CAT pruning's processors were replaced since it was applied
    (``pipe.load_ip_adapter``, ``set_attn_processor``, ``fuse_qkv_projections``, a PAG pipeline...).

    The hooks would still gather the selected tokens, and layers without CAT pruning's processor would
    run on them without the other tokens' keys and values: a crash or a wrong image."""
    replaced = [processor for processor in processors if processor.attention.processor is not processor]
    if not replaced:
        return
    layers = [processor.attention for processor in replaced]
    where = f"{_layer_names(model, layers)} of this {type(model).__name__}"
    what = _class_names(layer.processor for layer in layers)
    if any(is_ip_adapter_processor(layer.processor) for layer in layers):
        raise RuntimeError(
            f"CAT pruning cannot be combined with an IP-Adapter: one was loaded after apply_cat_pruning "
            f"and its attention processors ({what}) replaced CAT pruning's on {where}. To use the "
            "IP-Adapter, call remove_cat_pruning(pipe) and load the IP-Adapter again (remove_cat_pruning "
            "puts back the processors from before apply_cat_pruning). To prune without it, call "
            "pipe.unload_ip_adapter(), remove_cat_pruning(pipe), then apply_cat_pruning(pipe) again."
        )
    raise RuntimeError(
        f"CAT pruning: its attention processors on {where} were replaced after apply_cat_pruning, by "
        f"{what} (set_attn_processor, or a component that installs its own processors); pruned steps need "
        "CAT pruning's processors on every layer it replaced. Call remove_cat_pruning(pipe) before "
        "changing attention processors and apply_cat_pruning(pipe) after (only diffusers' plain "
        f"processors can be combined with it: {', '.join(PLAIN_PROCESSORS)})."
    )


# --- diffusers' caches


def enabled_caches(model: nn.Module) -> dict[str, list[str]]:
    """diffusers' cache techniques on ``model``: their names, each with the names of its hooks found on
    ``model`` or its submodules. A cache enabled with ``enable_cache`` (``CacheMixin``) counts even where
    its hooks matched no module."""
    caches: dict[str, list[str]] = {}
    config = getattr(model, "_cache_config", None)
    if config is not None:
        caches[type(config).__name__.removesuffix("Config")] = []
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook_name, hook in getattr(registry, "hooks", {}).items():
            cache = _cache_name(hook)
            if cache is not None and hook_name not in caches.setdefault(cache, []):
                caches[cache].append(hook_name)
    return caches


def _cache_name(hook: object) -> str | None:
    """The cache technique a diffusers hook belongs to, or None for other hooks (CAT pruning's own, layer
    skipping, offloading, casting...)."""
    package, _, module = type(hook).__module__.rpartition(".")
    if package != "diffusers.hooks":
        return None
    if module in CACHE_HOOK_MODULES:
        return CACHE_HOOK_MODULES[module]
    return module if module.endswith("cache") else None


def check_no_cache(model: nn.Module, after_apply: bool = False) -> None:
    """Refuse diffusers' caches: before ``apply_cat_pruning``, or (``after_apply``) at a generation's first
    step when one was enabled after it. Why: ``_CACHES_REASON``."""
    caches = enabled_caches(model)
    if not caches:
        return
    names = " and ".join(caches)
    hooks = [hook for cache_hooks in caches.values() for hook in cache_hooks]
    if callable(getattr(model, "disable_cache", None)) and getattr(model, "_cache_config", None) is not None:
        disable = "pipe.transformer.disable_cache()"
    else:
        disable = (
            "remove its hooks: HookRegistry.check_if_exists_or_initialize(pipe.transformer)"
            f".remove_hook(name, recurse=True) for each name in {hooks} (from diffusers.hooks import "
            "HookRegistry)"
        )
    model_name = type(model).__name__
    if not after_apply:
        raise RuntimeError(
            f"CAT pruning cannot be combined with diffusers' {names}, enabled on this {model_name}: "
            f"{_CACHES_REASON}. Disable it before apply_cat_pruning ({disable}), or use the cache without "
            "CAT pruning."
        )
    raise RuntimeError(
        f"CAT pruning cannot be combined with diffusers' {names}, enabled on this {model_name} after "
        f"apply_cat_pruning: {_CACHES_REASON}. Disable it to keep pruning ({disable}), or call "
        "remove_cat_pruning(pipe) first to use the cache without CAT pruning."
    )


# --- message parts


def _layer_names(model: nn.Module, layers: list[nn.Module], shown: int = 4) -> str:
    """The qualified names of ``layers`` in ``model``, the first ``shown`` of them and a count."""
    names_by_id = {id(module): name for name, module in model.named_modules()}
    names = [names_by_id.get(id(layer), type(layer).__name__) for layer in layers]
    listed = ", ".join(names[:shown])
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"attention layer{'s' if len(names) > 1 else ''} {listed}{more}"


def _class_names(objects: Iterable[object]) -> str:
    return ", ".join(sorted({type(obj).__name__ for obj in objects}))
