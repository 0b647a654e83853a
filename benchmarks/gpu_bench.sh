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
# Environment: PYTHON (default python3), REPEATS (timed pairs per model, default 5), MODELS, COMPILE,
# CUDA_GRAPHS; for a smoke test on the CPU: DEVICE=cpu EXTRA_ARGS="--layers 1 --resolution 128 --steps 3
# --start-step 2 --dtype float32".
set -euo pipefail

OUT="${1:?usage: benchmarks/gpu_bench.sh OUTDIR}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
REPEATS="${REPEATS:-5}"
DEVICE="${DEVICE:-cuda}"
MODELS="${MODELS:-sd3-medium pixart-sigma flux-dev}"
COMPILE="${COMPILE:-none full}"
GRAPHS=()
[ "${CUDA_GRAPHS:-0}" = 1 ] && GRAPHS=(--cuda-graphs)
read -r -a EXTRA <<<"${EXTRA_ARGS:-}"
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

for model in $MODELS; do
  # Counted MACs of the same setting (meta device, seconds), then the timed runs (capped).
  "${CATPRUNE[@]}" macs --model "$model" --steps 28 --json >"$OUT/macs-$model.json"
  for compile in $COMPILE; do
    timeout 240 "${CATPRUNE[@]}" bench --model "$model" --random-weights --resolution 1024 --steps 28 \
        --dtype float16 --device "$DEVICE" --repeats "$REPEATS" --compile "$compile" "${GRAPHS[@]}" --decode "${EXTRA[@]}" --json \
        >"$OUT/bench-$model-$compile.json" || echo "$model, compile $compile: failed or timed out"
    [ -s "$OUT/bench-$model-$compile.json" ] || continue
    "$PYTHON" - "$OUT/bench-$model-$compile.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{r['model']} ({r['device']}, {r['dtype']}, compile {r['compile']}, warm-up "
      f"{r['warmup_seconds']['full']:.0f}s/{r['warmup_seconds']['cat']:.0f}s): full {r['full_seconds']['median']:.3f}s, "
      f"CAT {r['cat_seconds']['median']:.3f}s, speedup {r['speedup']:.2f}x, MAC bound {r['mac_bound']:.2f}x, "
      f"efficiency {r['efficiency']:.0%}, selection {r['selection_share']:.1%} of the CAT time, "
      f"K/V cache {r['kv_cache_bytes'] / 2**30:.2f} GiB; end to end with the VAE decode "
      f"{r['end_to_end_seconds']['full']['median']:.3f}s / {r['end_to_end_seconds']['cat']['median']:.3f}s, "
      f"{r['end_to_end_speedup']:.2f}x")
PY
  done
done
