"""Acceptance figures of the shapes models: caption alignment of full and CAT generations, path straightness.

For each model and each held-out caption (``heldout_captions(n, seed=0)``, seed i for caption i), three
generations share one initial noise: the full model at 28 steps, CAT (keep 0.3 from step 8) at 28 steps,
and the full model at 15 steps. The checker scores each image against its caption; PSNR compares CAT and
the 15-step image with the full 28-step one (mean over captions of the per-image PSNR, 8-bit RGB).

Generations are cached per batch under ``--cache`` (keyed by the weights' size and time), so an
interrupted run picks up where it stopped.

    python benchmarks/shapes_quality.py                 # both shipped models, 200 captions
    python benchmarks/shapes_quality.py --models runs/shapes-mmdit/pipeline --n 40 --guidance 3
"""

from __future__ import annotations

import argparse
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from catprune import CATPruningConfig, apply_cat_pruning, remove_cat_pruning, runtime
from catprune.shapes import ATTRIBUTES, heldout_captions, score
from catprune.shapes.pipelines import SHIPPED_MODELS, ShapesPipeline, shipped_model_path

PSNR_CAP = 100.0
"""PSNR of identical images (infinite) is counted as this many dB in means."""
COLUMNS = (*ATTRIBUTES, "background", "count", "full")


@dataclass(frozen=True)
class Run:
    name: str
    steps: int
    cat: bool


RUNS = (Run("full-28", 28, False), Run("cat-28", 28, True), Run("full-15", 15, False))


def weights_key(model: str, guidance: float | None) -> str:
    """Cache key: the model's path, its transformer weights' size and modification time, and the guidance."""
    path = shipped_model_path(model) if model in SHIPPED_MODELS else Path(model)
    weights = path / "transformer" / "diffusion_pytorch_model.safetensors"
    stat = weights.stat()
    text = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{guidance}"
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def initial_noise(pipe: ShapesPipeline, first: int, count: int) -> torch.Tensor:
    """Noise of captions first..first+count-1, each from its own seed, so batching does not change it."""
    channels, side = pipe.transformer.config.in_channels, pipe.image_size
    return torch.stack(
        [
            torch.randn(channels, side, side, generator=torch.Generator().manual_seed(i))
            for i in range(first, first + count)
        ]
    )


def generate(
    pipe: ShapesPipeline, run: Run, captions: list[str], noise: torch.Tensor, guidance: float | None
) -> np.ndarray:
    """A batch (N, H, W, 3) uint8 from explicit initial noise; not ``runtime.run_generation``, whose noise
    comes from one seed per call: here each caption has its own seed, whatever the batch."""
    if run.cat:
        apply_cat_pruning(pipe, CATPruningConfig(keep_ratio=0.3, start_step=8))
    try:
        return pipe(
            captions, num_inference_steps=run.steps, guidance_scale=guidance, latents=noise, output_type="np"
        ).images
    finally:
        remove_cat_pruning(pipe)


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB (``runtime.psnr``) of (N, H, W, 3) uint8 batches, capped at ``PSNR_CAP``."""
    return np.array([min(runtime.psnr(x, y), PSNR_CAP) for x, y in zip(a, b, strict=True)])


def evaluate(
    model: str, captions: list[str], batch: int, guidance: float | None, cache: Path
) -> dict[str, np.ndarray]:
    """Images (N, H, W, 3) uint8 of every run, generated batch by batch or read from the cache."""
    pipe = runtime.load_pipeline(model, device="cpu", dtype="float32")
    folder = cache / weights_key(model, guidance)
    folder.mkdir(parents=True, exist_ok=True)
    images: dict[str, list[np.ndarray]] = {run.name: [] for run in RUNS}
    seconds = dict.fromkeys(images, 0.0)
    starts = range(0, len(captions), batch)
    for first in tqdm(starts, desc=Path(model).name, unit="batch"):
        chunk = captions[first : first + batch]
        noise = initial_noise(pipe, first, len(chunk))
        for run in RUNS:
            file = folder / f"{run.name}-{first}-{len(chunk)}.npy"
            if not file.is_file():
                start = time.perf_counter()
                np.save(file, generate(pipe, run, chunk, noise, guidance))
                seconds[run.name] += time.perf_counter() - start
            images[run.name].append(np.load(file))
    timed = ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items() if s)
    if timed:
        print(f"{model}: generated in {timed} (batches of {batch} captions)")
    return {name: np.concatenate(parts) for name, parts in images.items()}


def report(model: str, captions: list[str], images: dict[str, np.ndarray]) -> None:
    print(f"\n{model} ({len(captions)} held-out captions; accuracy in %)")
    print(f"{'run':<8}" + "".join(f"{c:>11}" for c in COLUMNS))
    full_accuracy = {}
    for name, batch in images.items():
        scores = [score(image, text) for image, text in zip(batch, captions, strict=True)]
        means = {c: 100 * float(np.mean([float(s[c]) for s in scores])) for c in COLUMNS}
        full_accuracy[name] = means["full"]
        print(f"{name:<8}" + "".join(f"{means[c]:>11.1f}" for c in COLUMNS))
    delta = full_accuracy["cat-28"] - full_accuracy["full-28"]
    print(f"full-caption accuracy, CAT minus full: {delta:+.1f} points")
    for name in ("cat-28", "full-15"):
        values = psnr(images[name], images["full-28"])
        identical = int((values == PSNR_CAP).sum())
        print(
            f"PSNR {name} vs full-28: mean {values.mean():.2f} dB, median {np.median(values):.2f} dB "
            f"({identical} identical images counted as {PSNR_CAP:.0f} dB)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(SHIPPED_MODELS), help="shipped names or folders")
    parser.add_argument("--n", type=int, default=200, help="held-out captions (default: 200)")
    parser.add_argument("--batch", type=int, default=50, help="captions per batch (default: 50)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--cache", type=Path, default=Path("runs/shapes-quality"), help="generation cache")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    captions = heldout_captions(args.n, seed=0)
    for model in args.models:
        report(model, captions, evaluate(model, captions, args.batch, args.guidance, args.cache))


if __name__ == "__main__":
    main()
