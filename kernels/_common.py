"""Helpers shared by the kernels."""
from __future__ import annotations

import functools
import os
import re

import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=None)
def triton_minor() -> tuple[int, int]:
    """(major, minor) of the installed Triton (``triton.__version__``; (0, 0) if unparsable)."""
    m = re.match(r"(\d+)\.(\d+)", getattr(triton, "__version__", ""))
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


# The one place where launch configurations depend on the Triton version: what each
# Triton's code generator + its bundled ptxas do with a configuration on sm_90 is not
# detectable at run time without a compile, so these are the measured facts of the
# offline sm_90 compiles (``python -m benchmarks.aot``, tests/test_aot_sm90.py; numbers
# in benchmarks/NOTES_aot.md, "Triton versions"):
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


def sm90_config(key: str, version: tuple[int, int] | None = None):
    """The version-dependent launch choice ``key`` of ``_SM90_CONFIG`` for this Triton
    (or ``version``), from the nearest measured version."""
    v = triton_minor() if version is None else version
    known = sorted(_SM90_CONFIG)
    near = known[0] if v <= known[0] else max(k for k in known if k <= v)
    return _SM90_CONFIG[near][key]


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
