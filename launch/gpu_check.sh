#!/usr/bin/env bash
# The accelerator rows of docs/benchmarks.md, in one run (issue 15): the paper-scale Exp 1
# meta-training rate (ResNet-32-GN, 4 episodes, T-BPTT 5, 7, 9, meta-update every inner step),
# episodes vmapped vs mapped, the projected time of 900 episodes, and the ResNet-32-GN SGD step
# against PyTorch eager on the same GPU. Run from the repository root on a machine whose python3
# has JAX with CUDA and PyTorch; l2r's other dependencies install from ./wheels when there is no
# network (`pip download -d wheels ml_collections` beforehand).
#   launch/gpu_check.sh [--repeats=3] [other experiments.bench flags]
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if ! "$python" -c "import ml_collections" 2>/dev/null; then
  "$python" -m pip install -q --no-index --find-links=wheels ml_collections
fi
"$python" -c "import jax; assert jax.default_backend() == 'gpu', jax.devices(); print(jax.devices())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
PYTHONPATH=. exec "$python" -m experiments.bench --only=paper,torch "$@"
