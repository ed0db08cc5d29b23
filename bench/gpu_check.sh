#!/usr/bin/env bash
# The GPU check, one call (< 8 minutes on one H100/H200): decode, labelling and training
# numbers of HAMburger against its base, written to $OUT as gpu_check.json + gpu_check.md.
# Runs on the bare GPU machine (system python3, no venv, no network; docs/gpu_check.md):
# missing packages come from bench/wheels/ (filled here by bench/gpu_wheels.sh, git-ignored,
# carried with the tree) and go to a scratch --target folder. Where they are importable
# already (this repo's .venv: PYTHON=.venv/bin/python), nothing is installed.
#   OUT=/some/dir bash bench/gpu_check.sh [--tiny] [--sections checks,decode,label,train]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/hamburger-gpu-check/out}
SITE=${GPU_CHECK_SITE:-/tmp/hamburger-gpu-check/site}
if ! "$PY" -c "import deepspeed, omegaconf" 2>/dev/null; then
  shopt -s nullglob
  wheels=(bench/wheels/*.whl)
  if (( ${#wheels[@]} == 0 )); then
    echo "deepspeed/omegaconf missing and bench/wheels/ is empty: run bash bench/gpu_wheels.sh first" >&2
    exit 1
  fi
  "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "${wheels[@]}"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
export DS_BUILD_OPS=0 TOKENIZERS_PARALLELISM=false
exec "$PY" bench/gpu_check.py --out "$OUT" "$@"
