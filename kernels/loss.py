"""Fused DropClass loss (design §4): bilinear upsampling on the fly, weighted
masked cross-entropy on both branches, the suppression term, and the
gradients w.r.t. both low-resolution logits -- without ever materialising the
upsampled (B, K, H, W) logits or their gradient.

Notation: x = logits, x' = logits_drop, both (B, K, h, w); y = target (B, H, W);
d[b, k] = dropped (bool); wc = class weight (K,) (1 when absent).

Upsampling (align_corners=False, exactly ``F.interpolate(size=(H, W))``)::

    src(Y) = max(0, (Y + 0.5)·(h / H) − 0.5),  i0 = min(floor(src), h−1),
    i1 = min(i0 + 1, h − 1),  λ = clamp(src − i0, 0, 1)      (same for X → j0, j1, μ)
    up(x)[k, Y, X] = (1−λ)·[(1−μ)·x[k,i0,j0] + μ·x[k,i0,j1]] + λ·[(1−μ)·x[k,i1,j0] + μ·x[k,i1,j1]]

Loss (p = softmax over k at one pixel, P = (b, Y, X), u = up(x), u' = up(x'))::

    ω_P  = [y_P ≠ ignore] · wc[y_P]          ω'_P = ω_P · (1 − d[b, y_P])
    D    = Σ_P ω_P,   D' = Σ_P ω'_P,   nd = Σ_{b,k} d[b,k]
    CE   = Σ_P ω_P  (lse(u_P)  − u_P[y_P])  / (D  if D  > 0 else 1)
    CE'  = Σ_P ω'_P (lse(u'_P) − u'_P[y_P]) / (D' if D' > 0 else 1)
    sup  = Σ_{b,i,j} Σ_k d[b,k] softmax(x'[b,:,i,j])_k / (max(1, nd)·h·w)
    loss = lam·CE + (1 − lam)·CE' + alpha·sup

Gradients (computed in the forward; the loss is terminal)::

    ∂loss/∂u_P[k]  = lam/D · ω_P · (p_P[k] − [k = y_P])                       (same for u' with (1−lam)/D', ω')
    ∂loss/∂x[k,i,j] = Σ_P Wy[i, Y]·Wx[j, X] · ∂loss/∂u_P[k]                    (adjoint of the upsampling)
    ∂loss/∂x'[k,i,j] += alpha/(max(1,nd)·h·w) · q_k · (d[b,k] − Σ_m d[b,m] q_m),   q = softmax(x'[b,:,i,j])

Wy[i, Y] is (1−λ) when i = i0(Y), λ when i = i1(Y) (their sum when i0 = i1).

Work split (deterministic, no atomics): D, D' and nd depend only on the
labels, so a first cheap pass over the labels reduces them; the main kernel
then knows the normalisation and writes the final gradient. It runs once per
branch (BRANCH 0: CE on logits; BRANCH 1: CE' and the suppression term on
logits_drop) -- one program holding both branches needs ~255 registers and
spills, one branch fits in 128 on sm_90. A main program owns a block of
low-resolution columns [j_s, j_s+CB) and rows [i_s, i_s+RB) of one sample and
*gathers*: it walks the hi-res rows Y whose i0 lies in [i_s − 1, i_s + RB),
over the hi-res columns X whose j0 lies in [j_s − 1, j_s + CB) (BX lanes),
computes the softmax there once, and accumulates the gradient per hi-res
column for the current low-resolution row (Σ g) and, weighted by λ, for the
next one (Σ λg; row i gets Σ(1−λ)g = Σ g − Σ λg). The low-resolution rows i
and i1 are loaded once per i, already interpolated horizontally, so a hi-res
row costs one blend per element. When a low-resolution row is complete the
program applies the horizontal adjoint as one small matrix product
acc (KP × BX) · Wxᵀ (BX × CB), adds the suppression gradient, and stores the
row. Hi-res pixels on block borders are recomputed by the neighbouring
program (≈ (RB+1)/RB rows, BX/(CB·W/w) columns) but counted in the loss only
by their owner (i0 in the program's rows, j0 in its columns). All sums are
fp32 per program, then reduced in a fixed order by one program.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from . import _common
from ._common import INTERPRETER, Target, emulate_rtne_bf16, loop_bound, next_pow2, to_output

__all__ = ["Plan", "plan", "launch"]


# ----------------------------------------------------------------------------- index helpers

@triton.jit
def _src_coord(dst, scale):
    """Source coordinate max(0, (dst + 0.5)·scale − 0.5) of output index ``dst``."""
    return tl.maximum((tl.cast(dst, tl.float32) + 0.5) * scale - 0.5, 0.0)


@triton.jit
def _src_index(dst, scale, n_in):
    """(i0, i1, λ) of output index ``dst`` (int32) for bilinear, align_corners=False."""
    src = _src_coord(dst, scale)
    i0 = tl.minimum(src.to(tl.int32), n_in - 1)  # src >= 0: truncation is floor
    lam = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
    i1 = tl.minimum(i0 + 1, n_in - 1)
    return i0, i1, lam


@triton.jit
def _first_dst(i, scale, inv_scale, n_in, n_out):
    """Smallest output index Y in [0, n_out] with i0(Y) >= i (n_out when none).

    Inverse of the source-index formula, then corrected by one step either way
    with the exact forward formula so both sides agree bit for bit.
    """
    est = -tl.floor(-((tl.cast(i, tl.float32) + 0.5) * inv_scale - 0.5))  # ceil
    y = tl.minimum(tl.maximum(est, 0.0), n_out * 1.0).to(tl.int32)
    p0, _p1, _pl = _src_index(y - 1, scale, n_in)
    y = tl.where((y > 0) & (p0 >= i), y - 1, y)
    c0, _c1, _cl = _src_index(y, scale, n_in)
    y = tl.where((y < n_out) & (c0 < i), y + 1, y)
    y = tl.where(i <= 0, 0, y)
    y = tl.where(i >= n_in, n_out, y)
    return y


@triton.jit
def _ix(v, IDX64: tl.constexpr):
    """Offsets inside one sample: int32 (fewer registers) unless the host saw a sample span >= 2^31."""
    if IDX64:
        return v.to(tl.int64)
    else:
        return v


@triton.jit
def _hrow(ptr, base, koff, off0, off1, mu, m2, km):
    """Horizontally interpolated low-res row in log2 units, log2(e)·((1−μ)·x[:, j0] + μ·x[:, j1]),
    (KP, BX) fp32 (classes × hi-res columns); padded classes get −1e30 (finite, so
    any λ-blend of two rows stays finite, and exp2 of it is 0)."""
    LOG2E: tl.constexpr = 1.4426950408889634
    row = ptr + base  # scalar pointer; per-element offsets are added once
    a = tl.load(row + (off0[None, :] + koff), mask=m2, other=0.0).to(tl.float32)
    c = tl.load(row + (off1[None, :] + koff), mask=m2, other=0.0).to(tl.float32)
    v = ((1.0 - mu)[None, :] * a + mu[None, :] * c) * LOG2E
    return tl.where(km[:, None], v, -1.0e30)


# ----------------------------------------------------------------------------- pass 1: denominators

@triton.jit
def _loss_den_kernel(
    y_ptr, drop_ptr, wc_ptr, part_ptr,
    K, H, W, n_tiles,
    syb, syh, syw, sdb, sdk, swc,
    ignore_index,
    HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr, KP: tl.constexpr,
):
    """Per-program partial sums of D = Σ ω, D' = Σ ω' over BLOCK label pixels of
    sample b, and (tile 0 only) nd_b = Σ_k d[b, k]. part[b·n_tiles + t, 0:3]."""
    t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = t.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < tl.cast(H, tl.int64) * W
    Y = offs // W
    X = offs - Y * W
    lbl = tl.load(y_ptr + b * syb + Y * syh + X * syw, mask=m, other=0).to(tl.int32)
    valid = m & (lbl != ignore_index)
    yc = tl.where(valid, lbl, 0)
    if HAS_WEIGHT:
        wt = tl.load(wc_ptr + yc.to(tl.int64) * swc, mask=valid, other=0.0).to(tl.float32)
    else:
        wt = 1.0
    wt = tl.where(valid, wt, 0.0)
    hit = tl.load(drop_ptr + b * sdb + yc.to(tl.int64) * sdk, mask=valid, other=0)
    wtd = tl.where(hit != 0, 0.0, wt)
    kk = tl.arange(0, KP)
    dk = tl.load(drop_ptr + b * sdb + kk.to(tl.int64) * sdk, mask=kk < K, other=0)
    nd = tl.where(t == 0, tl.sum((dk != 0).to(tl.float32), axis=0), 0.0)
    row = (b * n_tiles + t) * 3
    tl.store(part_ptr + row, tl.sum(wt, axis=0))
    tl.store(part_ptr + row + 1, tl.sum(wtd, axis=0))
    tl.store(part_ptr + row + 2, nd)


# ----------------------------------------------------------------------------- pass 2: loss + gradients

@triton.jit
def _loss_main_kernel(
    x_ptr, y_ptr, drop_ptr, wc_ptr, den_ptr, g_ptr, part_ptr,
    K, h, w, H, W, CB, RB,
    sxb, sxk, sxh, sxw,
    syb, syh, syw,
    sgb, sgk, sgh, sgw,
    smb, smk, swc,
    scale_h, inv_scale_h, scale_w, inv_scale_w,
    coef, alpha, ignore_index,
    BRANCH: tl.constexpr, HAS_WEIGHT: tl.constexpr, NEED_G: tl.constexpr,
    KP: tl.constexpr, BX: tl.constexpr, CBP: tl.constexpr, IDX64: tl.constexpr, RTNE_BF16: tl.constexpr,
):
    """One (column block, row block, sample) of one branch of the fused loss; see the
    module docstring. BRANCH 0: CE on x = logits (coef = lam); BRANCH 1: CE' on
    x = logits_drop with the dropped classes' labels ignored (coef = 1 − lam), plus
    the suppression term on x (weight alpha).

    Writes ∂loss/∂x for its low-resolution pixels (final values, normalisation
    included; when NEED_G) and part[pid, 0:2] = (Σ ω·nll, Σ_pixels Σ_k d·q) over the
    pixels it owns (the second only for BRANCH 1).
    """
    LOG2E: tl.constexpr = 1.4426950408889634
    LN2: tl.constexpr = 0.6931471805599453
    pc = tl.program_id(0)
    pr = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    n_pc = tl.num_programs(0)
    n_pr = tl.num_programs(1)

    # normalisations (device scalars from pass 1)
    D = tl.load(den_ptr + BRANCH)
    c_ce = coef / tl.where(D > 0, D, 1.0)
    nd = tl.load(den_ptr + 2)
    c_sup = alpha / (tl.maximum(nd, 1.0) * h * w)

    # low-res block
    j_s = pc * CB
    j_e = tl.minimum(j_s + CB, w)
    i_s = pr * RB
    i_e = tl.minimum(i_s + RB, h)

    # hi-res columns whose j0 lies in [j_s - 1, j_e)
    X_lo = _first_dst(j_s - 1, scale_w, inv_scale_w, w, W)
    X_hi = _first_dst(j_e, scale_w, inv_scale_w, w, W)
    X = X_lo + tl.arange(0, BX)
    xm = X < X_hi
    # lanes take their j0 from the block bounds' side: a lane the bounds put in
    # [j_s − 1, j_e) stays there even if a contracted FMA rounds its own floor
    # differently (the weights are continuous, so this only moves a ~0 weight)
    src_x = _src_coord(X, scale_w)
    j0 = tl.minimum(tl.maximum(src_x.to(tl.int32), j_s - 1), j_e - 1)
    j0 = tl.minimum(tl.maximum(j0, 0), w - 1)
    mu = tl.minimum(tl.maximum(src_x - j0.to(tl.float32), 0.0), 1.0)
    j1 = tl.minimum(j0 + 1, w - 1)
    # loss ownership by bounds: blocks partition the hi-res columns exactly
    own_x = xm & (X >= _first_dst(j_s, scale_w, inv_scale_w, w, W))

    # tiles are (KP, BX): classes × hi-res columns, so the hi-res columns spread
    # over the lanes and per-pixel values are not replicated across them
    kk = tl.arange(0, KP)
    km = kk < K
    m2 = km[:, None] & xm[None, :]
    kx = (_ix(kk, IDX64) * sxk)[:, None]
    ox0 = _ix(j0, IDX64) * sxw
    ox1 = _ix(j1, IDX64) * sxw

    # horizontal adjoint Wxᵀ[X, j] for the block's low-res columns
    jj = j_s + tl.arange(0, CBP)
    jm = jj < j_e
    wxt = tl.where(j0[:, None] == jj[None, :], (1.0 - mu)[:, None], 0.0) \
        + tl.where(j1[:, None] == jj[None, :], mu[:, None], 0.0)
    wxt = tl.where(xm[:, None], wxt, 0.0)

    y_col = _ix(X, IDX64) * syw

    # running state
    i_first = tl.maximum(i_s - 1, 0)
    top = _hrow(x_ptr, b * sxb + tl.cast(i_first, tl.int64) * sxh, kx, ox0, ox1, mu, m2, km)
    carry = tl.zeros((KP, BX), dtype=tl.float32)
    num = tl.zeros((BX,), dtype=tl.float32)
    sup_acc = tl.zeros((CBP,), dtype=tl.float32)
    y_beg = _first_dst(i_first, scale_h, inv_scale_h, h, H)

    for i in range(loop_bound(i_first), loop_bound(i_e)):
        i1 = tl.minimum(i + 1, h - 1)
        bot = _hrow(x_ptr, b * sxb + tl.cast(i1, tl.int64) * sxh, kx, ox0, ox1, mu, m2, km)
        acc = carry
        carry = tl.zeros((KP, BX), dtype=tl.float32)
        y_end = _first_dst(i + 1, scale_h, inv_scale_h, h, H)
        own = (own_x & ((X * 0 + i) >= i_s)).to(tl.float32)
        same = i1 == i
        for Y in range(loop_bound(y_beg), loop_bound(y_end)):
            # weight λ of row i1 (0 when i1 = i: then row i takes all of it)
            lmb = tl.minimum(tl.maximum(_src_coord(Y, scale_h) - tl.cast(i, tl.float32), 0.0), 1.0)
            lmb = tl.where(same, 0.0, lmb)
            lbl = tl.load((y_ptr + (b * syb + tl.cast(Y, tl.int64) * syh)) + y_col, mask=xm, other=0).to(tl.int32)
            valid = xm & (lbl != ignore_index)
            yc = tl.where(valid, lbl, 0)
            if HAS_WEIGHT:
                wt = tl.load(wc_ptr + yc.to(tl.int64) * swc, mask=valid, other=0.0).to(tl.float32)
                wt = tl.where(valid, wt, 0.0)
            else:
                wt = valid.to(tl.float32)
            if BRANCH == 1:  # y_drop: labels of the sample's dropped classes are ignored
                hit = tl.load(drop_ptr + b * smb + yc.to(tl.int64) * smk, mask=valid, other=0)
                wt = tl.where(hit != 0, 0.0, wt)
            onehot = kk[:, None] == yc[None, :]

            z = top + lmb * (bot - top)  # up(x) at the hi-res pixels of row Y, in log2 units
            zmax = tl.max(z, axis=0)
            e = tl.exp2(z - zmax[None, :])
            ssum = tl.sum(e, axis=0)
            zy = tl.sum(tl.where(onehot, z, 0.0), axis=0)
            num += own * wt * ((zmax + tl.log2(ssum) - zy) * LN2)
            if NEED_G:
                cw = wt * c_ce
                g = e * (cw / ssum)[None, :] - tl.where(onehot, cw[None, :], 0.0)
                acc += g  # row i gets Σ(1−λ)g = acc − carry at the flush
                carry += lmb * g

        # low-res row i is complete (when it is one of ours): horizontal adjoint + store
        row_ok = (jj * 0 + i) >= i_s  # (CBP,) vector: scalar bools mix badly with masks in the interpreter
        sm = km[:, None] & (jm & row_ok)[None, :]
        if NEED_G:
            gr = tl.dot(acc - carry, wxt, input_precision="ieee")  # (KP, CBP)
        if BRANCH == 1:
            # suppression term on the low-resolution logits_drop of row i
            xl = tl.load((x_ptr + (b * sxb + tl.cast(i, tl.int64) * sxh)) + (kx + _ix(jj, IDX64)[None, :] * sxw),
                         mask=km[:, None] & jm[None, :], other=0.0).to(tl.float32)
            xl = tl.where(km[:, None], xl, float("-inf"))
            qe = tl.exp2((xl - tl.max(xl, axis=0)[None, :]) * LOG2E)
            q = qe / tl.sum(qe, axis=0)[None, :]
            dvec = (tl.load(drop_ptr + b * smb + kk.to(tl.int64) * smk, mask=km, other=0) != 0).to(tl.float32)
            dq = tl.sum(q * dvec[:, None], axis=0)
            sup_acc += tl.where(jm & row_ok, dq, 0.0)
            if NEED_G:
                gr += c_sup * q * (dvec[:, None] - dq[None, :])
        if NEED_G:
            g_off = (_ix(kk, IDX64) * sgk)[:, None] + _ix(jj, IDX64)[None, :] * sgw
            tl.store((g_ptr + (b * sgb + tl.cast(i, tl.int64) * sgh)) + g_off, to_output(gr, g_ptr.dtype.element_ty, RTNE_BF16), mask=sm)
        top = bot
        y_beg = y_end

    pid = (b * n_pr + pr) * n_pc + pc
    tl.store(part_ptr + pid * 2, tl.sum(num, axis=0))
    tl.store(part_ptr + pid * 2 + 1, tl.sum(sup_acc, axis=0))


# ----------------------------------------------------------------------------- pass 3: totals

@triton.jit
def _loss_final_kernel(part0_ptr, part1_ptr, den_ptr, out_ptr, n_part, h, w, lam, alpha, BLOCK: tl.constexpr):
    """out = (loss, CE, CE', sup) from both branches' partials ((n_part, 2) each),
    summed in a fixed order."""
    acc0 = tl.zeros((BLOCK,), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK,), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, loop_bound(n_part), BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n_part
        acc0 += tl.load(part0_ptr + offs * 2, mask=m, other=0.0)
        acc1 += tl.load(part1_ptr + offs * 2, mask=m, other=0.0)
        acc2 += tl.load(part1_ptr + offs * 2 + 1, mask=m, other=0.0)
    D = tl.load(den_ptr)
    Dd = tl.load(den_ptr + 1)
    nd = tl.load(den_ptr + 2)
    ce = tl.sum(acc0, axis=0) / tl.where(D > 0, D, 1.0)
    ced = tl.sum(acc1, axis=0) / tl.where(Dd > 0, Dd, 1.0)
    sup = tl.sum(acc2, axis=0) / (tl.maximum(nd, 1.0) * h * w)
    loss = lam * ce + (1.0 - lam) * ced + alpha * sup
    tl.store(out_ptr, loss)
    tl.store(out_ptr + 1, ce)
    tl.store(out_ptr + 2, ced)
    tl.store(out_ptr + 3, sup)


# ----------------------------------------------------------------------------- launch

# Tests may set entries here (monkeypatch) to force block sizes: fields of ``Plan``
# (and IDX64: force int64 offsets).
PLAN_OVERRIDE: dict = {}


class Plan(NamedTuple):
    """Launch configuration of the main kernel."""
    KP: int                  # classes, padded to a power of two
    BX: int                  # hi-res column lanes
    CB: int                  # low-res columns per program
    CBP: int                 # CB padded to a power of two
    RB: int                  # low-res rows per program
    num_warps: int
    maxnreg: Optional[int]   # register cap (NVIDIA only; None: ptxas chooses)


def plan(K: int, h: int, w: int, H: int, W: int, t: Target) -> Plan:
    """Block sizes of the main kernel on ``t`` (host-side, from shapes only).

    BX hi-res column lanes must hold every X with j0 in [j_s − 1, j_s + CB):
    at most (CB + 1)·W/w + 2 of them, so CB = floor((BX − 4)·w/W − 0.5) − 1.
    Under the interpreter the blocks are small so that tiny test shapes still
    span several row and column blocks (their borders are the tricky part).
    """
    interpret = t == INTERPRETER
    KP = max(16, next_pow2(K))
    sx = w / W
    if interpret:
        BX = 16
    else:
        BX = 64 if KP <= 32 else (32 if KP <= 64 else 16)
    BX = max(BX, next_pow2(math.ceil(4.0 / sx) + 5))
    if "BX" in PLAN_OVERRIDE:
        BX = max(PLAN_OVERRIDE["BX"], next_pow2(math.ceil(4.0 / sx) + 5))
    CB = int(math.floor((BX - 4) * sx - 0.5)) - 1
    CB = max(1, min(CB, 3 if interpret else 64, w, PLAN_OVERRIDE.get("CB", 64)))
    CBP = max(16, next_pow2(CB))
    RB = PLAN_OVERRIDE.get("RB", 3 if interpret else 8)
    RB = max(1, min(RB, h))
    # 4 fp32 (KP, BX) tiles live across the row loop (top, bot, acc, carry). At 8 warps
    # for (32, 64) ptxas takes 148-218 registers (Triton 3.9 / 3.6), and capped at 128
    # (two programs per SM) it spilled 20-52 B (3.9), 0-8 B (3.8), 72-276 B (3.6). At 16
    # warps each thread holds half of each tile: 85-98 (3.8, 3.9) / 114-128 (3.6)
    # registers, no spill on any (sm_90 compiles, benchmarks/NOTES_aot.md), and one
    # 16-warp program per SM keeps the 16 resident warps of two 8-warp ones (maxnreg 128
    # below is then the most a 16-warp program can have anyway).
    num_warps = PLAN_OVERRIDE.get("num_warps", 4 if BX * KP <= 1024 else (16 if BX * KP <= 2048 else 8))
    # (large K: tiles this big spill anyway, let ptxas choose)
    maxnreg = PLAN_OVERRIDE.get("maxnreg", 128 if BX * KP <= 2048 and t.backend == "cuda" else None)
    return Plan(KP=KP, BX=BX, CB=CB, CBP=CBP, RB=RB, num_warps=num_warps, maxnreg=maxnreg)


def _traced(wrap) -> bool:
    """Whether wrap_triton is turning launches into graph nodes (torch.compile / export)."""
    if wrap is None:
        return False
    try:
        from torch._library.triton import is_wrap_triton_enabled
    except ImportError:  # pragma: no cover - older torch
        return torch.compiler.is_compiling()
    return bool(is_wrap_triton_enabled()) or torch.compiler.is_compiling()


def _needs_int64(*tensors) -> bool:
    """Whether an offset inside one sample (all dims but the batch) can reach 2^31."""
    span = max(sum((n - 1) * abs(st) for n, st in zip(t.shape[1:], t.stride()[1:])) for t in tensors)
    return span + 64 >= 2 ** 31


def launch(logits, logits_drop, target, dropped, weight, lam: float, alpha: float,
           ignore_index: int, need_gx: bool, need_gxd: bool, gx, gxd, wrap=None):
    """Run the three passes; returns stats (4,) fp32 = (loss, CE, CE', sup).

    ``gx`` / ``gxd``: preallocated gradient outputs (any strides; ignored when the
    matching need flag is False). ``wrap``: ``torch.library.wrap_triton`` or None.
    Nothing here reads a tensor value on the host.
    """
    B, K, h, w = logits.shape
    H, W = target.shape[1:]
    dev = logits.device
    t = _common.target(dev)
    interpret = t == INTERPRETER
    P = plan(K, h, w, H, W, t)
    W_ = (lambda k: k) if wrap is None else wrap
    drop_u8 = dropped.view(torch.uint8) if dropped.dtype == torch.bool else dropped
    wc = weight if weight is not None else logits  # dummy pointer when absent
    swc = weight.stride(0) if weight is not None else 0

    # pass 1: D, D', nd
    BLOCK = 1024 if not interpret else 4096
    n_tiles = max(1, triton.cdiv(H * W, BLOCK))
    den_part = torch.empty((B * n_tiles, 3), dtype=torch.float32, device=dev)
    if B > 0:
        W_(_loss_den_kernel)[(n_tiles, B)](
            target, drop_u8, wc, den_part, K, H, W, n_tiles,
            target.stride(0), target.stride(1), target.stride(2),
            drop_u8.stride(0), drop_u8.stride(1), swc, ignore_index,
            HAS_WEIGHT=weight is not None, BLOCK=BLOCK, KP=P.KP,
        )
    den = den_part.sum(dim=0)

    # pass 2: loss partials and gradients, one launch per branch (halves the live
    # registers of a program; the second launch finds most labels in L2)
    n_pc = triton.cdiv(w, P.CB)
    n_pr = triton.cdiv(h, P.RB)
    n_part = B * n_pr * n_pc
    alloc = torch.empty if n_part > 0 else torch.zeros  # every program writes its row
    parts = [alloc((max(n_part, 1), 2), dtype=torch.float32, device=dev) for _ in range(2)]
    extra = {}
    if P.maxnreg is not None and not _traced(wrap):
        extra["maxnreg"] = P.maxnreg  # not a launch option wrap_triton forwards when traced
    if n_part > 0:
        for branch, x, g, need, coef in ((0, logits, gx, need_gx, lam), (1, logits_drop, gxd, need_gxd, 1.0 - lam)):
            g_ = g if need else x
            W_(_loss_main_kernel)[(n_pc, n_pr, B)](
                x, target, drop_u8, wc, den, g_, parts[branch],
                K, h, w, H, W, P.CB, P.RB,
                *x.stride(), *target.stride(), *g_.stride(),
                drop_u8.stride(0), drop_u8.stride(1), swc,
                float(h) / H, float(H) / h, float(w) / W, float(W) / w,
                float(coef), float(alpha), int(ignore_index),
                BRANCH=branch, HAS_WEIGHT=weight is not None, NEED_G=bool(need),
                KP=P.KP, BX=P.BX, CBP=P.CBP, IDX64=bool(PLAN_OVERRIDE.get("IDX64")) or _needs_int64(x, target, g_),
                RTNE_BF16=bool(need) and emulate_rtne_bf16(g_.dtype),
                num_warps=P.num_warps, **extra,
            )

    # pass 3: totals
    stats = torch.empty(4, dtype=torch.float32, device=dev)
    W_(_loss_final_kernel)[(1,)](parts[0], parts[1], den, stats, max(n_part, 1), h, w, float(lam), float(alpha), BLOCK=256)
    return stats
