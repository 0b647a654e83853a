#!/usr/bin/env bash
# Train the shapes models on one CUDA GPU, several settings at once (one process each), with the same
# `catprune train-shapes` as on the CPU. Needs PyTorch with CUDA; diffusers and its missing
# dependencies come from the wheels in .whl/ at the repository root (benchmarks/gpu_env.sh).
# Leaves in OUTDIR one NAME.tar per run (its EMA pipeline, checkpoint/state.json and training log).
#
#   benchmarks/gpu_train_shapes.sh OUTDIR
#
# Environment: PYTHON (default python3), MINUTES (training time of each run, default 6), BATCH (default
# 256), RUNS ("ARCH:WIDTH:LAYERS ...", default "mmdit:96:5 pixart:96:5 mmdit:128:6 pixart:128:6"),
# DEVICE (default cuda; DEVICE=cpu MINUTES=0.1 BATCH=8 RUNS=mmdit:32:1 is a smoke test), DATA (shapes,
# the default, or textures: DATA=textures RUNS=mmdit:128:6 trains the textures-mmdit test bed),
# OBJECT_WEIGHT (--object-weight; default unweighted).
set -euo pipefail

OUT="${1:?usage: benchmarks/gpu_train_shapes.sh OUTDIR}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
MINUTES="${MINUTES:-6}"
BATCH="${BATCH:-256}"
DEVICE="${DEVICE:-cuda}"
DATA="${DATA:-shapes}"
WEIGHTING=()
if [[ -n "${OBJECT_WEIGHT:-}" ]]; then WEIGHTING=(--object-weight "$OBJECT_WEIGHT"); fi
read -r -a SETTINGS <<<"${RUNS:-mmdit:96:5 pixart:96:5 mmdit:128:6 pixart:128:6}"
WORK="$(mktemp -d)"
mkdir -p "$OUT"

# shellcheck source=benchmarks/gpu_env.sh
source "$ROOT/benchmarks/gpu_env.sh"
gpu_env_setup
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
"$PYTHON" -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"

catprune_with_tools catprune.tools.train_shapes

names=()
for setting in "${SETTINGS[@]}"; do
    IFS=: read -r arch width layers <<<"$setting"
    name="$DATA-$arch-w$width-l$layers"
    names+=("$name")
    mkdir -p "$WORK/$name"
    "${CATPRUNE[@]}" train-shapes --data "$DATA" --arch "$arch" --width "$width" --layers "$layers" --batch-size "$BATCH" \
        --minutes "$MINUTES" --device "$DEVICE" --data-workers 2 --threads 2 --checkpoint-every 1000 \
        "${WEIGHTING[@]}" --out "$WORK/$name" >"$WORK/$name/train.log" 2>&1 &
done
wait
for name in "${names[@]}"; do
    tail -c 400 "$WORK/$name/train.log" | tr '\r' '\n' | tail -n 2
    tar -C "$WORK/$name" -cf "$OUT/$name.tar" train.log $(cd "$WORK/$name" && ls -d pipeline checkpoint/state.json 2>/dev/null)
done
