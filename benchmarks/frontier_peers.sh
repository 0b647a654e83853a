#!/usr/bin/env bash
# docs/results-frontier.md: every method a user could pick instead of CAT, on the three shipped models, at
# equal MACs against the same 28-step reference: fewer steps with Euler, UniPC, DPM-Solver++(2M) and Heun,
# CAT as in the paper, the extrapolated() preset on Euler, UniPC and DPM-Solver++, the multistep() preset
# (order-2 forecasts, step skipping) on Euler and DPM-Solver++, and diffusers' caches (FirstBlockCache, TaylorSeer
# three ways, MagCache calibrated per model, FasterCache, PAB).
# Resumable: each call adds settings to the same folder and finished images are reused; N=32 after N=8
# generates only the new prompts. One CPU thread per run: these models' kernels do not share well.
set -euo pipefail
OUT=${OUT:-runs/frontier-peers}
N=${N:-32}
CURVE=${CURVE:-6,8,10,14,20}
MODELS=${MODELS:-"textures-mmdit shapes-mmdit shapes-pixart"}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
for MODEL in $MODELS; do
  PROMPTS=shapes; [ "$MODEL" = textures-mmdit ] && PROMPTS=textures
  run() {
    catprune frontier --model "$MODEL" --prompts "$PROMPTS" --num-prompts "$N" --out "$OUT/$MODEL" \
      --curve-steps "$CURVE" --no-progress "$@"
  }
  # Fewer steps with every solver (Heun: the counts of at most 28 calls), and the paper's CAT setting.
  run --solvers euler,unipc,dpm++2m,heun --steps 28 --grid keep_ratio=0.3 --grid start_step=8
  # The extrapolated() preset (keep 0.5 from step 5, K/V extrapolation, last step full) on each solver.
  run --cat-solvers euler,unipc,dpm++2m --steps 20,14 --grid keep_ratio=0.5 --grid start_step=5 \
    --grid kv_extrapolation=linear --grid 'refresh_steps=-1'
  # Beyond the paper: the multistep() preset (rows in turn, keep 0.7 from step 4, K/V extrapolation, last
  # step full) and CAT's selection in its place, on DPM-Solver++ at 12-16 steps; order-2 forecasts at 16.
  run --cat-solvers dpm++2m --steps 12,14,16 --grid keep_ratio=0.7 --grid start_step=4 --grid strategy=cat,rows \
    --grid kv_extrapolation=linear --grid 'refresh_steps=-1'
  run --cat-solvers dpm++2m --steps 16 --grid keep_ratio=0.7 --grid start_step=4 --grid strategy=rows \
    --grid kv_extrapolation=quadratic --grid output_extrapolation=none,quadratic --grid 'refresh_steps=-1'
  # CAT composed with step skipping: the multistep() preset skipping every 3rd or 4th pruned step (no
  # image token recomputed there; outputs forecast linearly per token), and without the skips.
  run --cat-solvers dpm++2m --steps 16,20 --grid keep_ratio=0.7 --grid start_step=4 --grid strategy=rows \
    --grid kv_extrapolation=linear --grid output_extrapolation=linear --grid 'refresh_steps=-1' --grid skip_every=3,4
  # diffusers' caches at 28 steps, each over its knob.
  run --peers fbc,taylorseer,taylorseer-blocks,taylorseer-lite,magcache,fastercache,pab
done
