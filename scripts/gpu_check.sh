#!/usr/bin/env bash
# One device call: GPU facts, the kernel test suite on CUDA, then a benchmark command ($@).
set -o pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python -m pytest ${TESTS:-tests/kernels} -q -p no:cacheprovider -rs 2>&1 | tail -40 | tee "$OUT/pytest.txt"
fi
for cmd in "$@"; do
  echo "== $cmd"; eval "$cmd" 2>&1 | tee -a "$OUT/bench.txt"
done
