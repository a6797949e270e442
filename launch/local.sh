#!/usr/bin/env bash
# Runs one l2r experiment on this machine: one process on all local GPUs/TPUs, or on N simulated
# CPU devices, or P processes joined through jax.distributed (to test multi-process code).
#
#   launch/local.sh [--cpu_devices=N] [--processes=P] [--port=PORT] EXPERIMENT_ARGS...
#
#   --cpu_devices=N  run on N simulated CPU devices (per process) instead of the accelerators.
#   --processes=P    start P processes here (default 1), each told its rank through
#                    L2R_COORDINATOR/L2R_NUM_PROCESSES/L2R_PROCESS_ID (see l2r/distributed.py);
#                    process 0 writes the logs and results, the others log warnings only.
#   --port=PORT      coordinator port for --processes (default: a random free-looking port).
#   EXPERIMENT_ARGS  passed unchanged to `python -m experiments.run` (--config=..., --workdir=...).
#
# Environment: PYTHON (default: the repository's .venv/bin/python, else python3).
# Example:
#   launch/local.sh --cpu_devices=4 --config=experiments/configs/fig1.py:smoke --workdir=/tmp/s
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$root/.venv/bin/python" ]; then python="$root/.venv/bin/python"; else python=python3; fi
fi

cpu_devices=0
processes=1
port=$((20000 + RANDOM % 20000))
args=()
for arg in "$@"; do
  case "$arg" in
    --cpu_devices=*) cpu_devices="${arg#*=}" ;;
    --processes=*) processes="${arg#*=}" ;;
    --port=*) port="${arg#*=}" ;;
    *) args+=("$arg") ;;
  esac
done
for value in "$cpu_devices" "$processes" "$port"; do
  if ! [[ "$value" =~ ^[0-9]+$ ]]; then
    echo "launch/local.sh: '$value' is not a number (--cpu_devices, --processes, --port)." >&2
    exit 2
  fi
done
if [ "$processes" -lt 1 ]; then
  echo "launch/local.sh: --processes must be at least 1." >&2
  exit 2
fi
if [ "$cpu_devices" -gt 0 ]; then
  args=("--num_cpu_devices=$cpu_devices" "${args[@]}")
fi
# `experiments` is importable from the repository root whatever the caller's directory is, so
# relative --config/--workdir paths keep meaning what they mean to the caller.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

if [ "$processes" -eq 1 ]; then
  exec "$python" -m experiments.run "${args[@]}"
fi

pids=()
# shellcheck disable=SC2317  # Reached through the trap.
cleanup() {
  for pid in "${pids[@]}"; do kill -- "-$pid" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM
set -m  # Each rank in its own process group, so cleanup also stops what a rank started.
for ((rank = 0; rank < processes; rank++)); do
  L2R_COORDINATOR="localhost:$port" L2R_NUM_PROCESSES="$processes" L2R_PROCESS_ID="$rank" \
    "$python" -m experiments.run "${args[@]}" &
  pids+=("$!")
done
status=0
# The first process to fail ends the run: the others would wait for it in collectives.
for ((n = 0; n < processes; n++)); do
  wait -n || { status=$?; break; }
done
exit "$status"
