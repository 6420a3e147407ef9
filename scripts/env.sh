#!/usr/bin/env bash
# Prints the python interpreter to use, setting it up first if needed.
#
# * A machine that already has torch + triton + a CUDA GPU (the GPU machine:
#   no network) uses its own python3 and installs nothing.
# * Anywhere else a virtualenv .venv is created (once) and filled: torch is
#   pinned first (a bare `torch` would pull a multi-GB CUDA build on a CPU
#   machine), then the rest, then this package itself (non-editable, so the
#   tests also prove the packaging).
# * torch 2.14.1 + torchvision 0.29.1: PyPI's torchvision does not import beside
#   the torch 2.13.0 CPU build (operator torchvision::nms does not exist); this
#   pair does (a CUDA build that runs on the CPU, Triton 3.8 with it). The tests
#   use the real torchvision and segmentation_models_pytorch, not mocks.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_PIN="${DEBIAS_OPS_TORCH_PIN:-torch==2.14.1 torchvision==0.29.1}"
SYS_PY="${PYTHON:-python3}"

if "$SYS_PY" - >/dev/null 2>&1 <<'PY'
import torch, triton
assert torch.cuda.is_available()
PY
then
    echo "$SYS_PY"
    exit 0
fi

VENV=.venv
if [ ! -x "$VENV/bin/python" ] || [ ! -f "$VENV/.ready" ]; then
    {
        "$SYS_PY" -m venv "$VENV"
        "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
        "$VENV/bin/python" -m pip install -q $TORCH_PIN
        "$VENV/bin/python" -m pip install -q triton numpy pytest pytest-benchmark pytest-timeout hypothesis tqdm matplotlib \
            ruff segmentation-models-pytorch torchmetrics cityscapesscripts scipy
        touch "$VENV/.ready"
    } 1>&2
fi
# Triton 3.6 (the GPU machine's) beside the venv's: scripts/test.sh also runs the sm_90
# compile checks (tests/test_aot_sm90.py) under it, since launch configurations that
# compile clean under one Triton may spill under another (benchmarks/NOTES_aot.md)
if [ ! -f .triton36/.ready ]; then
    "$VENV/bin/python" -m pip install -q --no-deps --upgrade --target .triton36 triton==3.6.0 1>&2 \
        && touch .triton36/.ready
fi
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation . 1>&2
echo "$VENV/bin/python"
