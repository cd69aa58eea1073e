#!/usr/bin/env bash
# Creates .venv (idempotently) with sparsedet and the extras named in $1 ("dev", "viz,video"...; none:
# the package alone). torch is installed first at the pinned version so that no requirement can pull
# another build (users on a GPU install their own torch >= 2.5 first; our requirement is only a lower
# bound). Without an NVIDIA GPU it comes from PyTorch's CPU wheel index, which holds no CUDA packages,
# when that index answers; else from the default index. --no-compile: pip would byte-compile every
# file of every package (torch alone: ~25 s on 2 cores); Python compiles the modules a program
# imports instead, once, on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CPU_INDEX=https://download.pytorch.org/whl/cpu
[ -x .venv/bin/python ] || "$PY" -m venv .venv
TORCH=(.venv/bin/python -m pip install -q --no-compile "torch==${SPARSEDET_TORCH:-2.13.0}")
# One probe with a hard 3 s limit, no retries: an unreachable index must not add pip's own timeouts
# and retries to the install.
if ! command -v nvidia-smi >/dev/null && .venv/bin/python - "$CPU_INDEX/torch/" <<'PROBE'; then
import sys
import threading
import urllib.request

answered = []


def probe() -> None:
    try:
        urllib.request.urlopen(sys.argv[1], timeout=3).close()
        answered.append(True)
    except Exception:  # unreachable, refused, an HTTP error: all mean "use the default index"
        pass


thread = threading.Thread(target=probe, daemon=True)  # urlopen's timeout does not bound a DNS lookup
thread.start()
thread.join(3)
sys.exit(0 if answered else 1)
PROBE
    TORCH+=(--extra-index-url "$CPU_INDEX")
fi
"${TORCH[@]}"
.venv/bin/python -m pip install -q --no-compile -e ".${1:+[$1]}"
