"""The channel gate of design §3: apply ``out = A·g`` and its fused backward.

One streaming kernel, :func:`_gate_kernel`, serves three uses:

* forward apply (``suppress`` and ``class_drop``)::

      out[b, c, n] = A[b, c, n] · g[b, c]                      (cast to out.dtype)

* backward with respect to feats (every op)::

      dA[b, c, n]  = dOut[b, c, n] · g[b, c]                   (cast to dA.dtype)

* backward with respect to the gate (``class_drop`` only; ``suppress``'s gate is
  a batch statistic treated as a constant), fused into the same pass::

      dg[b, c]     = Σ_n dOut[b, c, n] · A[b, c, n]            (float32)

The gate ``g`` is float32 (B, C). Every product and the dg accumulation run in
float32; only the store casts. dg is deterministic: each program reduces its own
chunk of positions in a fixed order into ``partial[chunk, b, c]`` (no atomics),
and :func:`gate_backward` sums the few chunks with ``partial.sum(0)``.

Layout. A (B, C, H, W) tensor is addressed through its strides, never copied.
When H and W merge into one axis N = H·W with a single stride (NCHW, channels_last,
a step-sliced last dim, stride-0 expands), the offset of (b, c, n) is
``b·sB + c·sC + n·sN``; otherwise (a cropped view) ``n`` is split into
(n // W, n % W). A constexpr per tensor picks the addressing so that the
unit-stride axis is known at compile time (coalesced, vectorised access):

    LAYOUT_N   = 1: sN == 1   (NCHW):          c·sC + n
    LAYOUT_C   = 2: sC == 1   (channels_last): c + n·sN
    LAYOUT_CN  = 3: merged, generic strides:   c·sC + n·sN   (stride-0 grads too)
    LAYOUT_HW  = 0: unmerged:                  c·sC + (n // W)·sH + (n % W)·sW

All offsets are int64 (tensors of more than 2^31 elements index correctly).

Programs: a 1D grid over (b, channel block, position chunk); a program owns a
BLOCK_C × chunk tile and walks its chunk in BLOCK_N steps. Tile shapes per
layout are in :func:`plan` (see benchmarks/NOTES_selection.md).
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import INTERPRETER, Target, emulate_rtne_bf16, loop_bound, target, to_output

LAYOUT_HW, LAYOUT_N, LAYOUT_C, LAYOUT_CN = 0, 1, 2, 3


@triton.jit
def _offsets(c, n, sc, sn, sh, sw, Wd, LAYOUT: tl.constexpr):
    """Element offsets of a (BLOCK_C, 1) × (1, BLOCK_N) tile; c and n are int64."""
    if LAYOUT == 1:
        off = c * sc + n
    elif LAYOUT == 2:
        off = c + n * sn
    elif LAYOUT == 3:
        off = c * sc + n * sn
    else:
        off = c * sc + (n // Wd) * sh + (n % Wd) * sw
    return off


@triton.jit
def _gate_kernel(
    X, Gate, Y, A, P,
    C, N, Wd, n_cblk, n_chunk, blocks_per_chunk,
    sxb, sxc, sxn, sxh, sxw,
    syb, syc, syn, syh, syw,
    sab, sac, san, sah, saw,
    sgb, sgc,
    spk, spb,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
    X_LAYOUT: tl.constexpr, Y_LAYOUT: tl.constexpr, A_LAYOUT: tl.constexpr,
    WRITE_Y: tl.constexpr, WITH_DG: tl.constexpr, RTNE_BF16: tl.constexpr,
):
    """Y = X·g (if WRITE_Y) and partial[chunk, b, c] = Σ_{n in chunk} X·A (if WITH_DG).

    Forward:  X = A (feats), Y = out.             out = A·g
    Backward: X = dOut, Y = dA, A = feats.        dA = dOut·g,  dg = Σ_n dOut·A
    (the gradient of out = A·g: ∂out/∂A = g, ∂out/∂g = A). float32 math.
    """
    pid = tl.program_id(0)
    chunk = pid % n_chunk
    rest = pid // n_chunk
    cblk = rest % n_cblk
    b = (rest // n_cblk).to(tl.int64)

    c1 = cblk * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask1 = c1 < C
    c1 = c1.to(tl.int64)
    c = c1[:, None]
    cmask = cmask1[:, None]

    g = tl.load(Gate + b * sgb + c1 * sgc, mask=cmask1, other=0.0).to(tl.float32)[:, None]

    x_base = X + b * sxb
    y_base = Y + b * syb
    a_base = A + b * sab
    acc = tl.zeros((BLOCK_C, BLOCK_N), dtype=tl.float32)
    n0 = chunk.to(tl.int64) * blocks_per_chunk * BLOCK_N
    for i in range(0, loop_bound(blocks_per_chunk)):
        n = (n0 + i * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64))[None, :]
        mask = cmask & (n < N)
        x = tl.load(x_base + _offsets(c, n, sxc, sxn, sxh, sxw, Wd, X_LAYOUT), mask=mask, other=0.0).to(tl.float32)
        if WRITE_Y:
            y = x * g
            tl.store(y_base + _offsets(c, n, syc, syn, syh, syw, Wd, Y_LAYOUT), to_output(y, Y.dtype.element_ty, RTNE_BF16), mask=mask)
        if WITH_DG:
            a = tl.load(a_base + _offsets(c, n, sac, san, sah, saw, Wd, A_LAYOUT), mask=mask, other=0.0).to(tl.float32)
            acc += x * a
    if WITH_DG:
        part = tl.sum(acc, axis=1)
        tl.store(P + chunk.to(tl.int64) * spk + b * spb + c1, part, mask=cmask1)


# ----------------------------------------------------------------------------- launch helpers

def view_strides(t: torch.Tensor):
    """(layout, sB, sC, sN, sH, sW) of a 4D tensor seen as (B, C, N = H·W)."""
    B, C, H, W = t.shape
    sb, sc, sh, sw = t.stride()
    if H == 1:
        sn = sw
    elif W == 1:
        sn = sh
    elif sh == W * sw:
        sn = sw
    else:
        return LAYOUT_HW, sb, sc, 0, sh, sw
    if sn == 1 or H * W == 1:
        return LAYOUT_N, sb, sc, 1, sh, sw
    if sc == 1 or C == 1:
        return LAYOUT_C, sb, 1, sn, sh, sw
    return LAYOUT_CN, sb, sc, sn, sh, sw


def _pow2_at_least(n, lo: int, hi: int) -> int:
    """Smallest power of two >= n, clamped to [lo, hi] (comparisons only: fine for SymInts)."""
    p = lo
    while p < hi and p < n:
        p *= 2
    return p


class Plan(NamedTuple):
    """Launch configuration of :func:`_gate_kernel`."""
    block_c: int
    block_n: int
    num_warps: int
    programs: int  # target number of programs (the position chunks are sized for it)


def plan(C: int, N: int, layout: int, t: Target) -> Plan:
    """The launch configuration for C channels × N positions in ``layout`` on ``t``.

    GPU tiles hold 4096 elements (16 per thread at 8 warps) with the unit-stride
    axis long: NCHW 16×256 (512 B rows in bf16), channels_last 128×32 (256 B
    rows; a narrower channel block when 128 would pad C by more than 1/8). These are the predictions of benchmarks/NOTES_selection.md, to be
    tuned on the GPU. The interpreter runs programs one at a time, so there a few
    larger programs are cheapest; blocks stay small so tests still cover several
    channel blocks and position chunks.
    """
    if t == INTERPRETER:
        return Plan(_pow2_at_least(C, 1, 32), 16, 1, 8)
    if layout == LAYOUT_C:
        # widest channel block (longest contiguous run) whose padding wastes
        # at most 1/8 of the lanes: C 720 -> 128 (6.7 %), C 270 -> 32 (6.7 %)
        bc = 16
        for cand in (128, 64, 32):
            if cand <= 2 * C and triton.cdiv(C, cand) * cand - C <= C // 8:
                bc = cand
                break
        bn = max(16, 4096 // bc)
    elif layout == LAYOUT_N:
        bc, bn = 16, 256
    else:
        bc, bn = 32, 64
    while bc * bn > 4096 and bn > 16:
        bn //= 2
    return Plan(bc, bn, 8, 16 * t.sms)


def launch(x, gate, y=None, a=None, *, wrap=None, blocks_per_chunk=None):
    """Launch :func:`_gate_kernel`.

    x: (B, C, H, W) feats (forward) or dOut (backward), any strides.
    gate: (B, C) float32.  y: preallocated output (out or dA) or None.
    a: feats when dg is wanted (backward of class_drop), else None.
    wrap: ``torch.library.wrap_triton`` inside a ``triton_op`` (traceable), else None.
    Returns the dg partials (n_chunk, B, C) float32 when ``a`` is given, else None.
    Nothing is launched for an empty tensor (B = 0 or C = 0); partials are then zeros.
    """
    B, C, H, W = x.shape
    N = H * W
    write_y = y is not None
    with_dg = a is not None
    xl, sxb, sxc, sxn, sxh, sxw = view_strides(x)
    yl, syb, syc, syn, syh, syw = view_strides(y) if write_y else (LAYOUT_N, 0, 0, 0, 0, 0)
    al, sab, sac, san, sah, saw = view_strides(a) if with_dg else (LAYOUT_N, 0, 0, 0, 0, 0)
    # the layout used for tiling is the one of the tensor read or written in full
    bc, bn, warps, programs = plan(C, N, yl if write_y else al, target(x.device))
    n_cblk = triton.cdiv(max(C, 1), bc)
    n_blocks = triton.cdiv(max(N, 1), bn)
    if blocks_per_chunk is None:
        want = max(1, triton.cdiv(programs, max(B * n_cblk, 1)))
        blocks_per_chunk = triton.cdiv(n_blocks, min(want, n_blocks))
    n_chunk = triton.cdiv(n_blocks, blocks_per_chunk)
    partial = None
    if with_dg:
        partial = torch.empty((n_chunk, B, C), dtype=torch.float32, device=x.device)
    if B == 0 or C == 0 or N == 0:
        if partial is not None:
            partial = torch.zeros_like(partial)
        return partial
    kernel = _gate_kernel if wrap is None else wrap(_gate_kernel)
    grid = (B * n_cblk * n_chunk,)
    # Triton launches on the current device: make it the data's (multi-GPU)
    with (torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()):
        kernel[grid](
            # unused pointers get the small gate, never an alias of a big input (the
            # mutation analysis of wrap_triton must not think a user tensor is written)
            x, gate, y if write_y else gate, a if with_dg else gate, partial if with_dg else gate,
            C, N, W, n_cblk, n_chunk, blocks_per_chunk,
            sxb, sxc, sxn, sxh, sxw,
            syb, syc, syn, syh, syw,
            sab, sac, san, sah, saw,
            gate.stride(0), gate.stride(1),
            C * B if with_dg else 0, C if with_dg else 0,
            BLOCK_C=bc, BLOCK_N=bn,
            X_LAYOUT=xl, Y_LAYOUT=yl, A_LAYOUT=al,
            WRITE_Y=write_y, WITH_DG=with_dg, RTNE_BF16=write_y and emulate_rtne_bf16(y.dtype),
            num_warps=warps,
        )
    return partial
