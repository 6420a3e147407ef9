#!/usr/bin/env bash
# Prints the python interpreter to use, setting it up first if needed.
#
#   scripts/env.sh            the main environment, .venv (the whole suite runs in it)
#   scripts/env.sh torch211   .venv-torch211: the oldest stack this package supports,
#                             a common GPU stack: torch 2.11.0 with the
#                             Triton 3.6.0 it pins, numpy 2.5, Python 3.12; no
#                             torchvision / smp (their tests skip). scripts/test.sh
#                             --fast runs a subset in it (docs/versions.md).
#
# * A machine that already has torch + triton + a CUDA GPU (a GPU machine:
#   no network) uses its own python3 and installs nothing; `env.sh torch211`
#   prints nothing there (that machine's own stack is the one tested).
# * Anywhere else a virtualenv is created (once) and filled: torch is pinned
#   first (a bare `torch` would pull a multi-GB CUDA build on a CPU machine),
#   then the rest, then this package itself (non-editable, so the tests also
#   prove the packaging).
# * torch 2.14.1 + torchvision 0.29.1: PyPI's torchvision does not import beside
#   the torch 2.13.0 CPU build (operator torchvision::nms does not exist); this
#   pair does (a CUDA build that runs on the CPU, Triton 3.8 with it). The tests
#   use the real torchvision and segmentation_models_pytorch, not mocks.
# * torch 2.11.0: PyPI's CUDA build (it imports and runs on the CPU) with its
#   nvidia-* libraries: ~4.7 GB in the venv, ~1.5 min to install here. numpy 2.5
#   needs Python >= 3.12: without a python3.12 the venv uses python3 and the
#   newest numpy that python takes (stderr says so).
set -euo pipefail
cd "$(dirname "$0")/.."
WHICH="${1:-main}"
case "$WHICH" in main|torch211) ;; *) echo "usage: $0 [torch211]" >&2; exit 2 ;; esac
TORCH_PIN="${DEBIAS_OPS_TORCH_PIN:-torch==2.14.1 torchvision==0.29.1}"
SYS_PY="${PYTHON:-python3}"

if "$SYS_PY" - >/dev/null 2>&1 <<'PY'
import torch, triton
assert torch.cuda.is_available()
PY
then
    [ "$WHICH" = main ] && echo "$SYS_PY"
    exit 0
fi

if [ "$WHICH" = torch211 ]; then
    VENV=.venv-torch211
    if [ ! -x "$VENV/bin/python" ] || [ ! -f "$VENV/.ready" ]; then
        {
            PY312=""
            for cand in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
                if [ -n "$cand" ] && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
                    PY312="$cand"; break
                fi
            done
            NUMPY="numpy==2.5.*"
            if [ -z "$PY312" ]; then
                echo "env.sh: no python3.12 here: $VENV uses $SYS_PY and the newest numpy it takes" >&2
                PY312="$SYS_PY"; NUMPY="numpy"
            fi
            rm -rf "$VENV"
            "$PY312" -m venv "$VENV"
            "$VENV/bin/python" -m pip install -q --upgrade pip
            # torch pins triton==3.6.0 itself; pytest-timeout: the tests' timeout marks
            "$VENV/bin/python" -m pip install -q torch==2.11.0 "$NUMPY" pytest pytest-timeout
            touch "$VENV/.ready"
        } 1>&2
    fi
    "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation . 1>&2
    echo "$VENV/bin/python"
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
# Triton 3.6 (what torch 2.11 pins) beside the venv's: scripts/test.sh also runs the sm_90
# compile checks (tests/test_aot_targets.py) under it, since launch configurations that
# compile clean under one Triton may spill under another (benchmarks/NOTES_aot.md)
if [ ! -f .triton36/.ready ]; then
    "$VENV/bin/python" -m pip install -q --no-deps --upgrade --target .triton36 triton==3.6.0 1>&2 \
        && touch .triton36/.ready
fi
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation . 1>&2
echo "$VENV/bin/python"
