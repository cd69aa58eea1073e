#!/usr/bin/env bash
# The main job on a fresh machine: set-up (idempotent) then `sparsedet demo`. The demo draws with
# PIL alone, so it needs no extra.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/sparsedet demo "$@"
