"""Compile the moments kernels for sm_90 without a GPU and report what the
compiler did: tensor-core instructions (wgmma), software-pipelined loads
(cp.async), shared memory, registers and spills (via the bundled ptxas).

    TRITON_DEFAULT_FP_FUSION=1 python benchmarks/aot_moments.py [case ...]

Cases: bf16-nchw bf16-nchw-oddN bf16-cl bf16-cl-bn64-s2 bf16-cl-tl.sum fp32-nchw fp32-cl mixed-nchw fp16-raw-nchw
bf16-nchw-bc64 reduce-w4 reduce-r16 reduce-w8 shift (default: all;
the launcher's defaults are bf16-nchw, fp32-nchw, bf16-cl, fp32-cl, reduce-w8). Arguments are given the
specialisations a real launch gets (unit strides as constants, 16-divisible
sizes/strides), W48-like: C divisible by 16, not by BLOCK_C.

Why: the interpreter runs each program as Python and does not type-check
if/else branches or check resource limits; this catches compile errors and
shared-memory overflows on a CPU-only machine. Timings still need a GPU.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from debias_ops import _backend  # noqa: E402

_backend.load_kernels()
from debias_ops.kernels import moments as m  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 227 * 1024


def _ptxas_info(ptx: str) -> str:
    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for name in ("ptxas-blackwell", "ptxas"):
        exe = bindir / name
        if not exe.exists():
            continue
        with tempfile.TemporaryDirectory() as d:
            src = Path(d) / "k.ptx"
            src.write_text(ptx)
            r = subprocess.run([str(exe), "-arch=sm_90a", "-v", str(src), "-o", str(Path(d) / "k.cubin")],
                               capture_output=True, text=True)
            out = r.stdout + r.stderr
            if "Unsupported .version" in out:
                continue
            regs = re.findall(r"Used (\d+) registers", out)
            spill = re.findall(r"(\d+) bytes spill stores", out)
            serial = "wgmma SERIALISED (C7515)" if "C7515" in out else "wgmma pipelined"
            return f"regs {regs[-1] if regs else '?'}, spill stores {spill[-1] if spill else '?'} B, {serial}"
    return "ptxas not usable"


def _compile(fn, sig_types, const, div, warps, stages=None):
    names = fn.arg_names
    sig = {}
    for n in names:
        sig[n] = "constexpr" if n in const else sig_types.get(n, "i32")
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div if n not in const}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    opts = dict(num_warps=warps)
    if stages is not None:
        opts["num_stages"] = stages
    return triton.compile(src, target=TARGET, options=opts)


def partial(dt_a, dt_l, g_mode, x_mode, layout, bc=128, bk=32, bn=64, warps=8, stages=3, corr=4, tail=False,
            sum_dot=None):
    ptr = {"a_ptr": "*" + dt_a, "l_ptr": "*" + dt_l}
    for n in ("gpart_ptr", "xpart_ptr", "sa_ptr", "sl_ptr", "shift_ptr"):
        ptr[n] = "*fp32"
    const = dict(BLOCK_C=bc, BLOCK_K=bk, BLOCK_N=bn, G_MODE=g_mode, X_MODE=x_mode, CORR=corr, PREC="tf32x3",
                 DOT_F32=False, A_MERGED=True, L_MERGED=True, SPLIT_FULL=(layout == "cl"),
                 HAS_TAIL=tail, SUM_DOT=(layout == "cl") if sum_dot is None else sum_dot)
    const.update({"a_sw": 1, "l_sw": 1} if layout == "nchw" else {"a_sc": 1, "l_sc": 1})
    div = list(ptr) + ["a_sb", "a_sc", "a_sh", "a_sw", "l_sb", "l_sc", "l_sh", "l_sw", "C"]
    if not tail:
        div += ["N", "Wd"]
    return _compile(m._moments_partial_kernel, ptr, const, div, warps, stages)


def report(name, k):
    ttgir = k.asm["ttgir"]
    smem = k.metadata.shared
    flag = "" if smem <= SMEM_LIMIT else "  ** OVER 227 KiB: launch fails **"
    print(f"{name:16s} wgmma {ttgir.count('warp_group_dot'):3d}  cp.async {ttgir.count('async_copy_global_to_local'):3d}  "
          f"smem {smem // 1024:4d} KiB  {_ptxas_info(k.asm['ptx'])}{flag}", flush=True)


CASES = {
    "bf16-nchw": lambda: partial("bf16", "bf16", 1, 1, "nchw"),
    "bf16-cl": lambda: partial("bf16", "bf16", 1, 1, "cl", bn=32, stages=3),
    "bf16-cl-bn64-s2": lambda: partial("bf16", "bf16", 1, 1, "cl", stages=2),
    "bf16-cl-tl.sum": lambda: partial("bf16", "bf16", 1, 1, "cl", bn=32, stages=3, sum_dot=False),
    "bf16-nchw-oddN": lambda: partial("bf16", "bf16", 1, 1, "nchw", tail=True),
    "fp32-nchw": lambda: partial("fp32", "fp32", 2, 2, "nchw", bn=32, stages=3),
    "fp32-cl": lambda: partial("fp32", "fp32", 2, 2, "cl", bn=32, stages=2),
    "mixed-nchw": lambda: partial("bf16", "fp32", 1, 2, "nchw"),
    "fp16-raw-nchw": lambda: partial("fp16", "fp16", 0, 0, "nchw"),
    "bf16-nchw-bc64": lambda: partial("bf16", "bf16", 1, 1, "nchw", bc=64, warps=4),
    "reduce-w4": lambda: _compile(m._moments_reduce_kernel, {n: "*fp32" for n in m._moments_reduce_kernel.arg_names
                                                          if n.endswith("_ptr")},
                               dict(BLOCK_C=128, BLOCK_K=32, ROWS=32, G_SHIFT=True, X_SHIFT=True), [], 4),
    "reduce-r16": lambda: _compile(m._moments_reduce_kernel, {n: "*fp32" for n in m._moments_reduce_kernel.arg_names
                                                              if n.endswith("_ptr")},
                                   dict(BLOCK_C=128, BLOCK_K=32, ROWS=16, G_SHIFT=True, X_SHIFT=True), [], 4),
    "reduce-w8": lambda: _compile(m._moments_reduce_kernel, {n: "*fp32" for n in m._moments_reduce_kernel.arg_names
                                                             if n.endswith("_ptr")},
                                  dict(BLOCK_C=128, BLOCK_K=32, ROWS=32, G_SHIFT=True, X_SHIFT=True), [], 8),
    "shift": lambda: _compile(m._shift_kernel, {"a_ptr": "*bf16", "l_ptr": "*bf16", "shift_ptr": "*fp32"},
                              dict(BLOCK_S=64, A_MERGED=True, L_MERGED=True), [], 4),
}

if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    for case in sys.argv[1:] or list(CASES):
        report(case, CASES[case]())
