#!/usr/bin/env bash
# Runs the test suite with the given python.
#  1. the whole suite on the default backend (reference on CPU, kernels on a GPU);
#     it includes the offline compile checks of every target GPU
#     (tests/test_aot_targets.py, default subset: 3.6 min of CPU with a cold Triton
#     cache, 2.9 of them for the targets beside sm_90; benchmarks/NOTES_aot.md);
#  2. the kernel parity tests under the Triton interpreter (CPU tensors,
#     DEBIAS_OPS_BACKEND=triton, TRITON_INTERPRET=1), which is how a CPU-only
#     machine (CI) checks the Triton kernels.
#  3. where scripts/env.sh installed Triton 3.6 into .triton36 (what torch 2.11
#     pins; not on a GPU machine), the offline compile checks for sm_90,
#     sm_89 and sm_120 (tests/test_aot_targets.py, default subsets: the targets with
#     per-version choices) once more under it: step 1 ran them (every target) under
#     the environment's Triton, and configurations clean under one Triton can spill
#     under another (measured for sm_90 alone: ~45 s with a cold compile cache, ~17 s
#     warm, on 2 shared CPU cores; sm_89 and sm_120 add ~1 min of CPU cold).
#     DEBIAS_OPS_AOT_REQUIRE=1: a missing compiler piece fails instead of skipping.
#     (The interpreter parity under Triton 3.6 runs on the torch 2.11 stack, below,
#     with the numpy that ships beside it.)
#  0. (first) `ruff check .` with the repository's ruff.toml.
# pytest's exit code 5 ("no tests collected") is a failure here.
set -uo pipefail
cd "$(dirname "$0")/.."
# --fast PY: the subset run under a second stack (`scripts/env.sh torch211`, the oldest
# supported: torch 2.11 + Triton 3.6 + numpy 2.5, docs/versions.md): the default-backend
# tests that go through torch's APIs (ops, autograd, modules, torch.compile, custom ops,
# opcheck, DDP), the GPU check's CPU checks (it runs on that stack), then the interpreter
# parity of each fused op. No lint, no extra args.
if [ "${1:-}" = --fast ]; then
    PY="$2"
    "$PY" -m pytest -q -p no:cacheprovider tests/test_api.py tests/test_reference.py tests/test_validation.py \
        tests/test_modules.py tests/test_ddp.py tests/test_kernels_selection.py tests/test_kernels_loss.py \
        tests/test_kernels_moments.py tests/test_gpu_check.py || { echo "fast subset failed under $PY" >&2; exit 1; }
    TRITON_INTERPRET=1 DEBIAS_OPS_BACKEND=triton "$PY" -m pytest -q -p no:cacheprovider -m kernel \
        tests/test_kernels_selection.py tests/test_kernels_loss.py tests/test_kernels_moments.py \
        -k "test_class_drop_shapes_dtypes_layouts or test_suppress_gate_level or test_class_importance \
            or test_parity_ratios or test_moments_shapes_dtypes or test_moments_wrap_triton" \
        || { echo "interpreter parity subset failed under $PY" >&2; exit 1; }
    exit 0
fi
PY="$1"; shift || true
# 0. lint: ruff.toml's rules, the whole tree
"$PY" -m ruff check . || { echo "ruff check failed" >&2; exit 1; }
"$PY" -m pytest -q -p no:cacheprovider tests "$@"
rc=$?
if [ $rc -ne 0 ]; then
    [ $rc -eq 5 ] && echo "no tests collected: failing" >&2
    exit 1
fi
if "$PY" -c "import triton" >/dev/null 2>&1; then
    TRITON_INTERPRET=1 DEBIAS_OPS_BACKEND=triton "$PY" -m pytest -q -p no:cacheprovider -m kernel tests "$@"
    rc=$?
    if [ $rc -ne 0 ]; then
        [ $rc -eq 5 ] && echo "no kernel tests collected: failing" >&2
        exit 1
    fi
else
    echo "triton not installed: interpreter kernel tests not run" >&2
    exit 1
fi
if [ -d .triton36 ]; then
    PYTHONPATH=.triton36 DEBIAS_OPS_AOT_REQUIRE=1 "$PY" -m pytest -q -p no:cacheprovider tests/test_aot_targets.py \
        -k "sm_90 or sm_89 or sm_120"
    rc=$?
    if [ $rc -ne 0 ]; then
        [ $rc -eq 5 ] && echo "no compile tests collected under Triton 3.6: failing" >&2
        exit 1
    fi
fi
