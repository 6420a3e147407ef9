"""Batch moments of design §2 (means, C×C Gram, K×C cross term) in one reduction pass.

``launch(feats, class_logits) -> (a_mean (C,), l_mean (K,), G (C, C), X (K, C))``,
all float32, the contract of ``debias_ops.reference.batch_moments``:

    M      = B·N positions (N = H·W), A viewed as (C, M), L as (K, M)
    Ā[c]   = (1/M) Σ_m A[c, m]              L̄[j] = (1/M) Σ_m L[j, m]
    G[c,c'] = (1/M) Σ_m (A[c,m] − Ā[c]) (A[c',m] − Ā[c'])
    X[j,c]  = (1/M) Σ_m (L[j,m] − L̄[j]) (A[c,m] − Ā[c])
    B = 0 (M = 0): every statistic is 0.

No gradient (design §2: the fitted importance is a batch constant), so there is
no backward kernel; the gradient math of the op that uses these statistics
lives in ``debias_ops.fused_selection`` (dA = dOut·g).

Algorithm
---------
Three launches, no host sync, no N-sized intermediate:

0. ``_shift_kernel`` (tiny): the per-channel shifts s (C) and t (K), see
   Numerics; read by both kernels so every program uses the same bits.
1. ``_moments_partial_kernel``, grid (tiles, P). The statistics are a
   "syrk" ``Z Zᵀ`` with a huge reduction axis (the M positions). A tile is
   either an upper-triangle Gram tile (I ≤ J, BLOCK_C × BLOCK_C; G is
   symmetric, the lower triangle is mirrored at the end) or a cross tile
   Xᵀ (A block J × L block, BLOCK_C × BLOCK_K: A is the wide operand so the
   tensor-core M dimension is ≥ 64 even for K = 19). The full position
   blocks (image b, BLOCK_N positions; never straddling two images) are
   split into P contiguous ranges, and the partial last block of each image
   (when BLOCK_N ∤ N) goes to the P programs in turn after their main loop,
   so main-loop loads carry no position mask. Program (t, p) accumulates
   its tile with ``tl.dot`` into fp32 registers and writes one fp32 partial.
   Programs are launched tile-fastest, so the ~tiles programs that share a
   position range run together and A is fetched from DRAM about once (the
   re-reads of a range by the other tiles of its row/column hit L2).
   The per-channel sums for the means are kept from the diagonal Gram
   tiles (A, block I) and the cross tiles of A block 0 (L); in modes 0 and
   2 the other Gram tiles do no CUDA-core work beside the dot (mode 1 sums
   every operand tile for its re-centring, see Numerics).
2. ``_moments_reduce_kernel``, grid (tiles,): sums the P partials of each
   tile in a fixed order in float64 (deterministic: no atomics, the same
   bits on every run), removes the mean, scales by 1/M, writes G (both
   triangles, bitwise symmetric), X, Ā and L̄ in float32.

Numerics (error analysis)
-------------------------
One-pass centred moments suffer cancellation: E[aaᵀ] − ĀĀᵀ computed in
fp32 loses about log2(1 + μ²/σ²) bits when |μ| ≫ σ (measured: mean 10,
std 1 → 6e-5 relative error of G; mean 100 → 5e-3). The kernel works about
a per-channel shift s (and t for L), computed once by ``_shift_kernel``:
the mean of 16 positions of image 0 spread over the image, rounded to the
input's dtype, so |μ − s| ~ σ/4…σ and s lies on the data's own grid (a − s
is exact wherever s/2 ≤ a ≤ 2s, Sterbenz). Per operand pair, one of:

* **mode 2 — fp32 feats, or mixed dtypes for the cross term.** Operands
  are loaded to fp32 and shifted before the dot, x = a − s (relative
  rounding ≤ u = 2⁻²⁴ of |a − s|, exact when clustered), then ``tl.dot``
  with ``input_precision="tf32x3"`` (3 TF32 products, ≈ 2⁻²¹ relative per
  product) or ``"ieee"``. The accumulator holds Σ(a−s)(a'−s') of size
  n(σ² + (μ−s)²), so the relative error of G is
      ≈ (u_dot + u·√r)·(1 + (μ − s)²/σ²),   independent of |μ|
  (r = number of fp32 additions into one accumulator entry per program).
* **mode 1 — 16-bit feats (and same-dtype 16-bit logits), the default.**
  A shifted 16-bit operand would have to be rounded back to 16 bits, so
  the dot runs on the raw values: products of two 16-bit floats are exact
  in fp32 (8+8 resp. 11+11 ≤ 24 mantissa bits). To keep the accumulator
  at the centred scale, every R = ``recenter_every`` blocks the program
  subtracts the shift's rank-1 terms from it (CUDA-core work, exact
  algebra: Σ aa'ᵀ − s P'ᵀ − P s'ᵀ − n ss'ᵀ = Σ (a−s)(a'−s')ᵀ with
  P = Σ(a − s) over those blocks). What remains is the rounding inside the
  R blocks, where partial sums reach R·BLOCK_N·(μ² + σ²):
      ≈ u·(1 + μ²/σ²)·√(R·BLOCK_N/16) / √(blocks per program)
  per entry, relative to σ². Measured (interpreter, M = 1024, mean 10):
  fp16 1e-5, bf16 2e-8 (bf16 values near 10 are multiples of 1/16: every
  sum is exact); without re-centring (R = 0, mode 0) 3e-5 / 2e-5;
  fp32 mode 2: 6e-8.
* **mode 0 — ``recenter_every=0``:** raw accumulation, centred only in
  the reduce (error ≈ u·(1 + μ²/σ²)·√r); kept for timing comparisons.

The P partials are added in float64 in a fixed order, and the reduce forms
G = S₂/M − d dᵀ, d = S₁/M = Ā − s in float64. Means: Ā = s + S₁/M, with
S₁ = Σ(a − s) accumulated in fp32 per program.

Layout: A is read through its strides as (B, C, H, W) (N-contiguous NCHW,
C-contiguous channels_last, or any view) with int64 offsets; when H and W
merge into one axis of stride s_w (NCHW, channels_last, or a last-axis
slice) the kernel uses n·s_w, else it splits n = h·W + w. ``feats`` and
``class_logits`` may have different dtypes and layouts. When channels are
the contiguous axis (channels_last), tiles made only of full channel blocks
load without a channel mask (a mask varying along the contiguous axis stops
vectorised cp.async copies, hence software pipelining, for 16-bit data).

Interpreter: Triton 3.9's interpreter multiplies bf16 ``tl.dot`` operands as
their raw uint16 bits (garbage); under TRITON_INTERPRET=1 bf16 tiles are
widened to fp32 first (exact), so CI checks the same math.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRETER,
    Target,
    fp32_dot_precision,
    loop_bound,
    mma_config,
    mma_kind,
    next_pow2,
    sm90_config,
    target,
)

# ----------------------------------------------------------------------------- helpers

def _pick_block_c(C: int) -> int:
    """GPU default BLOCK_C: 128 (twice the operand reuse of 64: 64 vs 32
    flop per byte read from L2) unless its padded upper-triangle area is over
    1.25× that of 64 (e.g. C = 270: 384² vs 320² padding)."""
    def area(bc):
        nb = triton.cdiv(C, bc)
        return nb * (nb + 1) // 2 * bc * bc
    bc = 128 if area(128) <= 1.25 * area(64) else 64
    return min(bc, max(16, next_pow2(C)))


def _pick_splits(n_tiles: int, q_total: int, sms: int) -> int:
    """P for ~2–6 waves of programs over the SMs, the count with the least
    idle tail (programs / (waves·SMs) highest), ties to fewer partials; at
    least 4 position blocks per program."""
    lo = max(1, triton.cdiv(2 * sms, n_tiles))
    hi = max(lo, triton.cdiv(6 * sms, n_tiles))
    cap = max(1, q_total // 4)
    best, best_eff = 1, -1.0
    for s in range(lo, hi + 1):
        s = min(s, cap)
        progs = n_tiles * s
        eff = progs / (triton.cdiv(progs, sms) * sms)
        if eff > best_eff + 1e-3:
            best, best_eff = s, eff
    return best


def _spatial(x: torch.Tensor):
    """(H, W, s_h, s_w, merged) of a (B, C, *spatial) tensor; merged when n·s_w addresses it."""
    if x.dim() == 2:
        return 1, 1, 0, 0, True
    if x.dim() == 3:
        return 1, x.shape[2], 0, x.stride(2), True
    H, W = x.shape[2], x.shape[3]
    sh, sw = x.stride(2), x.stride(3)
    if H == 1:
        return 1, W, 0, sw, True
    if W == 1:
        return 1, H, 0, sh, True
    if sh == W * sw:
        return 1, H * W, 0, sw, True
    return H, W, sh, sw, False


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _load_tile(ptr, s_b, s_c, s_h, s_w, b, chan, n, nmask, n_chan, Wd,
               CHAN_AXIS: tl.constexpr, MERGED: tl.constexpr, MASK_C: tl.constexpr = True,
               MASK_N: tl.constexpr = True):
    """Tile of one image b: channels ``chan`` × positions ``n`` (channels on
    axis CHAN_AXIS of the result), masked to 0 outside; raw dtype.
    MASK_C=False: every channel of the tile exists; MASK_N=False: every
    position exists (``nmask`` unused). Masks that do not vary along the
    contiguous axis keep the loads vectorised, so that 16-bit tiles can be
    software-pipelined with cp.async (≥ 4-byte copies)."""
    if MERGED:
        noff = n.to(tl.int64) * s_w
    else:
        noff = (n // Wd).to(tl.int64) * s_h + (n % Wd).to(tl.int64) * s_w
    coff = chan.to(tl.int64) * s_c
    base = ptr + tl.cast(b, tl.int64) * s_b
    if CHAN_AXIS == 0:
        ptrs = base + coff[:, None] + noff[None, :]
        if MASK_C:
            if MASK_N:
                return tl.load(ptrs, mask=(chan < n_chan)[:, None] & nmask[None, :], other=0.0)
            else:
                return tl.load(ptrs, mask=(chan < n_chan)[:, None], other=0.0)
        else:
            if MASK_N:
                return tl.load(ptrs, mask=nmask[None, :], other=0.0)
            else:
                return tl.load(ptrs)
    else:
        ptrs = base + noff[:, None] + coff[None, :]
        if MASK_C:
            if MASK_N:
                return tl.load(ptrs, mask=nmask[:, None] & (chan < n_chan)[None, :], other=0.0)
            else:
                return tl.load(ptrs, mask=(chan < n_chan)[None, :], other=0.0)
        else:
            if MASK_N:
                return tl.load(ptrs, mask=nmask[:, None], other=0.0)
            else:
                return tl.load(ptrs)


@triton.jit
def _shift_kernel(a_ptr, l_ptr, shift_ptr, C, K, N, Wd,
                  a_sc, a_sh, a_sw, l_sc, l_sh, l_sw,
                  BLOCK_S: tl.constexpr, A_MERGED: tl.constexpr, L_MERGED: tl.constexpr):
    """Per-channel shifts, computed once so that every program uses the same bits:

        shift[c]     = round_A( (1/16) Σ_i A[0, c, n_i] ),   c < C
        shift[C + j] = round_L( (1/16) Σ_i L[0, j, n_i] ),   j < K
    with n_i = ⌊i·N/16⌋ (16 positions of image 0 spread over the image) and
    round_X the rounding to that tensor's dtype (a value of the data's own
    grid: a − s is then exact wherever s/2 ≤ a ≤ 2s, Sterbenz).
    """
    pid = tl.program_id(0)
    n_ab = tl.cdiv(C, BLOCK_S)
    n = (tl.arange(0, 16).to(tl.int64) * N) // 16
    nmask = n < N
    zero = pid * 0
    if pid < n_ab:
        ch = pid * BLOCK_S + tl.arange(0, BLOCK_S)
        x = _load_tile(a_ptr, 0, a_sc, a_sh, a_sw, zero, ch, n, nmask, C, Wd, 0, A_MERGED, True, True)
        s = (tl.sum(x.to(tl.float32), axis=1) * (1.0 / 16.0)).to(x.dtype).to(tl.float32)
        tl.store(shift_ptr + ch, s, mask=ch < C)
    else:
        # own names: a variable assigned in both branches must have one type there
        # (bf16 feats with fp32 logits failed to compile for the GPU; the interpreter
        # does not check this)
        kh = (pid - n_ab) * BLOCK_S + tl.arange(0, BLOCK_S)
        xl = _load_tile(l_ptr, 0, l_sc, l_sh, l_sw, zero, kh, n, nmask, K, Wd, 0, L_MERGED, True, True)
        sl = (tl.sum(xl.to(tl.float32), axis=1) * (1.0 / 16.0)).to(xl.dtype).to(tl.float32)
        tl.store(shift_ptr + C + kh, sl, mask=kh < K)


@triton.jit
def _sum_n(x, AXIS: tl.constexpr, BY_DOT: tl.constexpr, DOT_F32: tl.constexpr):
    """Σ over the position axis AXIS of a raw 16-bit tile, in fp32.
    BY_DOT: on the tensor cores, as x·e₀ (e₀ = first unit column of 16;
    products by 1 and 0 are exact). A ``tl.sum`` over a channel-contiguous
    (MN-major) operand inside the dot loop makes ptxas serialise the wgmma
    pipeline (C7515, seen in an sm_90 compile); the dot does not."""
    if BY_DOT:
        if AXIS == 1:
            t = x
        else:
            t = tl.trans(x)
        e0 = tl.zeros((t.shape[1], 16), dtype=tl.float32) + tl.where(tl.arange(0, 16) == 0, 1.0, 0.0)[None, :]
        if DOT_F32:
            r = tl.dot(t.to(tl.float32), e0, input_precision="ieee")
        else:
            r = tl.dot(t, e0.to(t.dtype))
        return tl.sum(r, axis=1)
    else:
        return tl.sum(x.to(tl.float32), axis=AXIS)


@triton.jit
def _block_step(acc, sum_r, sum_c, pend_r, pend_c, pend_n, x, y, xm, ym, n_valid, flush, sr, sc,
                MODE: tl.constexpr, PREC: tl.constexpr, DOT_F32: tl.constexpr,
                SUM_R: tl.constexpr, SUM_C: tl.constexpr, SUM_DOT: tl.constexpr):
    """One position block: acc += x·y (see ``_tile_accumulate`` for the modes);
    xm / ym: where the loaded values exist (broadcastable to x / y)."""
    if MODE == 2:
        x = tl.where(xm, x.to(tl.float32) - sr[:, None], 0.0)
        y = tl.where(ym, y.to(tl.float32) - sc[None, :], 0.0)
        acc = tl.dot(x, y, acc, input_precision=PREC)
        if SUM_R:
            sum_r += tl.sum(x, axis=1)
        if SUM_C:
            sum_c += tl.sum(y, axis=0)
    else:
        if DOT_F32:
            # the Triton 3.9 interpreter multiplies bf16 tiles as their uint16 bits:
            # there, widen (exactly) to fp32 and multiply in IEEE fp32 (exact products)
            acc = tl.dot(x.to(tl.float32), y.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, y, acc)
        if MODE == 0:
            if SUM_R:
                sum_r += _sum_n(x, 1, SUM_DOT, DOT_F32)
            if SUM_C:
                sum_c += _sum_n(y, 0, SUM_DOT, DOT_F32)
        else:
            if SUM_DOT:
                # raw sums (masked entries load 0) minus n·s; rows outside the
                # channel range have s = 0
                pend_r += _sum_n(x, 1, True, DOT_F32) - n_valid * sr
                pend_c += _sum_n(y, 0, True, DOT_F32) - n_valid * sc
            else:
                pend_r += tl.sum(tl.where(xm, x.to(tl.float32) - sr[:, None], 0.0), axis=1)
                pend_c += tl.sum(tl.where(ym, y.to(tl.float32) - sc[None, :], 0.0), axis=0)
            pend_n += n_valid
            if flush:
                # re-centre: acc −= s_r (P_c + n s_c/2)ᵀ + (P_r + n s_r/2) s_cᵀ
                ur = pend_r + (0.5 * pend_n) * sr
                uc = pend_c + (0.5 * pend_n) * sc
                acc -= sr[:, None] * uc[None, :] + ur[:, None] * sc[None, :]
                sum_r += pend_r
                sum_c += pend_c
                pend_r = pend_r * 0.0
                pend_c = pend_c * 0.0
                pend_n = pend_n * 0.0
    return acc, sum_r, sum_c, pend_r, pend_c, pend_n


@triton.jit
def _tile_accumulate(r_ptr, r_sb, r_sc, r_sh, r_sw, R_CH, r0, r_shift,
                     c_ptr, c_sb, c_sc, c_sh, c_sw, C_CH, c0, c_shift,
                     q_lo, q_hi, t_lo, t_hi, NBF, N, Wd,
                     BR: tl.constexpr, BCOL: tl.constexpr, BN: tl.constexpr,
                     MODE: tl.constexpr, CORR: tl.constexpr, PREC: tl.constexpr, DOT_F32: tl.constexpr,
                     SUM_R: tl.constexpr, SUM_C: tl.constexpr,
                     R_MERGED: tl.constexpr, C_MERGED: tl.constexpr,
                     R_MASK: tl.constexpr, C_MASK: tl.constexpr, HAS_TAIL: tl.constexpr,
                     SUM_DOT: tl.constexpr):
    """acc[r, c] = Σ_m x_r[m] y_c[m] over this program's positions, rows =
    channels r0 + [0, BR) of r_ptr, cols = channels c0 + [0, BCOL) of c_ptr:
    the full position blocks q ∈ [q_lo, q_hi) (image q // NBF, NBF = ⌊N/BN⌋
    full blocks per image; loads without a position mask), then, if HAS_TAIL,
    the last partial block (positions NBF·BN … N−1) of images [t_lo, t_hi).
    With s the per-channel shifts at r_shift / c_shift (``_shift_kernel``):

    MODE 0: x = a, y = l (raw values: exact 16-bit products); sums Σ a.
    MODE 1: raw values in the dot, and every CORR blocks (and at the end) the
            accumulator is re-centred on s with the pending sums
            P_x = Σ (a − s) and count n:
                acc −= s_r (P_y + n s_c/2)ᵀ + (P_x + n s_r/2) s_cᵀ
            so acc = Σ (a − s_r)(l − s_c)ᵀ stays at the centred magnitude;
            sums Σ (a − s).
    MODE 2: x = a − s in fp32 before the dot (``input_precision=PREC``);
            sums Σ (a − s).
    R_MASK / C_MASK = False: the rows / cols block lies inside [0, R_CH) /
    [0, C_CH), its loads need no channel mask.
    SUM_DOT: the 16-bit sums are taken on the tensor cores (``_sum_n``).
    Returns (acc, Σ_m x_r (if SUM_R), Σ_m y_c (if SUM_C)).
    """
    rch = r0 + tl.arange(0, BR)
    cch = c0 + tl.arange(0, BCOL)
    rmask = rch < R_CH
    cmask = cch < C_CH
    nn = tl.arange(0, BN)
    acc = tl.zeros((BR, BCOL), dtype=tl.float32)
    sum_r = tl.zeros((BR,), dtype=tl.float32)
    sum_c = tl.zeros((BCOL,), dtype=tl.float32)
    pend_r = tl.zeros((BR,), dtype=tl.float32)
    pend_c = tl.zeros((BCOL,), dtype=tl.float32)
    pend_n = tl.sum(tl.zeros((BN,), dtype=tl.float32), axis=0)
    if MODE != 0:
        sr = tl.load(r_shift + rch, mask=rmask, other=0.0)
        sc = tl.load(c_shift + cch, mask=cmask, other=0.0)
    else:
        sr = tl.zeros((BR,), dtype=tl.float32)
        sc = tl.zeros((BCOL,), dtype=tl.float32)
    # full blocks: no position mask
    for q in range(loop_bound(q_lo), loop_bound(q_hi)):
        b = q // NBF
        n = (q - b * NBF) * BN + nn
        x = _load_tile(r_ptr, r_sb, r_sc, r_sh, r_sw, b, rch, n, nn, R_CH, Wd, 0, R_MERGED, R_MASK, False)
        y = _load_tile(c_ptr, c_sb, c_sc, c_sh, c_sw, b, cch, n, nn, C_CH, Wd, 1, C_MERGED, C_MASK, False)
        flush = ((q - q_lo) % CORR == CORR - 1) | (q == q_hi - 1)
        acc, sum_r, sum_c, pend_r, pend_c, pend_n = _block_step(
            acc, sum_r, sum_c, pend_r, pend_c, pend_n, x, y, rmask[:, None], cmask[None, :],
            BN * 1.0, flush, sr, sc, MODE, PREC, DOT_F32, SUM_R, SUM_C, SUM_DOT)
    if HAS_TAIL:
        # the last, partial position block of each image in [t_lo, t_hi)
        n = NBF * BN + nn
        nmask = n < N
        for b in range(loop_bound(t_lo), loop_bound(t_hi)):
            x = _load_tile(r_ptr, r_sb, r_sc, r_sh, r_sw, b, rch, n, nmask, R_CH, Wd, 0, R_MERGED, R_MASK, True)
            y = _load_tile(c_ptr, c_sb, c_sc, c_sh, c_sw, b, cch, n, nmask, C_CH, Wd, 1, C_MERGED, C_MASK, True)
            acc, sum_r, sum_c, pend_r, pend_c, pend_n = _block_step(
                acc, sum_r, sum_c, pend_r, pend_c, pend_n, x, y,
                rmask[:, None] & nmask[None, :], nmask[:, None] & cmask[None, :],
                (N - NBF * BN) * 1.0, b == b, sr, sc, MODE, PREC, DOT_F32, SUM_R, SUM_C, SUM_DOT)
    return acc, sum_r, sum_c


@triton.jit
def _gram_tile(a_ptr, a_sb, a_sc, a_sh, a_sw, C, shift_ptr, i, j, q_lo, q_hi, t_lo, t_hi, NBF, N, Wd,
               BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr, CORR: tl.constexpr,
               PREC: tl.constexpr, DOT_F32: tl.constexpr, DIAG: tl.constexpr, MERGED: tl.constexpr,
               MASK: tl.constexpr, HAS_TAIL: tl.constexpr, SUM_DOT: tl.constexpr):
    """Gram tile (I, J): (Σ x_I x_Jᵀ, Σ x_I (DIAG only))."""
    acc, s_r, s_c = _tile_accumulate(
        a_ptr, a_sb, a_sc, a_sh, a_sw, C, i * BLOCK_C, shift_ptr,
        a_ptr, a_sb, a_sc, a_sh, a_sw, C, j * BLOCK_C, shift_ptr,
        q_lo, q_hi, t_lo, t_hi, NBF, N, Wd, BLOCK_C, BLOCK_C, BLOCK_N,
        MODE, CORR, PREC, DOT_F32, DIAG, False, MERGED, MERGED, MASK, MASK, HAS_TAIL, SUM_DOT)
    return acc, s_r


@triton.jit
def _cross_tile(a_ptr, a_sb, a_sc, a_sh, a_sw, C, l_ptr, l_sb, l_sc, l_sh, l_sw, K,
                shift_ptr, jx, kb, q_lo, q_hi, t_lo, t_hi, NBF, N, Wd,
                BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                MODE: tl.constexpr, CORR: tl.constexpr, PREC: tl.constexpr, DOT_F32: tl.constexpr,
                A_MERGED: tl.constexpr, L_MERGED: tl.constexpr, MASK_A: tl.constexpr,
                HAS_TAIL: tl.constexpr, SUM_DOT: tl.constexpr):
    """Cross tile (A block J, L block kb): (Σ x_J y_kbᵀ, Σ y_kb); the L sums
    are only stored for J = 0, but cost little (BLOCK_K ≤ 128 channels)."""
    acc, s_r, s_c = _tile_accumulate(
        a_ptr, a_sb, a_sc, a_sh, a_sw, C, jx * BLOCK_C, shift_ptr,
        l_ptr, l_sb, l_sc, l_sh, l_sw, K, kb * BLOCK_K, shift_ptr + C,
        q_lo, q_hi, t_lo, t_hi, NBF, N, Wd, BLOCK_C, BLOCK_K, BLOCK_N,
        MODE, CORR, PREC, DOT_F32, False, True, A_MERGED, L_MERGED, MASK_A, True, HAS_TAIL, SUM_DOT)
    return acc, s_c


@triton.jit
def _moments_partial_kernel(
    a_ptr, l_ptr, gpart_ptr, xpart_ptr, sa_ptr, sl_ptr, shift_ptr,
    C, K, N, Wd, NBF, Q_TOTAL, Q_PER, B, T_PER,
    a_sb, a_sc, a_sh, a_sw,
    l_sb, l_sc, l_sh, l_sw,
    N_CB, N_GT, N_KB, N_FULL,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    G_MODE: tl.constexpr, X_MODE: tl.constexpr, CORR: tl.constexpr,
    PREC: tl.constexpr, DOT_F32: tl.constexpr,
    A_MERGED: tl.constexpr, L_MERGED: tl.constexpr, SPLIT_FULL: tl.constexpr, HAS_TAIL: tl.constexpr,
    SUM_DOT: tl.constexpr,
):
    """Partial moments of one tile over one range p of positions (see module doc).

    Gram tile t < N_GT, (I, J) with I ≤ J:
        gpart[p, t] = Σ_{m in range p} x_I[m] x_Jᵀ[m]      (BLOCK_C × BLOCK_C)
        and, when I == J, sa[p, I] = Σ x_I[m]               (BLOCK_C)
    Cross tile t = N_GT + J·N_KB + kb:
        xpart[p, J·N_KB + kb] = Σ x_J[m] y_kbᵀ[m]           (BLOCK_C × BLOCK_K)
        and, when J == 0, sl[p, kb] = Σ y_kb[m]             (BLOCK_K)
    x = A − s, y = L − t (s, t = 0 in mode 0; see ``_tile_accumulate``).
    shift = [s (C), t (K)] from ``_shift_kernel`` (read in modes 1 and 2).
    SPLIT_FULL (channels contiguous, e.g. channels_last): tiles whose channel
    blocks are all below N_FULL·BLOCK_C load without a channel mask.
    """
    t = tl.program_id(0)
    p = tl.program_id(1)
    q_lo = p * Q_PER  # full position blocks [q_lo, q_hi) of the B·NBF
    q_hi = tl.minimum(q_lo + Q_PER, Q_TOTAL)
    t_lo = p * T_PER  # images whose partial last block this program takes
    t_hi = tl.minimum(t_lo + T_PER, B)
    rr = tl.arange(0, BLOCK_C)
    if t < N_GT:
        # upper-triangle tile index -> (I, J), row-major over I ≤ J
        i = t * 0
        rem = t
        while rem >= N_CB - i:
            rem -= N_CB - i
            i += 1
        j = i + rem
        cc = tl.arange(0, BLOCK_C)
        out = gpart_ptr + ((p.to(tl.int64) * N_GT + t) * BLOCK_C) * BLOCK_C
        if SPLIT_FULL:
            if j < N_FULL:  # I ≤ J < N_FULL: both blocks full, unmasked channel loads
                if i == j:
                    acc, s_r = _gram_tile(a_ptr, a_sb, a_sc, a_sh, a_sw, C, shift_ptr, i, j, q_lo, q_hi, t_lo, t_hi, NBF, N, Wd,
                                          BLOCK_C, BLOCK_N, G_MODE, CORR, PREC, DOT_F32, True, A_MERGED, False, HAS_TAIL, SUM_DOT)
                else:
                    acc, s_r = _gram_tile(a_ptr, a_sb, a_sc, a_sh, a_sw, C, shift_ptr, i, j, q_lo, q_hi, t_lo, t_hi, NBF, N, Wd,
                                          BLOCK_C, BLOCK_N, G_MODE, CORR, PREC, DOT_F32, False, A_MERGED, False, HAS_TAIL, SUM_DOT)
            else:
                if i == j:
                    acc, s_r = _gram_tile(a_ptr, a_sb, a_sc, a_sh, a_sw, C, shift_ptr, i, j, q_lo, q_hi, t_lo, t_hi, NBF, N, Wd,
                                          BLOCK_C, BLOCK_N, G_MODE, CORR, PREC, DOT_F32, True, A_MERGED, True, HAS_TAIL, SUM_DOT)
                else:
                    acc, s_r = _gram_tile(a_ptr, a_sb, a_sc, a_sh, a_sw, C, shift_ptr, i, j, q_lo, q_hi, t_lo, t_hi, NBF, N, Wd,
                                          BLOCK_C, BLOCK_N, G_MODE, CORR, PREC, DOT_F32, False, A_MERGED, True, HAS_TAIL, SUM_DOT)
        else:
            if i == j:
                acc, s_r = _gram_tile(a_ptr, a_sb, a_sc, a_sh, a_sw, C, shift_ptr, i, j, q_lo, q_hi, t_lo, t_hi, NBF, N, Wd,
                                      BLOCK_C, BLOCK_N, G_MODE, CORR, PREC, DOT_F32, True, A_MERGED, True, HAS_TAIL, SUM_DOT)
            else:
                acc, s_r = _gram_tile(a_ptr, a_sb, a_sc, a_sh, a_sw, C, shift_ptr, i, j, q_lo, q_hi, t_lo, t_hi, NBF, N, Wd,
                                      BLOCK_C, BLOCK_N, G_MODE, CORR, PREC, DOT_F32, False, A_MERGED, True, HAS_TAIL, SUM_DOT)
        if i == j:
            tl.store(sa_ptr + (p.to(tl.int64) * N_CB + i) * BLOCK_C + rr, s_r)
        tl.store(out + rr[:, None] * BLOCK_C + cc[None, :], acc)
    else:
        u = t - N_GT
        jx = u // N_KB
        kb = u - jx * N_KB
        kk = tl.arange(0, BLOCK_K)
        xout = xpart_ptr + ((p.to(tl.int64) * (N_CB * N_KB) + u) * BLOCK_C) * BLOCK_K
        if SPLIT_FULL:
            if jx < N_FULL:
                xacc, xs_c = _cross_tile(a_ptr, a_sb, a_sc, a_sh, a_sw, C, l_ptr, l_sb, l_sc, l_sh, l_sw, K,
                                         shift_ptr, jx, kb, q_lo, q_hi, t_lo, t_hi, NBF, N, Wd, BLOCK_C, BLOCK_K, BLOCK_N,
                                         X_MODE, CORR, PREC, DOT_F32, A_MERGED, L_MERGED, False, HAS_TAIL, SUM_DOT)
            else:
                xacc, xs_c = _cross_tile(a_ptr, a_sb, a_sc, a_sh, a_sw, C, l_ptr, l_sb, l_sc, l_sh, l_sw, K,
                                         shift_ptr, jx, kb, q_lo, q_hi, t_lo, t_hi, NBF, N, Wd, BLOCK_C, BLOCK_K, BLOCK_N,
                                         X_MODE, CORR, PREC, DOT_F32, A_MERGED, L_MERGED, True, HAS_TAIL, SUM_DOT)
        else:
            xacc, xs_c = _cross_tile(a_ptr, a_sb, a_sc, a_sh, a_sw, C, l_ptr, l_sb, l_sc, l_sh, l_sw, K,
                                     shift_ptr, jx, kb, q_lo, q_hi, t_lo, t_hi, NBF, N, Wd, BLOCK_C, BLOCK_K, BLOCK_N,
                                     X_MODE, CORR, PREC, DOT_F32, A_MERGED, L_MERGED, True, HAS_TAIL, SUM_DOT)
        if jx == 0:
            tl.store(sl_ptr + (p.to(tl.int64) * N_KB + kb) * BLOCK_K + kk, xs_c)
        tl.store(xout + rr[:, None] * BLOCK_K + kk[None, :], xacc)


@triton.jit
def _sum_partials(ptr, P, stride_p, offs):
    """Σ_p ptr[p·stride_p + offs] in float64, p = 0, 1, … in order (deterministic)."""
    tot = tl.zeros(offs.shape, dtype=tl.float64)
    for p in range(0, loop_bound(P)):
        tot += tl.load(ptr + tl.cast(p, tl.int64) * stride_p + offs).to(tl.float64)
    return tot


@triton.jit
def _moments_reduce_kernel(
    gpart_ptr, xpart_ptr, sa_ptr, sl_ptr, shift_ptr,
    amean_ptr, lmean_ptr, g_ptr, x_ptr,
    P, C, K, M,
    N_CB, N_GT, N_KB,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr,
    G_SHIFT: tl.constexpr, X_SHIFT: tl.constexpr,
):
    """Sum the P partials of tile t (float64, fixed order) and centre, with
    s_G, s_X, t_X the shifts the partial kernel used (shift = [s (C), t (K)],
    or 0 in raw mode 0):

        d_A = S₁(A)/M = Ā − s_G,   Ā = s_G + d_A,   L̄ = t_X + S₁(L)/M
        G_IJ    = S₂_IJ/M − d_A,I d_A,Jᵀ                 (stored to both triangles)
        Xᵀ_J,kb = S_X/M − (Ā_J − s_X,J)(L̄_kb − t_X,kb)ᵀ   (stored as X[j, c])
    The tile is processed ROWS rows at a time (float64 register pressure).
    """
    t = tl.program_id(0)
    Mf = tl.cast(M, tl.float64)
    rr = tl.arange(0, ROWS)
    if t < N_GT:
        i = t * 0
        rem = t
        while rem >= N_CB - i:
            rem -= N_CB - i
            i += 1
        j = i + rem
        cc = tl.arange(0, BLOCK_C)
        cj = j * BLOCK_C + cc
        d_j = _sum_partials(sa_ptr + j * BLOCK_C, P, N_CB * BLOCK_C, cc) / Mf
        for r0 in tl.static_range(0, BLOCK_C, ROWS):
            ri = i * BLOCK_C + r0 + rr
            s2 = _sum_partials(gpart_ptr + t.to(tl.int64) * BLOCK_C * BLOCK_C, P,
                               N_GT * BLOCK_C * BLOCK_C, (r0 + rr)[:, None] * BLOCK_C + cc[None, :])
            d_i = _sum_partials(sa_ptr + i * BLOCK_C + r0, P, N_CB * BLOCK_C, rr) / Mf
            g = (s2 / Mf - d_i[:, None] * d_j[None, :]).to(tl.float32)
            r2 = ri[:, None]
            c2 = cj[None, :]
            inb = (r2 < C) & (c2 < C)
            # upper triangle (r ≤ c) as computed, lower triangle mirrored: G bitwise symmetric
            tl.store(g_ptr + r2.to(tl.int64) * C + c2, g, mask=inb & (r2 <= c2))
            tl.store(g_ptr + c2.to(tl.int64) * C + r2, g, mask=inb & (r2 < c2))
            if i == j:
                a_bar = d_i
                if G_SHIFT:
                    a_bar += tl.load(shift_ptr + ri, mask=ri < C, other=0.0).to(tl.float64)
                tl.store(amean_ptr + ri, a_bar.to(tl.float32), mask=ri < C)
    else:
        u = t - N_GT
        jx = u // N_KB
        kb = u - jx * N_KB
        kk = tl.arange(0, BLOCK_K)
        kj = kb * BLOCK_K + kk
        d_l = _sum_partials(sl_ptr + kb * BLOCK_K, P, N_KB * BLOCK_K, kk) / Mf
        if jx == 0:
            l_bar = d_l
            if X_SHIFT:
                l_bar += tl.load(shift_ptr + C + kj, mask=kj < K, other=0.0).to(tl.float64)
            tl.store(lmean_ptr + kj, l_bar.to(tl.float32), mask=kj < K)
        for r0 in tl.static_range(0, BLOCK_C, ROWS):
            xcj = jx * BLOCK_C + r0 + rr
            xsx = _sum_partials(xpart_ptr + u.to(tl.int64) * BLOCK_C * BLOCK_K, P,
                               N_CB * N_KB * BLOCK_C * BLOCK_K, (r0 + rr)[:, None] * BLOCK_K + kk[None, :])
            xd_a = _sum_partials(sa_ptr + jx * BLOCK_C + r0, P, N_CB * BLOCK_C, rr) / Mf
            if G_SHIFT:
                xd_a += tl.load(shift_ptr + xcj, mask=xcj < C, other=0.0).to(tl.float64)  # Ā
            if X_SHIFT:
                xd_a -= tl.load(shift_ptr + xcj, mask=xcj < C, other=0.0).to(tl.float64)  # Ā − s_X
            xv = (xsx / Mf - xd_a[:, None] * d_l[None, :]).to(tl.float32)
            xc2 = xcj[:, None]
            xk2 = kj[None, :]
            tl.store(x_ptr + xk2.to(tl.int64) * C + xc2, xv, mask=(xc2 < C) & (xk2 < K))


# ----------------------------------------------------------------------------- plan and launch

_SIXTEEN = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Plan:
    """Launch configuration of the three moments kernels (see :func:`plan`)."""
    block_c: int
    block_k: int
    block_n: int
    splits: int                  # P, position ranges
    num_warps: int | None        # partial kernel (None: Triton's default)
    num_stages: int | None
    fp32_precision: str          # PREC of mode 2
    recenter_every: int          # R of mode 1 (0: mode 0)
    g_mode: int
    x_mode: int
    sum_by_dot: bool
    dot_f32: bool                # interpreter: bf16 dots widened to fp32
    block_s: int                 # shift kernel
    reduce_rows: int             # reduce kernel
    reduce_warps: int | None

    def counts(self, C: int, K: int) -> tuple[int, int, int, int]:
        """(channel blocks, logit blocks, Gram tiles, all tiles) for C channels and K logits."""
        return _tile_counts(C, K, self.block_c, self.block_k)


def _tile_counts(C: int, K: int, block_c: int, block_k: int) -> tuple[int, int, int, int]:
    n_cb = triton.cdiv(C, block_c)
    n_kb = triton.cdiv(K, block_k)
    n_gt = n_cb * (n_cb + 1) // 2
    return n_cb, n_kb, n_gt, n_gt + n_cb * n_kb


def plan(B: int, C: int, K: int, N: int, feats_dtype: torch.dtype, logits_dtype: torch.dtype,
         channels_last: bool, t: Target, *, block_c: int | None = None, block_n: int | None = None,
         splits: int | None = None, fp32_precision: str | None = None, num_warps: int | None = None,
         num_stages: int | None = None, recenter_every: int | None = None,
         sum_by_dot: bool | None = None, reduce_rows: int | None = None,
         reduce_warps: int | None = None) -> Plan:
    """The launch configuration for B images of N positions, C feature channels
    and K logits on ``t`` (B·N > 0); ``channels_last``: the channels of ``feats``
    are its contiguous axis. Keyword arguments force a choice (tuning knobs; see
    :func:`launch`). Defaults: GPU heuristics, small blocks under the interpreter.
    """
    interp = t == INTERPRETER
    sixteen = feats_dtype in _SIXTEEN
    mixed = sixteen and logits_dtype != feats_dtype  # 16-bit feats, fp32 (mode 2) cross term
    kind = mma_kind(t)
    # mma.sync / MFMA keep both dot operands and the accumulator in registers (wgmma reads
    # them from shared memory, tcgen05 accumulates in tensor memory): there the fp32
    # (tf32x3: hi/lo halves of both operands) and mixed tiles of 128 spill. Measured in
    # the offline compiles for each target (benchmarks/NOTES_aot.md, "Targets"). Those
    # plans need at most 80 KiB of shared memory (the sm_90 ones up to 192 KiB), so a
    # device with less than 192 KiB per block takes them whatever its MMA kind.
    in_regs = kind in ("mma", "mfma") or t.smem < 192 * 1024
    if block_c is None:
        if interp:
            block_c = min(32, max(16, next_pow2(C)))
        else:
            block_c = _pick_block_c(C)
            if channels_last and sixteen:
                # 128 spills on some Tritons (3.6, 3.8): kernels/_common.py:_SM90_CONFIG
                block_c = min(block_c, 64 if in_regs else sm90_config("moments_cl16_block_c"))
            if in_regs and (mixed or not sixteen):
                block_c = min(block_c, 64)
    if block_n is None:
        if interp:
            block_n = 16
        elif sixteen and not channels_last and kind in ("wgmma", "tcgen05") and not (mixed and kind == "tcgen05"):
            # BLOCK_C 64: the BLOCK_N without wgmma serialisation (C7515) depends on the Triton.
            # (tcgen05 mixed NCHW keeps 32: 64 spills 132 B; benchmarks/NOTES_aot.md, "Targets")
            block_n = sm90_config("moments_nchw16_bc64_block_n") if block_c == 64 else 64
        else:
            block_n = 32
    block_k = max(16, min(128 if not interp else 32, next_pow2(K)))
    if fp32_precision is None:
        fp32_precision = fp32_dot_precision(t)
    if recenter_every is None:
        recenter_every = 4
    raw = 1 if recenter_every > 0 else 0
    g_mode = raw if sixteen else 2
    x_mode = raw if (sixteen and logits_dtype == feats_dtype) else 2

    n_tiles = _tile_counts(C, K, block_c, block_k)[3]
    n_blocks = B * triton.cdiv(N, block_n)
    if splits is None:
        splits = 2 if interp else _pick_splits(n_tiles, n_blocks, t.sms)
    splits = max(1, min(int(splits), n_blocks))

    if num_warps is None and not interp:
        num_warps = 8 if block_c >= 128 else 4
        if kind == "mma" and channels_last and not sixteen:
            # fp32 channels_last at BLOCK_C 64: depends on the Triton (_common._MMA_CONFIG)
            num_warps = mma_config("moments_fp32_cl_num_warps")
    if num_stages is None and not interp:
        # shared memory per the sm_90 AOT compile (benchmarks/aot_moments.py,
        # no GPU here; limit 227 KiB): NCHW 3 stages: bf16 BLOCK_N 64 64 KiB,
        # fp32 BLOCK_N 32 128 KiB; channels_last: bf16 BLOCK_N 64 2 stages
        # 256 KiB (would not launch), BLOCK_N 32 3 stages 192 KiB; fp32
        # BLOCK_N 32 3 stages 256 KiB, 2 stages 160 KiB.
        num_stages = 2 if (channels_last and feats_dtype == torch.float32) else 3
    return Plan(
        block_c=block_c, block_k=block_k, block_n=block_n, splits=splits,
        num_warps=num_warps, num_stages=num_stages, fp32_precision=fp32_precision,
        recenter_every=int(recenter_every), g_mode=g_mode, x_mode=x_mode,
        # (on the tensor cores: a tl.sum there makes ptxas serialise wgmma; registers: plain sums)
        sum_by_dot=bool(sum_by_dot if sum_by_dot is not None else (channels_last and not in_regs)),
        dot_f32=bool(interp and feats_dtype == torch.bfloat16),
        block_s=16 if interp else 64,
        # ROWS (register tiling only; same sums): 32 for 128-wide tiles with BLOCK_K <= 64, else 16
        # (sm_90 ptxas: BLOCK_C 64 with ROWS 32 spills 12 B at 8 warps, ROWS 16 does not); on
        # mma.sync targets per Triton (_common._MMA_CONFIG)
        reduce_rows=reduce_rows or (16 if (interp or block_k > 64) else (32 if block_c >= 128 else (
            mma_config("moments_reduce_rows_bc64") if kind == "mma" else 16))),
        reduce_warps=reduce_warps or (None if interp else 8),  # 4 warps spill (float64 tile; sm_90 AOT)
    )


def launch(feats: torch.Tensor, class_logits: torch.Tensor, *, wrap=None, **knobs):
    """(Ā (C,), L̄ (K,), G (C, C), X (K, C)) float32 of design §2 (see module doc).

    ``feats`` (B, C, H, W) and ``class_logits`` (B, K, H, W) (also (B, C, N)
    or (B, C)) in float32/float16/bfloat16, any strides, dtypes may differ.
    ``knobs`` are :func:`plan`'s keyword arguments (tuning; ``splits`` is P,
    the number of position ranges; ``recenter_every`` is R of the 16-bit mode,
    0: mode 0). ``wrap`` is applied to every kernel before launch: pass
    ``torch.library.wrap_triton`` inside a ``torch.library.triton_op`` body so
    torch.compile traces the launches. Inputs are assumed validated
    (``debias_ops.validation``).
    """
    run = wrap if wrap is not None else (lambda kernel: kernel)
    B, C = feats.shape[:2]
    K = class_logits.shape[1]
    dev = feats.device
    N = 1
    for s in feats.shape[2:]:
        N *= s
    M = B * N
    f32 = torch.float32
    if M == 0:
        return (torch.zeros(C, dtype=f32, device=dev), torch.zeros(K, dtype=f32, device=dev),
                torch.zeros(C, C, dtype=f32, device=dev), torch.zeros(K, C, dtype=f32, device=dev))
    chan_contig = feats.stride(1) == 1 and C > 1  # channels_last-like
    P = plan(B, C, K, N, feats.dtype, class_logits.dtype, chan_contig, target(dev), **knobs)
    block_c, block_k, block_n, splits = P.block_c, P.block_k, P.block_n, P.splits
    n_cb, n_kb, n_gt, n_tiles = P.counts(C, K)
    nbf = N // block_n                  # full position blocks per image
    has_tail = N % block_n != 0         # plus one partial block per image
    q_total = B * nbf
    q_per = triton.cdiv(q_total, splits)   # full blocks per program (may be 0)
    t_per = triton.cdiv(B, splits)         # partial blocks (images) per program

    Ha, Wa, a_sh, a_sw, a_merged = _spatial(feats)
    Hl, Wl, l_sh, l_sw, l_merged = _spatial(class_logits)
    if not (a_merged and l_merged):
        # both views must split n the same way: use (H, W) for both
        W = feats.shape[3]
        Wd = W
        a_sh, a_sw, a_merged = feats.stride(2), feats.stride(3), False
        l_sh, l_sw, l_merged = class_logits.stride(2), class_logits.stride(3), False
    else:
        Wd = N

    gpart = torch.empty(splits * n_gt * block_c * block_c, dtype=f32, device=dev)
    xpart = torch.empty(splits * n_cb * n_kb * block_c * block_k, dtype=f32, device=dev)
    sa = torch.empty(splits * n_cb * block_c, dtype=f32, device=dev)
    sl = torch.empty(splits * n_kb * block_k, dtype=f32, device=dev)
    shift = torch.empty(C + K, dtype=f32, device=dev)
    block_s = P.block_s
    run(_shift_kernel)[(triton.cdiv(C, block_s) + triton.cdiv(K, block_s),)](
        feats, class_logits, shift, C, K, N, Wd,
        feats.stride(1), a_sh, a_sw, class_logits.stride(1), l_sh, l_sw,
        BLOCK_S=block_s, A_MERGED=a_merged, L_MERGED=l_merged,
    )
    opts = {}
    if P.num_warps is not None:
        opts["num_warps"] = P.num_warps
    if P.num_stages is not None:
        opts["num_stages"] = P.num_stages
    run(_moments_partial_kernel)[(n_tiles, splits)](
        feats, class_logits, gpart, xpart, sa, sl, shift,
        C, K, N, Wd, nbf, q_total, q_per, B, t_per,
        feats.stride(0), feats.stride(1), a_sh, a_sw,
        class_logits.stride(0), class_logits.stride(1), l_sh, l_sw,
        n_cb, n_gt, n_kb, C // block_c,
        BLOCK_C=block_c, BLOCK_K=block_k, BLOCK_N=block_n,
        G_MODE=P.g_mode, X_MODE=P.x_mode, CORR=max(1, P.recenter_every), PREC=P.fp32_precision,
        DOT_F32=P.dot_f32, A_MERGED=a_merged, L_MERGED=l_merged,
        SPLIT_FULL=bool(chan_contig and C % block_c != 0), HAS_TAIL=has_tail,
        SUM_DOT=P.sum_by_dot, **opts,
    )
    a_mean = torch.empty(C, dtype=f32, device=dev)
    l_mean = torch.empty(K, dtype=f32, device=dev)
    G = torch.empty(C, C, dtype=f32, device=dev)
    X = torch.empty(K, C, dtype=f32, device=dev)
    run(_moments_reduce_kernel)[(n_tiles,)](
        gpart, xpart, sa, sl, shift,
        a_mean, l_mean, G, X,
        splits, C, K, M,
        n_cb, n_gt, n_kb,
        BLOCK_C=block_c, BLOCK_K=block_k, ROWS=P.reduce_rows,
        G_SHIFT=P.g_mode > 0, X_SHIFT=P.x_mode > 0,
        **({} if P.reduce_warps is None else {"num_warps": P.reduce_warps}),
    )
    return a_mean, l_mean, G, X
