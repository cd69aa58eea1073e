#!/usr/bin/env bash
# The one-call GPU check (issue 31): `pytest -m gpu` on CUDA, the deformable-attention backends, a
# training step, every R50 preset's predict latency and Deformable DETR against transformers', all
# into one JSON (what each section measures: benchmarks/gpu_check.py).
#
#   bash benchmarks/gpu_check.sh [OUT.json] [--smoke] [--skip SECTION ...]
#
# OUT defaults to ./gpu_check.json. Needs a machine with torch (2.11 or later, with CUDA), triton,
# transformers and pytest; no network: the package runs from src/ (PYTHON picks the interpreter,
# default python3) and every model has random weights. At most 8 minutes on one H100: each section
# has its own limit, and this script stops the whole at 470 s, keeping the sections written so far.
# --smoke runs every section on the CPU at toy sizes (tests/test_gpu_check.py).
set -uo pipefail
out="gpu_check.json"
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
    out="$1"
    shift
fi
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
cd "$root"
timeout --kill-after=10 470 "$python" benchmarks/gpu_check.py "$out" "$@"
status=$?
if [ "$status" -ne 0 ]; then
    # Killed or crashed: say so in the JSON (whatever sections it finished are already there).
    "$python" - "$out" "$status" <<'EOF'
import json, sys
from pathlib import Path
path, status = Path(sys.argv[1]), int(sys.argv[2])
report = json.loads(path.read_text()) if path.is_file() else {"sections": {}}
report["aborted"] = ("stopped at the 470 s limit" if status in (124, 137) else f"exited with status {status}") + \
    ": the sections listed finished; the others did not run"
path.write_text(json.dumps(report, indent=1))
print(f"[gpu_check] {report['aborted']}; wrote {path}")
EOF
fi
exit "$status"
