#!/usr/bin/env bash
# Full vs CAT wall time of full-size SD3-medium, PixArt-Sigma and FLUX.1-dev (random weights, fp16,
# 1024x1024, 28 steps) on one CUDA GPU, offline: eager and compiled whole (COMPILE="none full"; add
# "regional" for block-wise compilation; each pair compiled alike, compile time reported apart),
# CUDA_GRAPHS=1 for mode="reduce-overhead"; the denoising loop and end to end (with the VAE decode)
# apart. Needs PyTorch with CUDA; diffusers and its missing dependencies are installed from the wheels
# in .whl/ at the repository root. Writes JSON into OUTDIR.
#
#   benchmarks/gpu_bench.sh OUTDIR          # eager: about 3 minutes on an H100 (see benchmarks/README.md)
#
# Then the video models (VIDEO_MODELS, default wan2.1-t2v-1.3b; "" skips them) at 480p, 81 frames,
# bf16, CFG as two calls, VIDEO_STEPS (default 20, the pipeline's is 50: fits a 15-minute device budget),
# VIDEO_REPEATS pairs (default 2), eager and compiled alike (COMPILE), each capped at 420 s.
#
# Environment: PYTHON (default python3), REPEATS (timed pairs per model, default 5), MODELS, COMPILE,
# CUDA_GRAPHS, VIDEO_MODELS, VIDEO_STEPS, VIDEO_FRAMES, VIDEO_REPEATS; for a smoke test on the CPU:
# DEVICE=cpu EXTRA_ARGS="--layers 1 --resolution 128 --steps 3 --start-step 2 --dtype float32"
# VIDEO_ARGS="--layers 1 --resolution 64 --frames 5 --steps 3 --start-step 2 --dtype float32".
set -euo pipefail

OUT="${1:?usage: benchmarks/gpu_bench.sh OUTDIR}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
REPEATS="${REPEATS:-5}"
DEVICE="${DEVICE:-cuda}"
MODELS="${MODELS:-sd3-medium pixart-sigma flux-dev}"
COMPILE="${COMPILE:-none full}"
VIDEO_MODELS="${VIDEO_MODELS-wan2.1-t2v-1.3b}"
VIDEO_STEPS="${VIDEO_STEPS:-20}"
VIDEO_FRAMES="${VIDEO_FRAMES:-81}"
VIDEO_REPEATS="${VIDEO_REPEATS:-2}"
GRAPHS=()
[ "${CUDA_GRAPHS:-0}" = 1 ] && GRAPHS=(--cuda-graphs)
read -r -a EXTRA <<<"${EXTRA_ARGS:-}"
read -r -a VIDEO_EXTRA <<<"${VIDEO_ARGS:-}"
mkdir -p "$OUT"

if [ "$DEVICE" = cuda ]; then
    "$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
fi
# shellcheck source=benchmarks/gpu_env.sh
source "$ROOT/benchmarks/gpu_env.sh"
gpu_env_setup

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
    "$PYTHON" -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)"
} >"$OUT/environment.txt"

catprune_with_tools catprune.tools.macs catprune.tools.bench

summarize() {
  "$PYTHON" - "$1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{r['model']} ({r['device']}, {r['dtype']}, compile {r['compile']}, warm-up "
      f"{r['warmup_seconds']['full']:.0f}s/{r['warmup_seconds']['cat']:.0f}s): full {r['full_seconds']['median']:.3f}s, "
      f"CAT {r['cat_seconds']['median']:.3f}s, speedup {r['speedup']:.2f}x, MAC bound {r['mac_bound']:.2f}x, "
      f"efficiency {r['efficiency']:.0%}, selection {r['selection_share']:.1%} of the CAT time, "
      f"K/V cache {r['kv_cache_bytes'] / 2**30:.2f} GiB" + ("" if r["end_to_end_seconds"] is None else
      f"; end to end with the VAE decode {r['end_to_end_seconds']['full']['median']:.3f}s / "
      f"{r['end_to_end_seconds']['cat']['median']:.3f}s, {r['end_to_end_speedup']:.2f}x"))
PY
}

for model in $MODELS; do
  # Counted MACs of the same setting (meta device, seconds), then the timed runs (capped).
  "${CATPRUNE[@]}" macs --model "$model" --steps 28 --json >"$OUT/macs-$model.json"
  for compile in $COMPILE; do
    timeout 240 "${CATPRUNE[@]}" bench --model "$model" --random-weights --resolution 1024 --steps 28 \
        --dtype float16 --device "$DEVICE" --repeats "$REPEATS" --compile "$compile" "${GRAPHS[@]}" --decode "${EXTRA[@]}" --json \
        >"$OUT/bench-$model-$compile.json" || echo "$model, compile $compile: failed or timed out"
    [ -s "$OUT/bench-$model-$compile.json" ] || continue
    summarize "$OUT/bench-$model-$compile.json"
  done
done

for model in $VIDEO_MODELS; do
  "${CATPRUNE[@]}" macs --model "$model" --steps "$VIDEO_STEPS" --frames "$VIDEO_FRAMES" --json >"$OUT/macs-$model.json"
  for compile in $COMPILE; do
    timeout 420 "${CATPRUNE[@]}" bench --model "$model" --random-weights --resolution 480 --frames "$VIDEO_FRAMES" \
        --steps "$VIDEO_STEPS" --dtype bfloat16 --device "$DEVICE" --repeats "$VIDEO_REPEATS" --compile "$compile" \
        "${GRAPHS[@]}" "${VIDEO_EXTRA[@]}" --json \
        >"$OUT/bench-$model-$compile.json" || echo "$model, compile $compile: failed or timed out"
    [ -s "$OUT/bench-$model-$compile.json" ] || continue
    summarize "$OUT/bench-$model-$compile.json"
  done
done
