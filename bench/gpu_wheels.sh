#!/usr/bin/env bash
# Fill bench/wheels/ (git-ignored, carried to the GPU machine) with the packages the GPU check
# needs that the GPU image lacks: deepspeed and its pydantic + hjson, omegaconf. Versions are
# the ones installed in .venv here. deepspeed is sdist-only: built here as a pure-Python wheel
# (no ops compiled; it JIT-builds nothing for our torch.optim.AdamW). Everything else is a
# published wheel for CPython 3.12 on x86-64. Refuses to leave more than 60 MiB.
#   bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=bench/wheels
PY=.venv/bin/python
ver() { "$PY" -m pip show "$1" | sed -n 's/^Version: //p'; }
rm -rf "$DEST"
mkdir -p "$DEST"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "deepspeed==$(ver deepspeed)"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$DEST" \
  "pydantic==$(ver pydantic)" "pydantic-core==$(ver pydantic-core)" "annotated-types==$(ver annotated-types)" \
  "typing-inspection==$(ver typing-inspection)" "typing-extensions==$(ver typing-extensions)" \
  "hjson==$(ver hjson)" "omegaconf==$(ver omegaconf)"
ls -l "$DEST"
size=$(du -sb "$DEST" | cut -f1)
echo "bench/wheels: $((size / 1024)) KiB"
if (( size > 60 * 1024 * 1024 )); then
  echo "bench/wheels is over 60 MiB" >&2
  exit 1
fi
git check-ignore -q "$DEST" || { echo "$DEST must be git-ignored" >&2; exit 1; }
