"""Acceptance figures of the shapes models: caption alignment of full and CAT generations, path curvature.

For each model and each held-out caption of its grammar (``heldout_captions(n, seed=0)`` of ``scenes``
for the shapes models, of ``textures`` for ``textures-mmdit``; seed i for caption i), five generations
share one initial noise: the full model at 28 steps, CAT (keep 0.3 from step 8) at 28 steps, and the full
model at 20, 15 and 10 steps. The checker scores each image against its caption, per attribute (on
textured backdrops it reads the objects only: no background column there). PSNR compares CAT and the
fewer-step images with the full 28-step one (mean over captions of the per-image PSNR, 8-bit RGB): how
far the sampling paths bend (issue 16: the 15-step target is <= 33 dB; the shapes toys give 53.3 and 40.3).

Generations are cached per batch under ``--cache`` (keyed by the weights' size and time, the guidance and
any device other than the CPU), so an interrupted run picks up where it stopped and a rerun with more
captions or more runs generates only what is missing.

    python benchmarks/shapes_quality.py                 # both shapes models, 200 captions
    python benchmarks/shapes_quality.py --models textures-mmdit --n 200 --batch 8 --threads 2
    python benchmarks/shapes_quality.py --models runs/shapes-mmdit/pipeline --n 40 --guidance 3
    python benchmarks/shapes_quality.py --models textures-mmdit --n 40 --runs full-28 --guidance 7
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
from catprune.shapes import ATTRIBUTES, score, textures
from catprune.shapes import heldout_captions as heldout_shapes_captions
from catprune.shapes.pipelines import ShapesPipeline, model_folder, prompt_grammar

PSNR_CAP = 100.0
"""PSNR of identical images (infinite) is counted as this many dB in means."""
COLUMNS = (*ATTRIBUTES, "background", "count", "full")
DEFAULT_MODELS = ("shapes-mmdit", "shapes-pixart")
CURVATURE_TARGET_DB = 33.0
"""Issue 16's bound on the 15-step images' PSNR against the 28-step ones for a model whose paths bend."""


@dataclass(frozen=True)
class Run:
    name: str
    steps: int
    cat: bool


REFERENCE = Run("full-28", 28, False)
RUNS = (REFERENCE, Run("cat-28", 28, True), Run("full-20", 20, False), Run("full-15", 15, False),
        Run("full-10", 10, False))  # fmt: skip


def captions_for(model: str, n: int) -> list[str]:
    """The first ``n`` held-out captions of the model's grammar (textured ones for a textures model)."""
    grammar = prompt_grammar(model)
    if grammar is None:
        raise SystemExit(f"{model}: not a shapes model (a shipped name or a saved shapes pipeline folder)")
    return (textures.heldout_captions if grammar == "textures" else heldout_shapes_captions)(n, seed=0)


def weights_key(model: str, guidance: float | None, device: str) -> str:
    """Cache key: the model's path, its transformer weights' size and modification time, the guidance, and
    the device unless it is the CPU (the key of earlier CPU runs is unchanged)."""
    path = model_folder(model)
    weights = path / "transformer" / "diffusion_pytorch_model.safetensors"
    stat = weights.stat()
    text = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{guidance}"
    if device != "cpu":
        text += f":{device}"
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
    model: str,
    captions: list[str],
    batch: int,
    guidance: float | None,
    cache: Path,
    device: str,
    runs: tuple[Run, ...] = RUNS,
) -> dict[str, np.ndarray]:
    """Images (N, H, W, 3) uint8 of each run, generated batch by batch or read from the cache."""
    pipe = runtime.load_pipeline(model, device=device, dtype="float32")
    folder = cache / weights_key(model, guidance, device)
    folder.mkdir(parents=True, exist_ok=True)
    images: dict[str, list[np.ndarray]] = {run.name: [] for run in runs}
    seconds, counts = dict.fromkeys(images, 0.0), dict.fromkeys(images, 0)
    starts = range(0, len(captions), batch)
    for first in tqdm(starts, desc=Path(model).name, unit="batch"):
        chunk = captions[first : first + batch]
        noise = initial_noise(pipe, first, len(chunk))
        for run in runs:
            file = folder / f"{run.name}-{first}-{len(chunk)}.npy"
            if not file.is_file():
                start = time.perf_counter()
                np.save(file, generate(pipe, run, chunk, noise, guidance))
                seconds[run.name] += time.perf_counter() - start
                counts[run.name] += len(chunk)
            images[run.name].append(np.load(file))
    timed = ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items() if s)
    if timed:
        threads = torch.get_num_threads()
        print(f"{model}: generated in {timed} (batches of {batch} captions, {threads} threads)")
    if all(counts.values()):
        per_caption = sum(seconds[name] / counts[name] for name in counts)
        print(f"{model}: {per_caption:.2f} s per caption (its {len(runs)} runs together)")
    return {name: np.concatenate(parts) for name, parts in images.items()}


def _cell(values: list[float]) -> str:
    """An accuracy cell in %: ``-`` where the checker does not score the attribute (textured backdrops)."""
    return f"{100 * float(np.mean(values)):>11.1f}" if values else f"{'-':>11}"


def report(model: str, captions: list[str], images: dict[str, np.ndarray]) -> None:
    print(f"\n{model} ({len(captions)} held-out captions; accuracy in %)")
    print(f"{'run':<8}" + "".join(f"{c:>11}" for c in COLUMNS))
    full_accuracy = {}
    for name, batch in images.items():
        scores = [score(image, text) for image, text in zip(batch, captions, strict=True)]
        values = {c: [float(s[c]) for s in scores if c in s] for c in COLUMNS}
        full_accuracy[name] = 100 * float(np.mean(values["full"]))
        print(f"{name:<8}" + "".join(_cell(values[c]) for c in COLUMNS))
    if "background" not in score(images[REFERENCE.name][0], captions[0]):
        print("(textured backdrops: the checker reads the objects only; full: every object attribute right)")
    if "cat-28" in images:
        delta = full_accuracy["cat-28"] - full_accuracy[REFERENCE.name]
        print(f"full-caption accuracy, CAT minus full: {delta:+.1f} points")
    for run in RUNS[1:]:
        if run.name not in images:
            continue
        values = psnr(images[run.name], images[REFERENCE.name])
        identical = int((values == PSNR_CAP).sum())
        print(
            f"PSNR {run.name} vs {REFERENCE.name}: mean {values.mean():.2f} dB, "
            f"median {np.median(values):.2f} dB "
            f"({identical} identical images counted as {PSNR_CAP:.0f} dB)"
        )
    if "full-15" not in images:
        return
    curvature = psnr(images["full-15"], images[REFERENCE.name]).mean()
    verdict = "meets" if curvature <= CURVATURE_TARGET_DB else "misses"
    target = f"the target <= {CURVATURE_TARGET_DB:.0f} dB"
    print(f"curvature: mean PSNR of 15 against 28 steps {curvature:.2f} dB, {verdict} {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        nargs="+",
        default=list(DEFAULT_MODELS),
        help="shipped names (textures-mmdit too) or pipeline folders (default: the two shapes models)",
    )
    parser.add_argument("--n", type=int, default=200, help="held-out captions per model (default: 200)")
    parser.add_argument("--batch", type=int, default=50, help="captions per batch (default: 50)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    names = [run.name for run in RUNS]
    parser.add_argument(
        "--runs",
        nargs="+",
        choices=names,
        default=names,
        help=f"which runs (default: all; {REFERENCE.name}, the reference, always runs)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda...")
    parser.add_argument("--cache", type=Path, default=Path("runs/shapes-quality"), help="generation cache")
    args = parser.parse_args()
    if args.n < 1 or args.batch < 1:
        parser.error("--n and --batch must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = tuple(run for run in RUNS if run is REFERENCE or run.name in args.runs)
    for model in args.models:
        captions = captions_for(model, args.n)
        images = evaluate(model, captions, args.batch, args.guidance, args.cache, args.device, runs)
        report(model, captions, images)


if __name__ == "__main__":
    main()
