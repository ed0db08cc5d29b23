#!/usr/bin/env bash
# Decode speed on one GPU: HAMburger (briefly trained on the demo data) against the base, batch 1
# and 8, a confidence sweep. Under 8 minutes. Prints a table with the card's name.
#   bash bench/gpu_decode.sh [EXPORT_DIR]   (default: train briefly with bench/gpu_train.sh's settings)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/hamburger-gpu-decode}
MODEL=${1:-}
nvidia-smi --query-gpu=name --format=csv,noheader
if [[ -z "$MODEL" ]]; then
  ./launch.sh train configs/train_demo.yaml --nprocs 1 output_dir="$OUT/run" \
    "data.prep_overrides=[output_root=$OUT/prep]" precision=bf16 max_steps=60 eval_every=0 save_every=0 \
    data.tokens_per_batch=16384 mlflow.enabled=false 2>&1 | tail -2
  .venv/bin/python -m trainer.export "$OUT/run" --out "$OUT/export" --overwrite | tail -1
  MODEL="$OUT/export"
fi
./launch.sh eval "$MODEL" output_dir="$OUT/eval" max_prompts=32 max_new_tokens=256 \
  "batch_sizes=[1,8]" "confidences=[0.5,0.6,0.7,0.8,0.9]" mlflow.enabled=false
