"""Helpers shared by the kernels: the device a launch plans for, small integer
helpers, the output cast."""
from __future__ import annotations

import contextlib
import functools
import re
from dataclasses import dataclass

import triton
import triton.language as tl

from ._env import interpreting

__all__ = ["Target", "INTERPRETER", "target", "assume_target", "mma_kind", "fp32_dot_precision", "next_pow2",
           "interpreting", "triton_minor", "sm90_config", "mma_config", "INTERPRETED", "loop_bound", "to_output", "emulate_rtne_bf16"]


def next_pow2(x: int) -> int:
    """Smallest power of two >= x (1 for x <= 1)."""
    return 1 << max(0, (int(x) - 1).bit_length())


# ----------------------------------------------------------------------------- the device

@dataclass(frozen=True)
class Target:
    """What the launch plans read of the device a kernel runs on.

    backend: "cuda", "hip" (ROCm) or "interpreter"; arch: the compute capability
    as an int (90 for sm_90) or the gfx name ("gfx942"); sms: streaming
    multiprocessors (compute units on AMD); smem: the shared memory (LDS) one
    program may use, in bytes (CUDA's opt-in maximum per block); warp_size:
    threads per warp (wavefront).
    """
    backend: str
    arch: object
    sms: int
    smem: int
    warp_size: int = 32

    @property
    def name(self) -> str:
        """"sm_90", "gfx942", "interpreter"."""
        if self.backend == "cuda":
            return f"sm_{self.arch}"
        return str(self.arch) if self.backend == "hip" else self.backend


INTERPRETER = Target("interpreter", 0, 1, 1 << 30)

_ASSUMED: list = []  # innermost assume_target() last


@contextlib.contextmanager
def assume_target(t: Target):
    """Plan every CUDA launch inside the block for ``t`` instead of the real device:
    how offline compiles (benchmarks/aot.py) see what the launchers pick on a GPU
    that is not there."""
    _ASSUMED.append(t)
    try:
        yield t
    finally:
        _ASSUMED.pop()


def target(device) -> Target:
    """The Target of a tensor's device: INTERPRETER for a non-CUDA device or under
    TRITON_INTERPRET=1, else the GPU's properties (or the assumed one)."""
    if interpreting() or device.type != "cuda":
        return INTERPRETER
    if _ASSUMED:
        return _ASSUMED[-1]
    import torch
    return _device_target(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _device_target(index: int) -> Target:
    import torch
    p = torch.cuda.get_device_properties(index)
    smem = int(getattr(p, "shared_memory_per_block_optin", 0) or p.shared_memory_per_block)
    warp = int(getattr(p, "warp_size", 32) or 32)
    if getattr(torch.version, "hip", None):
        return Target("hip", str(p.gcnArchName).split(":")[0], p.multi_processor_count, smem, warp)
    return Target("cuda", 10 * p.major + p.minor, p.multi_processor_count, smem, warp)


def mma_kind(t: Target) -> str:
    """The matrix instructions Triton generates for ``tl.dot`` on ``t`` (what the
    plans' tile choices depend on): "wgmma" (sm_90), "tcgen05" (sm_100 / sm_103 /
    sm_110: accumulators in tensor memory), "mma" (mma.sync, accumulators and
    operands in registers: sm_80 – sm_89, sm_120), "mfma" (AMD CDNA),
    "interpreter"."""
    if t.backend == "cuda":
        major = int(t.arch) // 10
        return "wgmma" if major == 9 else ("tcgen05" if 10 <= major < 12 else "mma")
    return "mfma" if t.backend == "hip" else "interpreter"


@functools.lru_cache(maxsize=None)
def fp32_dot_precision(t: Target) -> str:
    """``input_precision`` of a float32 ``tl.dot`` that keeps ~fp32 accuracy on ``t``:
    "tf32x3" (3 TF32 tensor-core products) where the NVIDIA backend accepts it
    (Triton 3.6–3.9 do; also the interpreter's answer), else "ieee" (AMD: no tf32x3;
    gfx942's fp32 MFMA runs "ieee" on the matrix cores)."""
    if t.backend == "hip":
        return "ieee"
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        allowed = tuple(x.lower() for x in CUDAOptions.allowed_dot_input_precisions)
    except Exception:  # pragma: no cover - a Triton without the NVIDIA backend
        allowed = ("ieee",)
    return "tf32x3" if "tf32x3" in allowed else "ieee"


@functools.lru_cache(maxsize=None)
def triton_minor() -> tuple[int, int]:
    """(major, minor) of the installed Triton (``triton.__version__``; (0, 0) if unparsable)."""
    m = re.match(r"(\d+)\.(\d+)", getattr(triton, "__version__", ""))
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


# The one place where launch configurations depend on the Triton version: what each
# Triton's code generator + its bundled ptxas do with a configuration is not
# detectable at run time without a compile, so these are the measured facts of the
# offline compiles (``python -m benchmarks.aot``, tests/test_aot_targets.py; numbers
# in benchmarks/NOTES_aot.md, "Triton versions" and "Targets").
# sm_90 (wgmma; also read on sm_100):
#   moments_cl16_block_c: largest BLOCK_C of the channels_last 16-bit (bf16 / fp16 /
#       mixed) moments partial kernel. BLOCK_C 128 at 8 warps spills at 255 registers
#       on 3.6 (592 B) and 3.8 (600 B), is clean on 3.7 (169 regs) and 3.9 (166);
#       BLOCK_C 64 at 4 warps is clean on all four.
#   moments_nchw16_bc64_block_n: BLOCK_N of the NCHW 16-bit moments partial kernel at
#       BLOCK_C 64 (4 warps, e.g. W18s). BLOCK_N 64 makes ptxas serialise the wgmma
#       pipeline (C7515) on 3.6 and 3.7, BLOCK_N 32 does on 3.8 and 3.9.
# A version outside the table uses the nearest one measured.
_SM90_CONFIG = {
    (3, 6): dict(moments_cl16_block_c=64, moments_nchw16_bc64_block_n=32),
    (3, 7): dict(moments_cl16_block_c=128, moments_nchw16_bc64_block_n=32),
    (3, 8): dict(moments_cl16_block_c=64, moments_nchw16_bc64_block_n=64),
    (3, 9): dict(moments_cl16_block_c=128, moments_nchw16_bc64_block_n=64),
}
# mma.sync targets (sm_80, sm_89, sm_120; measured on 3.6 and 3.8):
#   moments_fp32_cl_num_warps: warps of the fp32 channels_last moments partial kernel
#       (BLOCK_C 64, BLOCK_N 32, 2 stages). ptxas holds it at ~128 registers: 4 warps
#       spill 4-8 B on 3.6 (sm_89), 8 warps spill 16 B on 3.8 (sm_120, W18s); the
#       other is clean on all three targets.
#   moments_reduce_rows_bc64: ROWS of the moments reduce kernel (8 warps) at BLOCK_C 64.
#       ptxas gives it 64-80 registers there: ROWS 16 spills 16 B on 3.6 (sm_120, W48),
#       ROWS 8 spills 4 B on 3.8 (sm_120, W18s); the other is clean on all three.
_MMA_CONFIG = {
    (3, 6): dict(moments_fp32_cl_num_warps=8, moments_reduce_rows_bc64=8),
    (3, 8): dict(moments_fp32_cl_num_warps=4, moments_reduce_rows_bc64=16),
}


def _nearest(table: dict, key: str, version: tuple[int, int] | None):
    v = triton_minor() if version is None else version
    known = sorted(table)
    near = known[0] if v <= known[0] else max(k for k in known if k <= v)
    return table[near][key]


def sm90_config(key: str, version: tuple[int, int] | None = None):
    """The version-dependent launch choice ``key`` of ``_SM90_CONFIG`` for this Triton
    (or ``version``), from the nearest measured version."""
    return _nearest(_SM90_CONFIG, key, version)


def mma_config(key: str, version: tuple[int, int] | None = None):
    """The same for ``_MMA_CONFIG`` (mma.sync targets)."""
    return _nearest(_MMA_CONFIG, key, version)


# Under TRITON_INTERPRET=1 (the interpreter runs the kernels as Python), a constant
# of the kernels' source: branches on it are removed when compiling for a GPU.
INTERPRETED = tl.constexpr(interpreting())


@triton.jit
def loop_bound(x):
    """``x`` as a ``range`` bound. Compiled for a GPU this is ``x`` itself: INTERPRETED
    is a constexpr False there, so the code generator drops the branch below and
    never sees ``.item()``. Under the interpreter it is a Python int: Triton 3.6's
    interpreter holds a scalar as a 1-element numpy array and its ``range``
    converts that with ``int()``, which numpy >= 2.4 refuses for arrays of rank > 0;
    ``item()`` takes any size-1 array. That array is host memory (the interpreter
    runs on the CPU), so ``item()`` is no device sync."""
    if INTERPRETED:
        return x.handle.data.item()
    else:
        return x


@triton.jit
def to_output(x, dtype: tl.constexpr, EMULATE_RTNE_BF16: tl.constexpr):
    """Cast float32 ``x`` to the output ``dtype``, rounding to nearest even.

    On a GPU ``x.to(tl.bfloat16)`` rounds to nearest even, like PyTorch's cast.
    Triton's interpreter (seen in 3.9) truncates instead: twice the error, and
    biased, which then accumulates through a network's backward. With
    ``EMULATE_RTNE_BF16`` (the launchers set it only under the interpreter for
    bfloat16 outputs) the rounding is done first on the float32 bits, so the
    truncating cast is exact:  bits += 0x7FFF + ((bits >> 16) & 1), then clear
    the low 16 bits (NaN and ±Inf keep their class).
    """
    if EMULATE_RTNE_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        bits = (bits >> 16) << 16
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


def emulate_rtne_bf16(out_dtype) -> bool:
    """The ``EMULATE_RTNE_BF16`` flag of :func:`to_output` for an output dtype."""
    import torch
    return interpreting() and out_dtype == torch.bfloat16
