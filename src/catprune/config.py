"""The one settings object of CAT Pruning, validated when it is built."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Literal

RowPairing = Literal["none", "cfg", "cfg-cond-first"]
Extrapolation = Literal["none", "linear", "quadratic"]
EXTRAPOLATION_ORDERS: dict[str, int] = {"none": 0, "linear": 1, "quadratic": 2}
"""The order in time of each extrapolation option (0: the values as last computed)."""
CACHE_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16", "float8_e4m3fn")
"""The storage dtypes ``cache_dtype`` takes (torch's names; the engine looks them up in torch)."""


class ConfigTypeError(TypeError, ValueError):
    """A setting of the wrong type (a string where a number belongs...). A TypeError, and a ValueError as
    every other invalid setting is, so that callers catching either see it."""


NUMERIC_FIELDS: dict[str, type] = {
    "keep_ratio": float,
    "start_step": int,
    "num_clusters": int,
    "cluster_feature_scale": float,
    "noise_fraction": float,
    "ewma_decay": float,
    "kmeans_iterations": int,
    "seed": int,
    "kept_multiple": int,
    "skip_every": int,
}
"""The numeric fields and their kind: ``float`` takes any real number (an int too), ``int`` integers only;
neither takes a bool or a string."""
NUMBER_WORDS = {float: "a finite number", int: "an integer"}


def _is_number(value: object, kind: type) -> bool:
    if isinstance(value, bool):
        return False
    if kind is int:
        return isinstance(value, numbers.Integral)
    return isinstance(value, numbers.Real) and math.isfinite(float(value))  # type: ignore[arg-type]


def _numeric_text(value: object) -> bool:
    """Whether ``value`` is a string that reads as a number ("0.3"): the message then shows the fix."""
    if not isinstance(value, str):
        return False
    try:
        float(value)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class CATPruningConfig:
    """Settings of CAT Pruning (cluster-aware token pruning).

    Important args:
        keep_ratio: share alpha of image tokens recomputed at each pruned step; the others reuse the previous
            step's output. Paper: 0.3 ("a sweet spot", Sec. 4.2); 0.2 shows visible degradation.
        start_step: t0, the first pruned step (0-based): steps ``0 .. start_step - 1`` run in full. The output
            of step ``start_step - 2`` is the reference noise n_t0 and the output of step ``start_step - 1``
            is clustered. Paper and authors' code: 8 (of 28 steps). Must be >= 2.

    Args to tinker with:
        num_clusters: KMeans clusters over the token grid. Authors' code: 20. Clamped on small grids (see
            :func:`catprune.selection.effective_num_clusters`).
        cluster_feature_scale: weight of the relative noise against the positional encoding in the
            clustering features (features = scale * n_t + pos_enc). Authors' code: 0.05.
        noise_fraction: share of the budget chosen by relative noise inside the top clusters; the rest goes
            to the stalest tokens. Authors' code: about 0.25.
        ewma_decay: decay of the exponentially weighted selection count, f_t = decay * f_{t-1} + I_t
            (paper Eq. 2). Authors' code: 0.5.
        kmeans_iterations: Lloyd iterations of the KMeans, fixed so that clustering needs no host sync.
            scikit-learn (used by the authors) stops at convergence, which on token grids takes about 10-30.
        seed: seed of the KMeans++ initialisation (authors' code: ``random_state=0``).
        strategy: how tokens are chosen, by name (``catprune.strategies``): ``"cat"`` (the paper's method),
            an ablation at the same budget (``"noise"``, ``"noise+balance"``, ``"rows"``, ``"random"``) or the
            AT-EDM baseline (``"at-edm"``: attention PageRank). An unknown name is refused by
            ``apply_cat_pruning``, where strategies are looked up.
        row_pairing: how batch rows pair up when the model is used without a pipeline. ``"none"``: each row
            is its own prompt. ``"cfg"``: the batch is ``[uncond..., cond...]`` as diffusers pipelines build
            it under classifier-free guidance, and the two rows of a prompt share one selection computed
            from the conditional row. ``"cfg-cond-first"``: the same with the batch ``[cond..., uncond...]``
            (Z-Image's order). Ignored when applied to a pipeline, whose first call tells whether CFG is on
            (in the order the model's adapter declares for its pipelines).
        prune: False runs every step unpruned while the state still tracks steps and counts MACs: the
            "full model" baseline of measurements (see :meth:`unpruned`).

    Beyond the paper (off by default; ``docs/method.md`` says what they cost and gain):
        kv_extrapolation: what a pruned step attends over for the image tokens it does not recompute:
            their cached K/V as last computed (``"none"``: the paper) or extrapolated to the current
            timestep, first order in the scheduler's time, from the last two times each token was computed
            (``"linear"``; it keeps the previous K/V beside the cache: twice the cache memory), or second
            order from the last three (``"quadratic"``: three times the cache memory).
        output_extrapolation: the same for the output of the tokens not recomputed: reused as last
            computed (``"none"``: the paper) or extrapolated in time (``"linear"``, ``"quadratic"``).
        kept_multiple: K rounded up to a multiple of this (64 or 128 suit fast attention and matmul
            kernels on GPUs); it recomputes a few more tokens: SD3 at 1024x1024, K = 1229 -> 1280, the
            28-step MAC ratio 0.537 -> 0.545 (``catprune macs --kept-multiple 64``). 1: K = round(alpha N).
        refresh_steps: steps after ``start_step`` that run in full, refreshing every cache and output
            (0-based; negative ones count from the end, where the caller says how many steps the generation
            has: a pipeline does). ``(-1,)``: the last step runs in full.
        skip_every: step skipping composed with CAT: 0 never skips; n >= 2 skips every n-th pruned step
            (steps ``start_step + n - 1``, ``start_step + 2n - 1``, ...; refresh steps are never skipped).
            A skipped step recomputes no image token: every token's output is reused as last computed, or
            forecast from its history with ``output_extrapolation`` (as diffusers' TaylorSeer forecasts
            whole blocks), and the blocks run only on the tokens every step recomputes (the text stream of
            MMDiT models; nothing else).
        cache_dtype: the dtype the K/V caches are stored in, computed in the model's dtype (cast on write,
            cast back on read): ``"bfloat16"`` or ``"float16"`` halve an fp32 model's caches,
            ``"float8_e4m3fn"`` quarters them (stored with one scale per token, so that small values keep
            their precision). None: the model's dtype, as computed. Their cost in PSNR on the shipped models
            is in ``docs/measurement.md`` ("Cache dtype"). Not combined with ``kv_extrapolation``.
    """

    keep_ratio: float = 0.3
    start_step: int = 8
    num_clusters: int = 20
    cluster_feature_scale: float = 0.05
    noise_fraction: float = 0.25
    ewma_decay: float = 0.5
    kmeans_iterations: int = 30
    seed: int = 0
    strategy: str = "cat"
    row_pairing: RowPairing = "none"
    prune: bool = True
    kv_extrapolation: Extrapolation = "none"
    output_extrapolation: Extrapolation = "none"
    refresh_steps: tuple[int, ...] = ()
    kept_multiple: int = 1
    skip_every: int = 0
    cache_dtype: str | None = None

    @classmethod
    def extrapolated(cls) -> CATPruningConfig:
        """The setting that beat "just run fewer steps" on both shipped shapes models: keep 0.5 from step 5,
        K/V extrapolation, the last step in full. Meant for 20 steps instead of 28 (0.46-0.48x the MACs of 28
        full steps): +1.2 dB (MMDiT) and +5.1 dB (PixArt) PSNR above the fewer-steps curve at equal MACs on
        those toys (``docs/results-frontier.md``), whose paths are nearly straight, but 3.5 dB *below* it on
        ``textures-mmdit``, whose paths bend (``docs/results-textures.md``); not measured on SD3 or
        PixArt-Sigma themselves. On a second-order solver, :meth:`multistep` does better on both MMDiT
        models."""
        return cls(keep_ratio=0.5, start_step=5, kv_extrapolation="linear", refresh_steps=(-1,))

    @classmethod
    def multistep(cls) -> CATPruningConfig:
        """The CAT setting that beat every other method measured at about 0.5x MACs on ``textures-mmdit``
        and ``shapes-mmdit`` (``docs/results-frontier.md``): meant for a second-order multistep solver
        (diffusers' ``DPMSolverMultistepScheduler``, DPM-Solver++(2M) with flow sigmas) at **16 steps**
        instead of 28. Keep 0.7 from step 4, tokens recomputed in consecutive raster rows in turn
        (``strategy="rows"``: every token at a steady pace, which K/V extrapolation needs), K/V
        extrapolation, the last step in full: 0.456x (textures) and 0.463x (shapes) the MACs of 28 full
        steps, 32.02 dB and 52.46 dB PSNR, +0.93 dB over diffusers' TaylorSeer on whole blocks (0.494x)
        and +3.18 dB over diffusers' MagCache (0.537x), the best non-CAT settings there, on 32 prompts,
        against the pipelines' 28-step Euler images. Against DPM-Solver++'s own 28-step image it lies
        0.85 dB *below* 14 unpruned DPM-Solver++ steps on ``textures-mmdit``. Not measured on SD3 or
        PixArt-Sigma themselves."""
        return cls(
            keep_ratio=0.7, start_step=4, strategy="rows", kv_extrapolation="linear", refresh_steps=(-1,)
        )

    @classmethod
    def unpruned(cls) -> CATPruningConfig:
        """No pruning: the unpatched computation at every step, with steps and MACs still counted."""
        return cls(prune=False)

    def __post_init__(self) -> None:
        def require(condition: bool, message: str) -> None:
            if not condition:
                raise ValueError(f"CATPruningConfig: {message}")

        for name, kind in NUMERIC_FIELDS.items():
            value = getattr(self, name)
            if not _is_number(value, kind):
                raise ConfigTypeError(
                    f"CATPruningConfig: {name} must be {NUMBER_WORDS[kind]}, got {value!r} "
                    f"({type(value).__name__})"
                    + (f"; write {name}={value.strip()}" if _numeric_text(value) else "")
                )
        require(0.0 < self.keep_ratio <= 1.0, f"keep_ratio must be in (0, 1], got {self.keep_ratio!r}")
        require(
            self.start_step >= 2,
            f"start_step must be an integer >= 2 (step start_step - 2 gives the reference noise), "
            f"got {self.start_step!r}",
        )
        require(self.num_clusters >= 1, f"num_clusters must be a positive integer, got {self.num_clusters!r}")
        require(
            self.cluster_feature_scale >= 0.0,
            f"cluster_feature_scale must be >= 0, got {self.cluster_feature_scale!r}",
        )
        require(
            0.0 <= self.noise_fraction <= 1.0,
            f"noise_fraction must be in [0, 1], got {self.noise_fraction!r}",
        )
        require(0.0 <= self.ewma_decay < 1.0, f"ewma_decay must be in [0, 1), got {self.ewma_decay!r}")
        require(
            self.kmeans_iterations >= 1,
            f"kmeans_iterations must be a positive integer, got {self.kmeans_iterations!r}",
        )
        require(isinstance(self.strategy, str), f"strategy must be a name, got {self.strategy!r}")
        require(isinstance(self.prune, bool), f"prune must be True or False, got {self.prune!r}")
        require(
            self.row_pairing in ("none", "cfg", "cfg-cond-first"),
            f"row_pairing must be 'none', 'cfg' or 'cfg-cond-first', got {self.row_pairing!r}",
        )
        for name in ("kv_extrapolation", "output_extrapolation"):
            value = getattr(self, name)
            require(
                value in EXTRAPOLATION_ORDERS,
                f"{name} must be 'none', 'linear' or 'quadratic', got {value!r}",
            )
        require(
            self.kept_multiple >= 1,
            f"kept_multiple must be a positive integer, got {self.kept_multiple!r}",
        )
        require(
            self.skip_every == 0 or self.skip_every >= 2,
            f"skip_every must be 0 (never skip) or an integer >= 2, got {self.skip_every!r}",
        )
        require(
            self.cache_dtype is None or self.cache_dtype in CACHE_DTYPES,
            f"cache_dtype must be None (the model's dtype) or one of {', '.join(map(repr, CACHE_DTYPES))}, "
            f"got {self.cache_dtype!r}",
        )
        require(
            self.cache_dtype is None or self.kv_extrapolation == "none",
            f"cache_dtype {self.cache_dtype!r} cannot be combined with kv_extrapolation "
            f"{self.kv_extrapolation!r} (the extrapolation's K/V histories are kept in the model's dtype); "
            "leave one of them at its default",
        )
        if isinstance(self.refresh_steps, (str, bytes)) or not hasattr(self.refresh_steps, "__iter__"):
            raise ConfigTypeError(
                f"CATPruningConfig: refresh_steps must be a sequence of integers, got {self.refresh_steps!r}"
            )
        object.__setattr__(self, "refresh_steps", tuple(self.refresh_steps))
        require(
            all(isinstance(step, int) and not isinstance(step, bool) for step in self.refresh_steps),
            f"refresh_steps must be integers, got {self.refresh_steps!r}",
        )

    def skips(self, step: int) -> bool:
        """Whether step ``step`` (0-based), if pruned, is one :attr:`skip_every` skips (a refresh step is
        not pruned)."""
        pruned = step - self.start_step
        return self.skip_every > 0 and pruned >= 0 and pruned % self.skip_every == self.skip_every - 1

    def num_kept(self, num_tokens: int) -> int:
        """K = round(alpha * N), at least one token, rounded up to a multiple of ``kept_multiple``."""
        kept = max(1, round(self.keep_ratio * num_tokens))
        return min(num_tokens, -(-kept // self.kept_multiple) * self.kept_multiple)
