#!/usr/bin/env bash
# The one GPU check (issue #20): at most 9 minutes on one GPU, one summary table.
#
#   scripts/gpu_check.sh --prepare    # here, before: wheels the GPU image lacks + the tiny model -> build/gpu_check
#   scripts/gpu_check.sh --dry-run    # what it would run, and what it carries
#   scripts/gpu_check.sh              # on the GPU machine (device tool: carry=["build/gpu_check"])
#
# Steps, limits and the table: scripts/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec "$PY" scripts/gpu_check.py "$@"
