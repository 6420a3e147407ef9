#!/usr/bin/env bash
# One device call per step of a GPU session (each stays inside the 10-minute
# limit of a call; results land under $OUT, or ./gpu_out without it):
#
#   bash scripts/gpu_session.sh tests   # GPU parity suite: kernels on CUDA + GPU-only tests (compile,
#                                       # CUDA graphs, opcheck, > 2^31 elements, peak memory), ~5 min
#   bash scripts/gpu_session.sh bench   # the benchmark CLI (make bench), JSON + plots + table
#   bash scripts/gpu_session.sh sweep   # the synthetic debiasing sweep (examples/), GPU
#
# Uses the machine's python3 as it is (torch, triton, pytest preinstalled; no network).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
PY=python3
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/device.txt"
case "${1:-tests}" in
  tests)
    $PY -m pytest -q -p no:cacheprovider tests -m "kernel or gpu" -x --durations=15 \
        --junitxml="$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.log" | tail -60
    ;;
  bench)
    $PY -m benchmarks --out "$OUT/bench" --no-progress 2>&1 | tee "$OUT/bench.log" | tail -120
    ;;
  sweep)
    $PY -m examples.synthetic_bias --sweep --out "$OUT/sweep" --no-progress 2>&1 | tee "$OUT/sweep.log" | tail -60
    ;;
  *)
    echo "usage: $0 tests|bench|sweep" >&2; exit 2 ;;
esac
