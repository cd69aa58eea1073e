#!/usr/bin/env bash
# Creates .venv with sparsedet and its test extras. torch is installed first at the pinned CPU
# version so that no requirement can pull a newer CUDA build (users on a GPU install their own
# torch >= 2.5 first; our requirement is only a lower bound).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q "torch==${SPARSEDET_TORCH:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[dev]"
