#!/usr/bin/env bash
# Runs one l2r experiment on a Cloud TPU VM (a single host or a multi-host pod slice): creates
# the TPU unless it exists, copies this working tree to every worker, installs it there, and
# starts the same `python -m experiments.run ...` on all workers at once. The processes meet
# through jax.distributed (L2R_DISTRIBUTED=auto: JAX reads the pod's topology from the TPU
# metadata server); process 0 writes the logs and results, all write the Orbax checkpoints.
#
#   launch/tpu_pod.sh --name=NAME --zone=ZONE [--type=v4-32] [--version=tpu-ubuntu2204-base]
#                     [--project=PROJECT] [--spot] [--no_install] [--delete] EXPERIMENT_ARGS...
#
#   --name=NAME      TPU VM name (created when missing, reused otherwise).
#   --zone=ZONE      its zone, e.g. us-central2-b.
#   --type=TYPE      accelerator type when creating, e.g. v4-8 (one host), v4-32 (four hosts).
#   --version=V      TPU software version when creating (v5e: v2-alpha-tpuv5-lite,
#                    v6e: v2-alpha-tpuv6e).
#   --project=P      Google Cloud project (default: gcloud's configured project).
#   --spot           create a Spot TPU.
#   --no_install     skip copying and installing (workers already hold ~/l2r at this version).
#   --delete         delete the TPU when the run ends (successfully or not).
#   EXPERIMENT_ARGS  passed unchanged to `python -m experiments.run` on every worker. Every worker
#                    must see the same --workdir: use a filesystem mounted on all of them (NFS /
#                    Filestore, gcsfuse); a worker-local path splits the checkpoints over hosts.
#
# Needs: gcloud (authenticated), git, tar. The tree is copied as `git ls-files` lists it (tracked
# and untracked-but-not-ignored files), so uncommitted edits travel too.
# Example:
#   launch/tpu_pod.sh --name=l2r-pod --zone=us-central2-b --type=v4-32 \
#     --config=experiments/configs/exp1.py:paper --workdir=/mnt/shared/exp1
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
name="" zone="" type="v4-8" version="tpu-ubuntu2204-base" project="" spot=0 install=1 delete=0
args=()
for arg in "$@"; do
  case "$arg" in
    --name=*) name="${arg#*=}" ;;
    --zone=*) zone="${arg#*=}" ;;
    --type=*) type="${arg#*=}" ;;
    --version=*) version="${arg#*=}" ;;
    --project=*) project="${arg#*=}" ;;
    --spot) spot=1 ;;
    --no_install) install=0 ;;
    --delete) delete=1 ;;
    *) args+=("$arg") ;;
  esac
done
if [ -z "$name" ] || [ -z "$zone" ]; then
  echo "launch/tpu_pod.sh: --name and --zone are required (see the top of this script)." >&2
  exit 2
fi
if [ "${#args[@]}" -eq 0 ]; then
  echo "launch/tpu_pod.sh: no experiment arguments (--config=... --workdir=...)." >&2
  exit 2
fi

tpu=(gcloud compute tpus tpu-vm)
where=("--zone=$zone")
[ -n "$project" ] && where+=("--project=$project")

if ! "${tpu[@]}" describe "$name" "${where[@]}" >/dev/null 2>&1; then
  create=("${tpu[@]}" create "$name" "${where[@]}" "--accelerator-type=$type" "--version=$version")
  [ "$spot" -eq 1 ] && create+=(--spot)
  echo "+ ${create[*]}"
  "${create[@]}"
fi
if [ "$delete" -eq 1 ]; then
  trap '"${tpu[@]}" delete "$name" "${where[@]}" --quiet' EXIT
fi

if [ "$install" -eq 1 ]; then
  archive="$(mktemp -t l2r-XXXXXX.tar.gz)"
  (cd "$root" && git ls-files -z --cached --others --exclude-standard |
    tar --null -czf "$archive" -T -)
  "${tpu[@]}" scp "$archive" "$name:l2r.tar.gz" "${where[@]}" --worker=all
  rm -f "$archive"
  # install.sh pins jax to constraints.txt; jax[tpu] then adds the matching libtpu.
  "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command \
    'set -e; mkdir -p ~/l2r && tar -xzf ~/l2r.tar.gz -C ~/l2r && cd ~/l2r &&
     bash scripts/install.sh && .venv/bin/python -m pip install -q -c constraints.txt "jax[tpu]"'
fi

# Quote every argument for the remote shell, so spaces and quotes arrive unchanged.
printf -v quoted ' %q' "${args[@]}"
"${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command \
  "cd ~/l2r && L2R_DISTRIBUTED=auto .venv/bin/python -m experiments.run$quoted"
