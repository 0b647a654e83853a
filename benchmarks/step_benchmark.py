"""One pruned transformer step against one full step, on the CPU, next to the MAC bound of that step.

The architectures keep the full width of SD3-medium (1536 = 24 heads x 64) or PixArt-Sigma (1152 = 16
heads x 72) and two blocks, at 512x512 (a 64x64 latent in 2x2 patches: 1024 image tokens), with the
pipeline's text tokens (SD3: 333 joint tokens, PixArt: 300 cross-attention tokens) and CFG's batch of 2.
Random weights, float32, ``torch.inference_mode``, 2 threads.

A pruned step is a call of the patched transformer in PRUNED mode; it is timed twice: with its token
selection (as in a generation: relative noise, cluster pooling, ranking) and with the indices chosen
beforehand. The clustering step's selection (KMeans, once per generation) is timed on its own. Full and
pruned calls alternate after a warm-up; the figures are medians. The bound is counted: full-step MACs /
pruned-step MACs, from ``catprune.measure.count_macs`` (FlopCounterMode on the meta device).

    python benchmarks/step_benchmark.py --arch sd3
    python benchmarks/step_benchmark.py --arch pixart
"""

from __future__ import annotations

import argparse
import statistics

import torch

from catprune import CATPruningConfig, apply_cat_pruning
from catprune.architectures import ARCHITECTURES
from catprune.measure import SelectionTimer, count_macs, shared_weight_copy, timed

MODELS = {"sd3": "sd3-medium", "pixart": "pixart-sigma"}
CPU = torch.device("cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=MODELS, required=True)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--keep-ratio", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    architecture = ARCHITECTURES[MODELS[args.arch]].with_layers(args.layers)
    rows = architecture.cfg_batch
    full_model = architecture.build(CPU, torch.float32)
    pruned_model = shared_weight_copy(full_model)
    state = apply_cat_pruning(pruned_model, CATPruningConfig(keep_ratio=args.keep_ratio, start_step=2))
    state.begin_generation(True)  # [uncond, cond]: one selection for both rows
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(architecture.latent_shape(rows, args.resolution), generator=generator),
        "timestep": torch.full((rows,), 500.0),
        **architecture.conditioning(full_model, rows, args.resolution, generator=generator),
        "return_dict": False,
    }

    times: dict[str, list[float]] = {
        "full": [],
        "pruned, selection before": [],
        "pruned, selection included": [],
    }
    with torch.inference_mode():
        pruned_model(**inputs)  # step 0: full; gives the reference noise
        pruned_model(**inputs)  # step 1: fill the K/V caches
        selection = SelectionTimer(state, CPU)
        pruned_model(**inputs)  # first pruned step: its selection clusters the tokens (KMeans)
        clustering = selection.seconds()
        selected = state.indices.clone()
        later_selection = []
        full_model(**inputs)  # warm-up
        for _ in range(args.repeats):
            times["full"].append(timed(lambda: full_model(**inputs), CPU)[1])
            state.force_indices(selected)
            times["pruned, selection before"].append(timed(lambda: pruned_model(**inputs), CPU)[1])
            state.force_indices(None)
            selection.clear()
            times["pruned, selection included"].append(timed(lambda: pruned_model(**inputs), CPU)[1])
            later_selection.append(selection.seconds())

    report = count_macs(architecture, resolution=args.resolution, keep_ratio=args.keep_ratio)
    bound = report.full_step.macs / report.pruned_step.macs
    medians = {kind: statistics.median(values) for kind, values in times.items()}
    print(
        f"{architecture.name}: width {full_model.inner_dim}, {report.image_tokens} image tokens "
        f"({report.kept_tokens} kept), {report.text_tokens} text tokens, batch {rows}, float32, "
        f"{torch.get_num_threads()} threads, {args.repeats} repeats (medians, alternating)"
    )
    full_macs, pruned_macs = report.full_step.macs / 1e9, report.pruned_step.macs / 1e9
    print(f"  MACs (counted): full step {full_macs:.1f}G, pruned step {pruned_macs:.1f}G")
    print(f"  {'full step':<28}{medians['full'] * 1000:>9.1f} ms")
    for kind in ("pruned, selection before", "pruned, selection included"):
        speedup = medians["full"] / medians[kind]
        print(
            f"  {kind:<28}{medians[kind] * 1000:>9.1f} ms   speedup {speedup:.2f}x of bound {bound:.2f}x "
            f"= {speedup / bound:.0%}"
        )
    print(
        f"  selection: {statistics.median(later_selection) * 1000:.1f} ms per pruned step; "
        f"clustering step (KMeans, once per generation) {clustering * 1000:.1f} ms"
    )


if __name__ == "__main__":
    main()
