#!/usr/bin/env bash
# The frontier of docs/results-frontier.md: both shipped shapes models, 32 held-out prompts, 28 steps.
# Each call adds pruned settings to the same folder (finished images are reused), so the whole script
# resumes after an interruption. One CPU thread per run: these models' kernels do not share well.
set -euo pipefail
OUT=${OUT:-runs/frontier}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
for MODEL in shapes-mmdit shapes-pixart; do
  run() { catprune frontier --model "$MODEL" --prompts shapes --num-prompts 32 --out "$OUT/$MODEL" --no-progress "$@"; }
  # The paper's setting and its neighbours, plain and with each reuse option.
  run --steps 28 --grid keep_ratio=0.3,0.5 --grid start_step=8 --grid kv_extrapolation=none,linear --grid 'refresh_steps=[],-1'
  run --steps 28 --grid keep_ratio=0.3 --grid start_step=8 --grid output_extrapolation=linear
  # CAT on top of fewer steps: the trial (20 steps, keep 0.5 from step 5, K/V extrapolation, full last step).
  run --steps 20,15 --grid keep_ratio=0.5 --grid start_step=5 --grid kv_extrapolation=none,linear --grid 'refresh_steps=[],-1'
done
