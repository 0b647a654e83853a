"""Fidelity cost of ``CATPruningConfig.cache_dtype`` on the shipped models: PSNR of CAT images with K/V
caches kept in bfloat16, float16 and float8 against CAT with the model's own (float32) caches, and
against the unpruned image.

For each model and each of its first ``--n`` held-out captions (seed i for caption i, the same initial
noise for every setting), one unpruned generation and one CAT generation (keep 0.3 from step 8, 28 Euler
steps) per cache dtype. ``float8_e4m3fn, plain cast`` is float8 without the per-token scale that the
library applies (every scale 1), to show what the scale buys. PSNR is per image on 8-bit RGB
(``runtime.psnr``; identical images count as 100 dB), averaged over captions.

    PYTHONPATH=src python benchmarks/cache_dtype.py                      # both MMDiT models, 8 captions
    PYTHONPATH=src python benchmarks/cache_dtype.py --models textures-mmdit --n 16
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from catprune import CATPruningConfig, apply_cat_pruning, remove_cat_pruning, runtime
from catprune.engine import KVCache
from catprune.shapes import heldout_captions, textures
from catprune.shapes.pipelines import prompt_grammar

PSNR_CAP = 100.0
"""PSNR of identical images (infinite) is counted as this many dB in means."""
PLAIN_FLOAT8 = "float8_e4m3fn, plain cast"
SETTINGS = (None, "bfloat16", "float16", "float8_e4m3fn", PLAIN_FLOAT8)
"""The cache dtypes compared (None: the model's, float32)."""


@contextlib.contextmanager
def plain_float8_cast() -> Iterator[None]:
    """float8 caches without the per-token scale: a plain cast (every scale 1), for comparison."""
    scaled = KVCache._stored

    def plain(self: KVCache, rows: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.scales is None:
            return scaled(self, rows)
        return rows.to(self.key.dtype), rows.new_ones(*rows.shape[:2], 1, 1)  # (B, r, h, d), (B, r, 1, 1)

    KVCache._stored = plain  # type: ignore[method-assign]
    try:
        yield
    finally:
        KVCache._stored = scaled  # type: ignore[method-assign]


def generate(pipe: object, captions: list[str], noise: Tensor, cache_dtype: str | bool | None) -> np.ndarray:
    """Images (N, H, W, 3) uint8: unpruned for ``False``, else CAT with the K/V caches in ``cache_dtype``."""
    plain = cache_dtype == PLAIN_FLOAT8
    if cache_dtype is not False:
        dtype = "float8_e4m3fn" if plain else cache_dtype
        apply_cat_pruning(pipe, CATPruningConfig(keep_ratio=0.3, start_step=8, cache_dtype=dtype))
    try:
        with plain_float8_cast() if plain else contextlib.nullcontext():
            return pipe(captions, num_inference_steps=28, latents=noise, output_type="np").images
    finally:
        if cache_dtype is not False:
            remove_cat_pruning(pipe)


def psnr(images: np.ndarray, references: np.ndarray) -> float:
    """Mean per-image PSNR in dB, each capped at ``PSNR_CAP``."""
    return float(
        np.mean([min(runtime.psnr(a, b), PSNR_CAP) for a, b in zip(images, references, strict=True)])
    )


def measure(model: str, n: int) -> dict[str, tuple[float, float]]:
    """{setting: (PSNR against CAT with float32 caches, PSNR against the unpruned image)}."""
    pipe = runtime.load_pipeline(model, device="cpu", dtype="float32")
    grammar = prompt_grammar(model)
    captions = (textures.heldout_captions if grammar == "textures" else heldout_captions)(n, seed=0)
    channels, side = pipe.transformer.config.in_channels, pipe.image_size
    noise = torch.stack(
        [torch.randn(channels, side, side, generator=torch.Generator().manual_seed(i)) for i in range(n)]
    )
    unpruned = generate(pipe, captions, noise, False)
    images = {setting: generate(pipe, captions, noise, setting) for setting in SETTINGS}
    return {str(s): (psnr(images[s], images[None]), psnr(images[s], unpruned)) for s in SETTINGS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["shapes-mmdit", "textures-mmdit"])
    parser.add_argument("--n", type=int, default=8, help="held-out captions per model (default: 8)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CAT keep 0.3 from step 8 of 28, {args.n} captions per model; mean PSNR in dB (8-bit RGB)")
    print(f"{'model':<16}{'cache dtype':<28}{'vs float32 cache':>18}{'vs unpruned':>13}")
    for model in args.models:
        for setting, (against_cache, against_full) in measure(model, args.n).items():
            name = "float32 (model's)" if setting == "None" else setting
            print(f"{model:<16}{name:<28}{against_cache:>18.2f}{against_full:>13.2f}")


if __name__ == "__main__":
    main()
