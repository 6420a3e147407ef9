"""pytest-benchmark suite: one benchmark group per op, shape, dtype and mode;
inside it the fused path, the eager reference and torch.compile(reference).

Run (from the repository root, serially)::

    pytest benchmarks/ --benchmark-only                  # GPU: design §8 shapes, bf16 + fp32
    pytest benchmarks/ --benchmark-only --benchmark-json=out.json

On a machine without a GPU it runs the reference and torch.compile at the
small CPU shape (fp32); the fused rows need CUDA, or the Triton interpreter
(``TRITON_INTERPRET=1 DEBIAS_OPS_BACKEND=triton``, then at the tiny shape).
The inputs, implementations, correctness check and byte model are those of
the CLI (``benchmarks.cases``, ``benchmarks.byte_model``): every result is
checked against the reference before it is timed, and a wrong one fails the
test instead of being timed. Each timed call ends with
``torch.cuda.synchronize()``, so wall-clock rounds measure finished GPU work
(launch overhead included; the CLI's do_bench numbers, with the L2 cache
flushed, are the reference figures). Gradients are reset to None in each
round's setup, outside the timing.
"""
from __future__ import annotations

import os

import pytest
import torch

from benchmarks import byte_model, cases
from benchmarks.shapes import CPU_SHAPES, GPU_SHAPES, TINY_SHAPES, dtype_name

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

if CUDA:
    SHAPES = list(GPU_SHAPES.values())
    DTYPES = [torch.bfloat16, torch.float32]
elif INTERPRET:
    SHAPES, DTYPES = list(TINY_SHAPES.values()), [torch.float32]
else:
    SHAPES, DTYPES = list(CPU_SHAPES.values()), [torch.float32]

OPS = ["suppress", "class_drop", "loss", "head"]


def _skip_reason(impl: str):
    if impl == "fused" and not CUDA and not INTERPRET:
        return "fused kernels need CUDA or TRITON_INTERPRET=1 (see benchmarks/README.md)"
    if impl == "compile" and INTERPRET:
        return "torch.compile cannot trace interpreted Triton kernels"
    return None


_CASES = {}


def _case(op, shape, dtype, mode):
    key = (op, shape, dtype, mode)
    if key not in _CASES:
        _CASES.clear()  # one case alive at a time (W48 tensors are large)
        if CUDA:
            torch.cuda.empty_cache()
        try:
            case = cases.make_case(op, shape, dtype, mode, torch.device("cuda" if CUDA else "cpu"))
        except cases.Skip as why:
            case = why
        ref = None
        if isinstance(case, cases.Case):
            with case.context("eager"):
                ref = case.result("eager")
        _CASES[key] = (case, ref)
    return _CASES[key]


@pytest.mark.parametrize("impl", list(cases.IMPLS))
@pytest.mark.parametrize("mode", list(byte_model.MODES))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("op", OPS)
def test_bench(benchmark, op, shape, dtype, mode, impl):
    reason = _skip_reason(impl)
    if reason:
        pytest.skip(reason)
    case, ref = _case(op, shape, dtype, mode)
    if isinstance(case, cases.Skip):
        pytest.skip(str(case))
    benchmark.group = f"{op} {shape.name} {dtype_name(dtype)} {mode}"
    with case.context(impl):
        got = case.result(impl)
        if impl != "eager":
            chk = case.check(got, ref)
            if not chk["ok"]:
                pytest.fail(f"{impl} differs from the reference in {chk['worst']} "
                            f"({chk['max_err_over_tol']:.3g}× the tolerance {chk['tol']}): not timed")
        del got
        step = case.step(impl)
        sync = torch.cuda.synchronize if CUDA else (lambda: None)

        def timed():
            step()
            sync()

        def setup():
            for t in case.leaves:
                t.grad = None

        rounds = 20 if CUDA else 5
        benchmark.pedantic(timed, setup=setup, rounds=rounds, iterations=1, warmup_rounds=3 if CUDA else 1)
    tr = byte_model.traffic(op, shape, dtype, mode)
    median_ms = benchmark.stats.stats.median * 1e3
    benchmark.extra_info.update(
        op=op, shape=shape.name, dtype=dtype_name(dtype), mode=mode, impl=impl,
        bytes=tr.bytes, flops=tr.flops, gbps=tr.gbps(median_ms), tflops=tr.tflops(median_ms),
        device=torch.cuda.get_device_name() if CUDA else "cpu", torch=torch.__version__,
    )
