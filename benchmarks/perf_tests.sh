#!/usr/bin/env bash
# The tests that assert timing or memory bands (marked `perf`): they hold only on a quiet machine,
# so the default suite leaves them out. Run with nothing else on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest -p no:xdist -m perf "$@"
