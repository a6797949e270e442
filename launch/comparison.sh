#!/usr/bin/env bash
# The comparison of docs/results.md: every method of every experiment at hyper-parameters
# selected on validation data (`l2r-validate`), then tested, one experiment after another.
#
#   launch/comparison.sh [--root=DIR] [--only=EXP:PRESET,...] [-- EXTRA_FLAGS...]
#
#   --root=DIR   where each experiment's workdir lives: DIR/<exp>_<preset> (default:
#                workdirs/comparison). Each finished selection, Task-B run and test run is
#                cached there, so rerunning the script resumes where it stopped.
#   --only=...   the experiments to run (default: all of them, in the order below).
#   EXTRA_FLAGS  passed to every `l2r-validate` (e.g. --config.num_seeds=3).
#
# The `cpu` presets run every method over l2r-validate's default grids; the `cifar_offline` ones
# (Tiny-ImageNet pools, ResNet-14, 3 seeds) run SGD, SGD×0.1, LwF, EWC, HAT, the teacher and the
# learned rule over smaller grids (3 values each, HAT 2×2, SGD scales 1, 0.3, 0.1), 13 settings
# instead of 26: on 2 CPU cores, fig1:cifar_offline's Task B took 32 minutes for 3 methods × 3
# seeds (docs/results.md), and each Exps-1/2 setting runs its method on every meta-test task.
# Each experiment logs to DIR/<exp>_<preset>.log. Environment: PYTHON (default: .venv/bin/python,
# else python3).
set -euo pipefail

root_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$root_dir/.venv/bin/python" ]; then python="$root_dir/.venv/bin/python"; else python=python3; fi
fi

all_methods="sgd,sgd_x0.1,teacher,lwf,ewc,hat,oml,rep,learned"
offline_methods="sgd,sgd_x0.1,teacher,lwf,ewc,hat,learned"
offline_grids=("--grid=task_b.lwf.coef=0.3,1,3" "--grid=task_b.ewc.coef=1,10,100"
               "--grid=task_b.hat.s_max=3,10" "--grid=task_b.hat.reg=0.25,0.75"
               "--sgd_scales=1,0.3,0.1")
experiments="exp2:cpu,exp3:cpu,exp4:cpu,exp5:cpu,exp1:cpu,exp1:cifar_offline,exp2:cifar_offline"
out="workdirs/comparison"
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --root=*) out="${1#*=}" ;;
    --only=*) experiments="${1#*=}" ;;
    --) shift; extra=("$@"); break ;;
    *) echo "launch/comparison.sh: unknown argument '$1' (--root=DIR, --only=EXP:PRESET,..., -- FLAGS)." >&2
       exit 2 ;;
  esac
  shift
done

out="$(mkdir -p "$out" && cd "$out" && pwd)"
IFS=',' read -ra runs <<< "$experiments"
for run in "${runs[@]}"; do
  grids=()
  case "$run" in
    *:cpu) methods="$all_methods" ;;
    *:cifar_offline) methods="$offline_methods"; grids=("${offline_grids[@]}") ;;
    *) echo "launch/comparison.sh: '$run' is not <exp>:cpu or <exp>:cifar_offline." >&2; exit 2 ;;
  esac
  name="${run/:/_}"
  echo "$(date -u +%FT%TZ) $run -> $out/$name (log: $out/$name.log)"
  (cd "$root_dir" && "$python" -m experiments.validate --config="$run" \
      --workdir="$out/$name" --methods="$methods" "${grids[@]}" "${extra[@]}") \
      >> "$out/$name.log" 2>&1 \
    || { echo "$run failed: see $out/$name.log" >&2; exit 1; }
done
