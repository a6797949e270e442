#!/usr/bin/env bash
# Installs everything l2r needs on a fresh Debian machine into ./.venv (idempotent).
#   * Debian packages: python3-venv (if needed) and dataset-fashion-mnist (the offline data of
#     the `cpu` presets), through apt-get, with sudo when not root;
#   * l2r and its dependencies, pinned by constraints.txt to the versions the tests ran with.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
if command -v apt-get >/dev/null; then
  if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
  fi
  if ! python3 -c "import ensurepip, venv" 2>/dev/null; then
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq python3-venv >/dev/null
  fi
else
  echo "apt-get not found: install Fashion-MNIST IDX files yourself and set data.root." >&2
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
echo "l2r installed in $(pwd)/.venv"
