"""Parity of the batch-moments kernel (kernels/moments.py) with the reference.

The kernel returns (Ā, L̄, G, X) in float32; the expected values are
``reference.batch_moments`` computed in float64 from the *same* (already
rounded) inputs, so the only error allowed is the kernel's fp32 accumulation
(16-bit products are exact in fp32; fp32 inputs use tf32x3/ieee dots).
Run on CPU under the interpreter:
    TRITON_INTERPRET=1 DEBIAS_OPS_BACKEND=triton pytest -m kernel tests/test_kernels_moments.py
"""
from __future__ import annotations

import os

import pytest
import torch

from debias_ops import reference as ref
from tests.helpers import assert_close, kernel_device, make_layout

pytestmark = pytest.mark.kernel

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _moments_module():
    from debias_ops.kernels import moments
    return moments


def _inputs(B, C, K, H, W, a_dtype, l_dtype, device, *, mean=0.0, std=1.0):
    """Features with channel correlations and logits from a linear head plus noise."""
    mix = torch.randn(C, C) / max(C, 1) ** 0.5 + torch.eye(C)
    a = torch.einsum("dc,bdhw->bchw", mix, torch.randn(B, C, H, W)) * std + mean
    w = torch.randn(K, C)
    l = torch.einsum("kc,bchw->bkhw", w, a - mean) + 0.5 * torch.randn(B, K, H, W)
    return a.to(a_dtype).to(device), l.to(l_dtype).to(device)


def _expected(a, l):
    return ref.batch_moments(a.detach().double(), l.detach().double())


# fp32 accumulation of O(1) data over ≤ ~1000 positions (products exact for
# 16-bit inputs, ≤ 2^-21 relative for tf32x3): entries are off by ≲ 1e-6 of
# the largest |entry|; 2e-5 relative / 2e-6·scale absolute leaves a margin of
# ~10× yet catches a wrong centring, a dropped block or a swapped stride.
RTOL = 2e-5


def _check(out, exp, what=""):
    names = ("a_mean", "l_mean", "G", "X")
    for o, e, n in zip(out, exp, names):
        assert o.dtype == torch.float32, f"{n}: dtype {o.dtype}"
        scale = max(1.0, float(e.abs().max())) if e.numel() else 1.0
        assert_close(o, e, rtol=RTOL, atol=2e-6 * scale, name=f"{n}{what}")


SHAPES = [  # (B, C, K, H, W)
    (2, 1, 2, 3, 3),     # C = 1
    (2, 7, 3, 5, 3),     # C < 16: padded channel block
    (3, 17, 19, 4, 5),   # C just over a block, K = 19 (Cityscapes)
    (1, 37, 5, 1, 1),    # N = 1, B·N < C
    (2, 37, 2, 7, 9),    # M = 126, not a multiple of the position block
]
DTYPES = [(F32, F32), (BF16, BF16), (F16, F16), (BF16, F32), (F32, F16), (F16, BF16)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{str(d[0])[6:]}-{str(d[1])[6:]}")
def test_moments_shapes_dtypes(shape, dtypes):
    dev = kernel_device()
    mm = _moments_module()
    a, l = _inputs(*shape, *dtypes, dev)
    _check(mm.launch(a, l), _expected(a, l))


@pytest.mark.parametrize("a_layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("l_layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtypes", [(F32, F32), (BF16, BF16), (F16, F32)], ids=["f32", "bf16", "f16-f32"])
def test_moments_layouts(a_layout, l_layout, dtypes):
    dev = kernel_device()
    mm = _moments_module()
    a, l = _inputs(2, 19, 4, 5, 6, *dtypes, dev)
    a_l, l_l = make_layout(a, a_layout), make_layout(l, l_layout)
    a0, l0 = a_l.clone(), l_l.clone()
    _check(mm.launch(a_l, l_l), _expected(a, l))
    assert torch.equal(a_l, a0) and torch.equal(l_l, l0), "inputs were modified"


def test_moments_unmergeable_spatial_view():
    """H and W that do not merge into one strided axis (a crop of a wider map)."""
    dev = kernel_device()
    mm = _moments_module()
    a, l = _inputs(2, 9, 3, 5, 8, F32, BF16, dev)
    a_c, l_c = a[:, :, 1:, :5], l[:, :, 1:, :5]
    assert a_c.stride(2) != a_c.shape[3] * a_c.stride(3)
    _check(mm.launch(a_c, l_c), _expected(a_c, l_c))
    a_cl = a.contiguous(memory_format=torch.channels_last)[:, :, :4, 2:7]
    _check(mm.launch(a_cl, l[:, :, :4, 2:7]), _expected(a_cl, l[:, :, :4, 2:7]))


@pytest.mark.parametrize("kw", [
    dict(block_c=16, splits=1),                     # 3 channel blocks: 6 Gram tiles, one range
    dict(block_c=16, splits=7, recenter_every=1),   # many ranges, re-centre every block
    dict(block_c=16, block_n=32, splits=3, recenter_every=3),
    dict(recenter_every=0),                         # raw 16-bit accumulation, centred in the reduce
], ids=["bc16-p1", "bc16-p7-r1", "bc16-bn32-p3-r3", "r0"])
@pytest.mark.parametrize("dtypes", [(F32, F32), (BF16, BF16), (F16, F16)], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_moments_tilings(kw, dtypes, layout):
    """Several channel blocks (full ones load unmasked when channels are
    contiguous), several position ranges, several class blocks."""
    dev = kernel_device()
    mm = _moments_module()
    a, l = _inputs(3, 37, 37, 5, 7, *dtypes, dev)  # K = 37: two class blocks of the cross term
    a, l = make_layout(a, layout), make_layout(l, layout)
    out = mm.launch(a, l, **kw)
    _check(out, _expected(a, l), f" {kw}")
    G = out[2]
    assert torch.equal(G, G.T), "G must be exactly symmetric"


@pytest.mark.parametrize("dtypes", [(F32, F32), (BF16, F16)], ids=["f32", "bf16-f16"])
def test_moments_empty_batch(dtypes):
    dev = kernel_device()
    mm = _moments_module()
    a, l = _inputs(0, 5, 3, 4, 4, *dtypes, dev)
    out = mm.launch(a, l)
    for o, shp in zip(out, [(5,), (3,), (5, 5), (3, 5)]):
        assert o.shape == shp and o.dtype == torch.float32 and not bool(o.any())


@pytest.mark.parametrize("dtypes", [(F32, F32), (BF16, BF16), (F16, F32)], ids=["f32", "bf16", "f16-f32"])
def test_moments_deterministic(dtypes):
    dev = kernel_device()
    mm = _moments_module()
    a, l = _inputs(3, 21, 5, 6, 7, *dtypes, dev)
    first = mm.launch(a, l, block_c=16, splits=5)
    again = mm.launch(a, l, block_c=16, splits=5)
    for x, y in zip(first, again):
        assert torch.equal(x, y), "two runs differ: the reduction is not deterministic"


def _rel(x, y):
    return float((x.double() - y).norm() / y.norm())


def _naive_gram(a):
    """One-pass fp32 E[AAᵀ] − ĀĀᵀ: the cancellation the kernel must avoid."""
    C = a.shape[1]
    A = a.detach().transpose(0, 1).reshape(C, -1).float()
    mu = A.mean(dim=1)
    return (A @ A.T) / A.shape[1] - torch.outer(mu, mu)


# Features of mean 10, std 1 (|μ| ≫ σ): relative (Frobenius) error of G and
# of S = importance_from_moments(G, X) against float64 from the same inputs.
# Bounds: fp32 inputs are shifted (mean of 16 samples) before the dot, so
# only u·(1 + (μ−s)²/σ²) ≈ 1e-7 remains (measured 6e-8 under the
# interpreter; tf32x3 on a GPU adds ≈ 2⁻²¹ ≈ 5e-7); bf16 values near 10 are
# multiples of 1/16, so every partial sum is exact (measured 2e-8); fp16
# keeps exact products but in-block sums are rounded at the scale of μ² = 100,
# ≈ u·μ²/σ² per block (measured 1.1e-5). The naive one-pass fp32 formula is
# off by 2.5e-5–6e-5 here, so each bound below fails it.
LARGE_MEAN_TOL = {F32: 3e-6, BF16: 3e-6, F16: 2.5e-5}


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=["f32", "bf16", "f16"])
def test_moments_large_mean(dtype):
    dev = kernel_device()
    mm = _moments_module()
    torch.manual_seed(0)
    B, C, K, H, W = 2, 24, 5, 16, 32
    a = (10.0 + torch.randn(B, C, H, W)).to(dtype)
    w = torch.randn(K, C)
    l = (torch.einsum("kc,bchw->bkhw", w, a.float()) + 0.1 * torch.randn(B, K, H, W)).to(dtype)
    a, l = a.to(dev), l.to(dev)
    _, _, G, X = mm.launch(a, l)
    _, _, Ge, Xe = _expected(a, l)
    tol = LARGE_MEAN_TOL[dtype]
    err_g, err_x = _rel(G, Ge), _rel(X, Xe)
    err_s = _rel(ref.importance_from_moments(G.double(), X.double()), ref.importance_from_moments(Ge, Xe))
    assert err_g < tol, f"G relative error {err_g:.2e} ≥ {tol:.0e}"
    assert err_x < tol, f"X relative error {err_x:.2e} ≥ {tol:.0e}"
    assert err_s < 2 * tol, f"S relative error {err_s:.2e} ≥ {2 * tol:.0e}"
    # the test can fail: the naive one-pass formula misses the G bound here
    assert _rel(_naive_gram(a.cpu()), Ge.cpu()) > tol


# ----------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(12, 270, 19, 128, 256), (8, 720, 19, 128, 256)], ids=["W18s", "W48"])
@pytest.mark.parametrize("dtype", [BF16, F32], ids=["bf16", "f32"])
@pytest.mark.parametrize("data", ["relu", "offset"])
def test_moments_gpu_full_size(shape, dtype, data):
    """Real shapes on the GPU vs float64. Post-ReLU features (mean ~ std) and
    offset features (mean 10, std 1). Tolerance: relative Frobenius error of G
    and X ≤ 2e-5 — fp32 accumulation over M = 262144–393216 positions split
    into ranges summed in float64 (≈ u·√(r/P)·(1 + μ²/σ²) ≲ 1e-5 for bf16 with
    re-centring, ≈ 2⁻²¹ for fp32 via tf32x3; plain TF32 (2⁻¹¹) would fail)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    mm = _moments_module()
    B, C, K, H, W = shape
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    z = torch.randn(B, C, H, W, device=dev, generator=g)
    a = torch.relu(z + 0.3) if data == "relu" else z + 10.0
    w = torch.randn(K, C, device=dev, generator=g) / C ** 0.5
    l = torch.einsum("kc,bchw->bkhw", w, a) + torch.randn(B, K, H, W, device=dev, generator=g)
    a, l = a.to(dtype), l.to(dtype)
    del z
    out = mm.launch(a, l)
    exp = _expected(a, l)
    for o, e, n in zip(out, exp, ("a_mean", "l_mean", "G", "X")):
        err = _rel(o, e)
        assert err < 2e-5, f"{n}: relative error {err:.2e}"
    out2 = mm.launch(a, l)
    for x, y in zip(out, out2):
        assert torch.equal(x, y)


def test_moments_wrap_triton():
    """The launches go through ``wrap`` (torch.library.wrap_triton inside a
    triton_op); eagerly it runs the same kernels."""
    dev = kernel_device()
    mm = _moments_module()
    wrap_triton = getattr(torch.library, "wrap_triton", None)
    if wrap_triton is None:
        pytest.skip("torch.library.wrap_triton needs torch >= 2.6")
    a, l = _inputs(2, 9, 3, 4, 5, BF16, F32, dev)
    try:
        out = mm.launch(a, l, wrap=wrap_triton)
    except RuntimeError as e:  # torch 2.11's wrap_triton takes only triton.jit / autotune objects
        if os.environ.get("TRITON_INTERPRET") != "1" or "only works on functions annotated" not in str(e):
            raise
        pytest.skip(f"torch {torch.__version__}: wrap_triton rejects the Triton interpreter's kernel objects "
                    "(the library launches them unwrapped under the interpreter)")
    _check(out, _expected(a, l))


@pytest.mark.gpu
def test_moments_gpu_int64_offsets():
    """Image 1 lies 2³¹ elements past image 0 in one storage: 32-bit offsets
    would wrap and read image 0 (or fault)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    mm = _moments_module()
    dev = torch.device("cuda")
    B, C, K, H, W = 2, 24, 5, 16, 16
    big = 2 ** 31
    try:
        store_a = torch.zeros(big + C * H * W, dtype=BF16, device=dev)
    except torch.OutOfMemoryError:
        pytest.skip("needs 4 GiB of free GPU memory")
    a = store_a.as_strided((B, C, H, W), (big, H * W, W, 1))
    a.copy_(torch.randn(B, C, H, W, device=dev).to(BF16) + 2.0)
    l = torch.randn(B, K, H, W, device=dev)
    exp = _expected(a, l)
    _check(mm.launch(a, l), exp)
    del store_a
