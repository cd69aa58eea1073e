#!/usr/bin/env bash
# The test command: set-up (idempotent, with the test extras) then the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
# Two workers (SPARSEDET_TEST_WORKERS), one thread each (tests/conftest.py): half the suite is
# single-threaded Python (ONNX export, symbolic tracing), so two processes keep both cores busy.
# Byte-code is written on first import (set-up installs without compiling): with
# PYTHONDONTWRITEBYTECODE set, every test process would compile torch's modules again.
env -u PYTHONDONTWRITEBYTECODE .venv/bin/python -m pytest -n "${SPARSEDET_TEST_WORKERS:-2}" --dist worksteal "$@"
