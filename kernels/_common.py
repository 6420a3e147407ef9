"""Helpers shared by the kernels."""
from __future__ import annotations

import os

import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


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
