#!/usr/bin/env bash
# Training throughput on one GPU: bf16, ZeRO-3 on one rank, SmolLM2-135M, packed batches with
# sdpa attention (block-diagonal mask). Under 6 minutes. Prints tokens/s, peak memory, the card.
#   bash bench/gpu_train.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/hamburger-gpu-train}
rm -rf "$OUT/run"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
./launch.sh train configs/train_demo.yaml --nprocs 1 output_dir="$OUT/run" \
  "data.prep_overrides=[output_root=$OUT/prep]" precision=bf16 max_steps=40 eval_every=0 save_every=0 \
  data.tokens_per_batch=16384 data.row_capacity=2048 mlflow.enabled=false 2>&1 | tail -5
.venv/bin/python - "$OUT/run/metrics.jsonl" <<'PY'
import json, statistics, sys, torch
rows = [json.loads(l)["metrics"] for l in open(sys.argv[1]) if "loss" in json.loads(l)["metrics"]]
steady = rows[5:] or rows
print(f"card: {torch.cuda.get_device_name(0)}")
print(f"tokens/s (median, steps 6+): {statistics.median(r['tokens_per_s'] for r in steady):.0f}")
print(f"peak memory: {max(r.get('peak_mem_gib', 0) for r in rows):.2f} GiB")
print(f"final loss: {rows[-1]['loss']:.3f}, expected tokens/step: {rows[-1]['expected_tokens_per_step']:.3f}")
PY
