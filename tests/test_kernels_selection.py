"""Fused suppress / class_drop / class_importance (design §2, §3) vs the reference.

Kernel tests (``@pytest.mark.kernel``) run on ``kernel_device()``: CPU under the
Triton interpreter in CI (tiny shapes), or a GPU. GPU-only tests
(``@pytest.mark.gpu``) cover torch.compile of the Triton path, CUDA graphs,
opcheck on CUDA, peak memory and > 2^31-element tensors. The CPU tests at the
end (no marker) check torch.compile(fullgraph=True) and opcheck through the
reference branch of the registered ops (design §9).

Tolerances: outputs and dA are products A·g / dOut·g computed in float32 and
cast once, so they match the reference to the dtype's ``TOL`` (one rounding of
the cast; a bf16 store may round one ulp differently, design §9). Reductions
(dg, dW, the moments) are float32 sums in another order than PyTorch's; each
such tolerance is explained where it is used.

Top-k ties: the fused importance S may differ from the reference S by rounding,
so channels near-tied at the k-th boundary could swap. The suppress tests
therefore either (a) compare against the reference gate built from the *fused*
S (``class_importance`` is deterministic, so suppress uses the same S), or (b)
use planted inputs whose importances have clear gaps at every top-k boundary.
"""
import os

import pytest
import torch

import debias_ops as dops
from debias_ops import reference as ref

from .helpers import assert_close, cuda_device, kernel_device, make_layout
from .helpers import check_class_drop as _check_class_drop
from .helpers import check_suppress_gate_level as _check_suppress_gate_level
from .helpers import clone_leaf as _clone_leaf
from .helpers import close_on_device as _close_on_device
from .helpers import dg_scale as _dg_scale
from .helpers import drop_of_form as _drop

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# "cropped" is a view whose H and W do not merge into one stride (the kernel's
# unmerged (n // W, n % W) addressing); the others merge (NCHW, NHWC, step-sliced).
LAYOUTS = ["contiguous", "channels_last", "strided", "cropped"]
DT = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}

# (B, C, H, W): C and N not powers of two, N = 1, B·N < C, several channel
# blocks (C = 37 > 32 = the interpreter's BLOCK_C) and position chunks (N = 63).
SHAPES = [(2, 7, 3, 5), (3, 37, 1, 1), (1, 37, 2, 3), (2, 5, 7, 9)]


def _layout(x, layout):
    if layout == "cropped":
        B, C, H, W = x.shape
        wide = torch.zeros(B, C, H + 1, W + 2, dtype=x.dtype, device=x.device)
        wide[:, :, 1:, 2:] = x
        return wide[:, :, 1:, 2:]
    if x.numel() == 0 and layout == "strided":  # make_layout asserts non-contiguity, which an empty view lacks
        return torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)[..., ::2]
    return make_layout(x, layout)


def _feats(shape, dtype, layout, device, requires_grad=True):
    x = _layout(torch.randn(*shape, device=device).to(dtype), layout)
    return x.requires_grad_(requires_grad)


def _k(k, C):
    return {"none": None, "one": 1, "mid": max(1, C // 2), "all": C}[k]


def _assert_out_and_grads(out, exp, feats, f2, weight, w2, grad, suffix=""):
    """The fused out, dA and dW against the reference's (dW's atol: see _dg_scale)."""
    assert_close(out, exp, name="out" + suffix)
    assert_close(feats.grad, f2.grad, name="dA" + suffix)
    assert_close(weight.grad, w2.grad, atol=1e-5 * _dg_scale(feats, grad), name="dW" + suffix)


# ----------------------------------------------------------------------------- class_drop

@pytest.mark.kernel
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=DT.get)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_class_drop_shapes_dtypes_layouts(shape, dtype, layout):
    device = kernel_device()
    B, C = shape[:2]
    K = 3
    # cycle k and drop forms through the grid so every value appears with every dtype
    i = SHAPES.index(shape) + LAYOUTS.index(layout)
    k = _k(["none", "one", "mid", "all"][i % 4], C)
    drop = _drop(["none", "int", "long", "mask", "all"][(i + DTYPES.index(dtype)) % 5], B, K, device)
    feats = _feats(shape, dtype, layout, device)
    weight = torch.randn(K, C, device=device, requires_grad=True)
    for grad_kind in ("random", "sum"):
        feats.grad = None
        weight.grad = None
        _check_class_drop(feats, weight, k, drop, device, grad_kind)


@pytest.mark.kernel
@pytest.mark.parametrize("k", ["none", "one", "mid", "all"])
@pytest.mark.parametrize("drop", ["none", "int", "long", "mask", "all"])
def test_class_drop_k_and_drop_forms(k, drop):
    device = kernel_device()
    shape, K = (3, 11, 2, 3), 4
    feats = _feats(shape, torch.float32, "contiguous", device)
    weight = torch.randn(K, 11, 1, 1, device=device, requires_grad=True)  # (K, C, 1, 1) form
    _check_class_drop(feats, weight, _k(k, 11), _drop(drop, 3, K, device), device, "random")


@pytest.mark.kernel
@pytest.mark.parametrize("which", ["feats_only", "weight_only", "half_weight"])
def test_class_drop_partial_requires_grad(which):
    """Only dA (weight frozen), only dW (frozen feats: the pass writes no dA),
    and a float16 weight with float32 feats (mixed dtypes, dW in float16)."""
    device = kernel_device()
    feats = _feats((2, 9, 3, 4), torch.float32, "channels_last", device, requires_grad=which != "weight_only")
    weight = torch.randn(3, 9, device=device, dtype=torch.float16 if which == "half_weight" else torch.float32)
    weight.requires_grad_(which != "feats_only")
    _check_class_drop(feats, weight, 4, 1, device, "random")


@pytest.mark.kernel
def test_class_drop_empty_batch_and_grad_layouts():
    device = kernel_device()
    feats = _feats((0, 7, 3, 5), torch.float32, "contiguous", device)
    weight = torch.randn(3, 7, device=device, requires_grad=True)
    out = dops.class_drop(feats, weight, 2)
    assert out.shape == feats.shape
    out.sum().backward()
    assert feats.grad.shape == feats.shape
    assert_close(weight.grad, torch.zeros_like(weight), name="dW (B=0)")
    # dOut in a generic layout (a step-sliced view) while feats are channels_last
    feats = _feats((2, 7, 4, 3), torch.bfloat16, "channels_last", device)
    weight.grad = None
    f2, w2 = _clone_leaf(feats), _clone_leaf(weight)
    grad = make_layout(torch.randn(2, 7, 4, 3, device=device).to(torch.bfloat16), "strided")
    out = dops.class_drop(feats, weight, None, drop=0)
    out.backward(grad)
    exp = ref.class_drop(f2, w2, None, drop=0)
    exp.backward(grad)
    _assert_out_and_grads(out, exp, feats, f2, weight, w2, grad)
    assert feats.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.kernel
def test_backward_deterministic_and_multi_chunk():
    """dg comes from per-chunk partials (N = 63: 4 chunks of 16 in the
    interpreter config) reduced in a fixed order: two runs are bitwise equal."""
    device = kernel_device()
    feats = _feats((2, 5, 7, 9), torch.float32, "contiguous", device)
    weight = torch.randn(3, 5, device=device, requires_grad=True)
    grad = torch.randn(2, 5, 7, 9, device=device)
    grads = []
    for _ in range(2):
        weight.grad = None
        dops.class_drop(feats, weight, 3, drop=1).backward(grad)
        grads.append(weight.grad.clone())
    assert torch.equal(grads[0], grads[1])


def _second_order(op, feats, other, r):
    """∂/∂(feats, other) of a gradient penalty ‖∂L/∂inputs‖² with L = Σ r·out²
    (out² so that the first gradient depends on feats)."""
    out = op(feats, other)
    inputs = [t for t in (feats, other) if t.requires_grad]
    grads = torch.autograd.grad((r * out.float() ** 2).sum(), inputs, create_graph=True)
    sum(g.float().pow(2).sum() for g in grads).backward()
    return [t.grad for t in inputs]


@pytest.mark.kernel
@pytest.mark.parametrize("op", ["class_drop", "suppress"])
def test_double_backward(op):
    """Regression: create_graph=True through the fused ops raised "no autograd
    formula registered for debias_ops::gate_backward" (the reference path is
    twice differentiable). Tolerance: the second-order terms are a few fp32
    products and sums over N ≤ 20 positions in another order, so ~N·2^-24
    relative to the summed magnitudes; 1e-5 of max|expected| (inputs O(1))."""
    device = kernel_device()
    feats = _feats((3, 9, 4, 5), torch.float32, "channels_last", device)
    f2 = _clone_leaf(feats)
    r = torch.randn(feats.shape, device=device)
    if op == "class_drop":
        other = torch.randn(4, 9, device=device, requires_grad=True)
        got = _second_order(lambda a, w: dops.class_drop(a, w, 4, drop=1), feats, other, r)
        exp = _second_order(lambda a, w: ref.class_drop(a, w, 4, drop=1), f2, _clone_leaf(other), r)
    else:  # gate level (top-k ties): the reference gate from the fused S
        other = torch.randn(3, 4, 4, 5, device=device)
        g = ref.channel_gate(dops.class_importance(feats, other), 4, dops.drop_mask(1, 3, 4, device))
        got = _second_order(lambda a, l: dops.suppress(a, l, 4, drop=1), feats, other, r)
        exp = _second_order(lambda a, l: ref.apply_gate(a, g), f2, other, r)
    for name, a, e in zip(("feats", "weight"), got, exp):
        assert_close(a, e, rtol=1e-5, atol=1e-5 * e.abs().max().item(), name=f"d²/d{name}")


# ----------------------------------------------------------------------------- suppress / class_importance

def _planted(B, C, H, W, K, device, gap_scale=1.0):
    """feats ~ N(0, 1) and logits of a linear head W_true·A + bias whose entries
    are spread evenly over [-1, 1] with a gap of 2/(K·C) between any two (and
    none at 0): the fitted importance relu(W_fit) ≈ relu(W_true) has clear gaps
    at every top-k boundary, so rounding cannot reorder the selection."""
    n = K * C
    vals = (torch.arange(n, dtype=torch.float32) + 0.5) * (2.0 / n) - 1.0
    w_true = (vals[torch.randperm(n)].reshape(K, C) * gap_scale).to(device)
    feats = torch.randn(B, C, H, W, device=device)
    logits = torch.einsum("kc,bchw->bkhw", w_true, feats) + torch.randn(K, device=device)[None, :, None, None]
    return feats, logits, w_true


@pytest.mark.kernel
@pytest.mark.parametrize("shape", SHAPES + [(0, 7, 3, 5)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=DT.get)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_suppress_gate_level(shape, dtype, layout):
    device = kernel_device()
    B, C, H, W = shape
    i = shape[1] + LAYOUTS.index(layout) + DTYPES.index(dtype)
    K = 2 if i % 2 else 5
    k = _k(["none", "one", "mid", "all"][i % 4], C)
    drop = _drop(["none", "int", "long", "mask", "all"][i % 5], B, K, device)
    feats = _feats(shape, dtype, layout, device)
    # logits in another float dtype than feats, and requiring grad (it gets none)
    ldt = torch.bfloat16 if dtype == torch.float32 else torch.float32
    logits = _layout(torch.randn(B, K, H, W, device=device).to(ldt), layout).requires_grad_(True)
    _check_suppress_gate_level(feats, logits, k, drop, device)


@pytest.mark.kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=DT.get)
@pytest.mark.parametrize("k", ["one", "mid"])
def test_suppress_end_to_end_planted(dtype, k):
    """vs reference.suppress on planted inputs with clear top-k gaps (M = 96 ≥ 8·C).

    Tolerance: out = A·g; fp32 rtol 1e-4 because S may come from a Gram computed
    in another order (and, on a GPU, with tf32x3/ieee tiles): G's error
    ~1e-6 relative, amplified by cond(G + ρI) ≲ 5 for M ≥ 8C standard normal
    features, gives g within ~1e-5 relative; 1e-4 leaves a margin and is still
    100× below a single wrongly selected channel. fp16/bf16: the dtype's TOL
    (the output rounding dominates)."""
    device = kernel_device()
    feats, logits, _ = _planted(2, 11, 6, 8, 3, device)
    feats = feats.to(dtype)
    logits = logits.to(torch.float16 if dtype == torch.bfloat16 else torch.float32)
    kk = _k(k, 11)
    out = dops.suppress(feats, logits, kk, drop=torch.tensor([2, -1], device=device))
    exp = ref.suppress(feats, logits, kk, drop=torch.tensor([2, -1], device=device))
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else {}
    assert_close(out, exp, name="out", **tol)


@pytest.mark.kernel
@pytest.mark.parametrize("shape", [(2, 7, 6, 5), (3, 19, 4, 4), (1, 13, 1, 1), (2, 9, 1, 2)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                    (torch.float16, torch.bfloat16)], ids=lambda d: f"{DT[d[0]]}-{DT[d[1]]}")
def test_class_importance(shape, dtypes):
    """S (K, C) vs the reference from the same (rounded) inputs.

    Well-conditioned shapes (M = B·N ≥ 8·C): rtol 1e-4 relative to max|S|, as in
    test_suppress_end_to_end_planted. Underdetermined shapes (M < C: G is
    singular and the ridge ρ ≈ 1e-3·mean diag G dominates): the solve amplifies
    the fp32 rounding of G (~1e-6 relative) by up to (λ_max + ρ)/ρ ≈ 1e3, so
    5e-3 relative to max|S|."""
    device = kernel_device()
    B, C, H, W = shape
    K = 2 if C == 13 else 4
    fdt, ldt = dtypes
    feats = torch.randn(B, C, H, W, device=device).to(fdt)
    logits = torch.randn(B, K, H, W, device=device).to(ldt)
    S = dops.class_importance(feats, logits)
    exp = ref.class_importance(feats, logits)
    M = B * H * W
    rel = 1e-4 if M >= 8 * C else 5e-3
    assert_close(S, exp, rtol=0, atol=rel * exp.abs().max().clamp_min(1e-6).item(), name="S")
    # B = 0: every statistic zero, S = 0
    S0 = dops.class_importance(feats[:0], logits[:0])
    assert_close(S0, torch.zeros(K, C, device=device), name="S (B=0)")


@pytest.mark.kernel
def test_suppress_of_linear_head_is_class_drop():
    """suppress(A, conv1x1(A), k) ≈ class_drop(A, conv1x1.weight, k) (design §2).

    With logits from a linear head, X = W·G exactly, so W_fit = W·G(G + ρI)⁻¹ =
    W − ρ·W(G + ρI)⁻¹ and |W_fit − W|_max ≤ max_j ‖W_j‖₂ · ρ/(λ_min(G) + ρ).
    ReLU is 1-Lipschitz and g averages S over kept classes, so
    |Δg| ≤ that bound and |Δout| ≤ max|A| · bound, provided the top-k sets agree,
    which holds when every top-k gap of W exceeds twice the bound (asserted).
    Plus fp32 rounding of the two paths (small against this bound)."""
    device = kernel_device()
    B, C, H, W, K = 2, 8, 8, 8, 3  # M = 128 = 16·C: well conditioned
    feats, _, w_true = _planted(B, C, H, W, K, device)
    conv = torch.nn.Conv2d(C, K, 1).to(device)
    with torch.no_grad():
        conv.weight.copy_(w_true[:, :, None, None])
    logits = conv(feats).detach()
    A = feats.double().transpose(0, 1).reshape(C, -1)
    G = torch.cov(A, correction=0)
    rho = 1e-3 * G.diagonal().mean() + 1e-6
    bound = (w_true.double().norm(dim=1).max() * rho / (torch.linalg.eigvalsh(G)[0] + rho)).item()
    assert 2 * bound < 2.0 / (K * C)  # top-k gaps of the planted weight are 2/(K·C)
    atol = feats.abs().max().item() * bound + 1e-5
    for k in (None, 2, 5):
        out_s = dops.suppress(feats, logits, k, drop=1)
        out_c = dops.class_drop(feats, conv.weight, k, drop=1)
        assert_close(out_s, out_c, rtol=0, atol=atol, name=f"suppress vs class_drop (k={k})")


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gpu_compile_fullgraph_fwd_bwd(layout):
    device = cuda_device()
    from debias_ops import fused_selection as fs
    feats = _feats((2, 40, 9, 13), torch.bfloat16, layout, device)
    weight = torch.randn(5, 40, device=device, requires_grad=True)
    logits = torch.randn(2, 5, 9, 13, device=device)
    dropped = torch.zeros(2, 5, dtype=torch.bool, device=device)
    dropped[0, 3] = True

    def step(a, w, l):
        return fs.class_drop(a, w, 7, dropped) + fs.suppress(a, l, 7, dropped)

    compiled = torch.compile(step, fullgraph=True)
    grad = torch.randn(2, 40, 9, 13, device=device).to(torch.bfloat16)
    out = compiled(feats, weight, logits)
    out.backward(grad)
    f2, w2 = _clone_leaf(feats), _clone_leaf(weight)
    exp = step(f2, w2, logits)
    exp.backward(grad)
    _assert_out_and_grads(out, exp, feats, f2, weight, w2, grad)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_replay():
    device = cuda_device()
    feats = torch.randn(4, 48, 16, 16, device=device, dtype=torch.bfloat16).requires_grad_(True)
    weight = torch.randn(6, 48, device=device, requires_grad=True)
    logits = torch.randn(4, 6, 16, 16, device=device)
    drop = torch.zeros(4, 6, dtype=torch.bool, device=device)
    drop[1, 2] = True
    grad = torch.randn(4, 48, 16, 16, device=device, dtype=torch.bfloat16)

    def step():
        out = dops.class_drop(feats, weight, 9, drop=drop) + dops.suppress(feats, logits, 9, drop=drop)
        out.backward(grad)
        return out

    with dops.value_checks(False):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                feats.grad = None
                weight.grad = None
                step()
        torch.cuda.current_stream().wait_stream(s)
        feats.grad = None
        weight.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = step()
    with torch.no_grad():
        feats.copy_(torch.randn_like(feats))
        weight.copy_(torch.randn_like(weight))
        logits.copy_(torch.randn_like(logits))
        feats.grad.zero_()
        weight.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    f2, w2 = _clone_leaf(feats), _clone_leaf(weight)
    exp = ref.class_drop(f2, w2, 9, drop=drop) + ref.suppress(f2, logits, 9, drop=drop)
    exp.backward(grad)
    _assert_out_and_grads(static_out, exp, feats, f2, weight, w2, grad, " (replay)")


@pytest.mark.gpu
def test_gpu_opcheck():
    device = cuda_device()
    from debias_ops import fused_selection as fs
    for layout in ("contiguous", "channels_last"):
        a = _feats((2, 24, 5, 7), torch.float32, layout, device)
        g = torch.rand(2, 24, device=device, requires_grad=True)
        torch.library.opcheck(fs.gate_apply_op, (a, g))
        grad = torch.randn(2, 24, 5, 7, device=device)
        torch.library.opcheck(fs.gate_backward_op, (grad, g.detach(), a.detach(), True, True, layout != "contiguous"))
        torch.library.opcheck(fs.batch_moments_op, (a.detach(), torch.randn(2, 3, 5, 7, device=device)))


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["class_drop", "suppress"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=DT.get)
def test_gpu_peak_memory_w48(op, dtype):
    """fwd+bwd at W48 (B 8, C 720, 128×256, K 19): peak extra memory ≤ 2.2·|A|
    (design §8: the output and dA, nothing else N-sized). suppress includes the
    moments pass, so this also checks kernels/moments.py allocates nothing N-sized."""
    device = cuda_device()
    B, C, H, W, K = 8, 720, 128, 256, 19
    feats = torch.randn(B, C, H, W, device=device, dtype=dtype).requires_grad_(True)
    weight = torch.randn(K, C, device=device, requires_grad=True)
    logits = torch.randn(B, K, H, W, device=device, dtype=dtype)
    grad = torch.randn(B, C, H, W, device=device, dtype=dtype)
    drop = dops.sample_drop(B, K, 0.5, device=device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    if op == "class_drop":
        out = dops.class_drop(feats, weight, 64, drop=drop)
    else:
        out = dops.suppress(feats, logits, 64, drop=drop)
    out.backward(grad)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    size = feats.numel() * feats.element_size()
    assert extra <= 2.2 * size, f"peak extra {extra / size:.3f}·|A|"


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gpu_more_than_2_31_elements(layout):
    """bf16 tensors of 2^31 + 11776 elements: every offset past 2^31 must be int64."""
    device = cuda_device()
    B, C, H, W, K = 2, 2, 1024, 524291, 3
    if torch.cuda.get_device_properties(device).total_memory < 40 * 2**30:
        pytest.skip("needs ~20 GiB of GPU memory")
    feats = torch.randn(B, C, H, W, device=device, dtype=torch.bfloat16)
    feats = make_layout(feats, layout).requires_grad_(True)
    assert feats.numel() > 2**31
    weight = torch.randn(K, C, device=device, requires_grad=True)
    grad = torch.randn(B, C, H, W, device=device, dtype=torch.bfloat16)
    drop = torch.tensor([0, -1], device=device)
    out = dops.class_drop(feats, weight, None, drop=drop)
    out.backward(grad)
    with torch.no_grad():
        dropped = dops.drop_mask(drop, B, K, device)
        g = ref.channel_gate(ref.weight_importance(weight), None, dropped)
        dg = torch.zeros(B, C, device=device, dtype=torch.float64)
        for h0 in range(0, H, 128):  # chunked reference, float32 products
            sl = (slice(None), slice(None), slice(h0, h0 + 128))
            a = feats.detach()[sl].float()
            _close_on_device(out[sl], (a * g[:, :, None, None]).to(torch.bfloat16), f"out rows {h0}")
            _close_on_device(feats.grad[sl], (grad[sl].float() * g[:, :, None, None]).to(torch.bfloat16), f"dA rows {h0}")
            dg += (grad[sl].float() * a).sum(dim=(2, 3), dtype=torch.float64)
    keep = (~dropped).double()
    dW = (keep / keep.sum(1, keepdim=True).clamp_min(1)).T @ dg * (weight.detach() > 0)
    scale = _dg_scale(feats[:, :, :64], grad[:, :, :64]) * (H / 64)
    # dg over 5.4e8 positions per (b, c): each fp32 accumulator lane of a program
    # sums ~4000 products (~528 chunks × 256 lanes), typical error ~sqrt(4000)·2^-24
    # ≈ 4e-6 of its Σ|dOut·A|; 1e-4 of the total leaves margin, while one chunk
    # dropped or counted twice (an int32 offset wrap) moves dg by ~1/528 ≈ 2e-3 of it.
    assert_close(weight.grad.double(), dW, rtol=0, atol=1e-4 * scale, name="dW")


# ----------------------------------------------------------------------------- CPU: compile / opcheck through the reference branch

def _not_interpreting():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("torch.compile cannot trace interpreted kernels (design §9)")


def test_cpu_compile_fullgraph_reference_branch():
    """The registered ops compile with fullgraph=True on CPU (reference branch), fwd+bwd."""
    _not_interpreting()
    from debias_ops import fused_selection as fs
    feats = _feats((2, 7, 3, 5), torch.float32, "channels_last", "cpu")
    weight = torch.randn(4, 7, requires_grad=True)
    logits = torch.randn(2, 4, 3, 5)
    dropped = torch.tensor([[False, True, False, False], [False, False, False, False]])

    def step(a, w, l):
        return fs.class_drop(a, w, 3, dropped) * 2 + fs.suppress(a, l, 3, dropped), fs.class_importance(a, l)

    out, S = torch.compile(step, fullgraph=True)(feats, weight, logits)
    out.sum().backward()
    f2, w2 = _clone_leaf(feats), _clone_leaf(weight)
    exp = ref.class_drop(f2, w2, 3, drop=dropped) * 2 + ref.suppress(f2, logits, 3, drop=dropped)
    exp.sum().backward()
    assert_close(out, exp, name="out")
    assert_close(S, ref.class_importance(feats, logits), name="S")
    assert_close(feats.grad, f2.grad, name="dA")
    assert_close(weight.grad, w2.grad, name="dW")


def test_cpu_opcheck_reference_branch():
    _not_interpreting()
    from debias_ops import fused_selection as fs
    for layout in ("contiguous", "channels_last"):
        a = _feats((2, 6, 3, 5), torch.float32, layout, "cpu")
        g = torch.rand(2, 6, requires_grad=True)
        torch.library.opcheck(fs.gate_apply_op, (a, g))
        torch.library.opcheck(fs.gate_backward_op, (torch.randn(2, 6, 3, 5), g.detach(), a.detach(), True, True,
                                                    layout != "contiguous"))
        torch.library.opcheck(fs.batch_moments_op, (a.detach(), torch.randn(2, 3, 3, 5)))


def test_cpu_custom_op_fallback_registration():
    """torch 2.4–2.5 have no torch.library.triton_op: the ops are then plain
    custom_ops with register_fake. Simulated in a subprocess by hiding triton_op:
    fwd/bwd vs the reference and opcheck (whose aot_dispatch test traces the
    fake and autograd registrations as torch.compile would)."""
    _not_interpreting()
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    code = textwrap.dedent("""
        import torch
        del torch.library.triton_op
        from debias_ops import fused_selection as fs, reference as ref
        from debias_ops import _library
        assert not _library.HAS_TRITON_OP
        a = torch.randn(2, 6, 3, 5).contiguous(memory_format=torch.channels_last).requires_grad_(True)
        w = torch.randn(3, 6, requires_grad=True)
        dropped = torch.tensor([[True, False, False], [False, False, False]])
        out = fs.class_drop(a, w, 2, dropped)
        out.sum().backward()
        a2, w2 = a.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
        exp = ref.class_drop(a2, w2, 2, drop=dropped)
        exp.sum().backward()
        torch.testing.assert_close(out, exp)
        torch.testing.assert_close(a.grad, a2.grad)
        torch.testing.assert_close(w.grad, w2.grad)
        g = torch.rand(2, 6, requires_grad=True)
        torch.library.opcheck(fs.gate_apply_op, (a.detach().requires_grad_(True), g))
        torch.library.opcheck(fs.gate_backward_op, (torch.randn(2, 6, 3, 5), g.detach(), a.detach(), True, True, True))
        torch.library.opcheck(fs.batch_moments_op, (a.detach(), torch.randn(2, 3, 3, 5)))
        print("fallback ok")
    """)
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "fallback ok" in res.stdout, res.stdout[-2000:] + res.stderr[-4000:]


@pytest.mark.kernel
def test_bf16_output_rounds_like_torch():
    """out = A·g is one float32 product per element, so a bf16 output must equal
    PyTorch's round-to-nearest-even cast bit for bit. (Triton 3.9's interpreter
    truncates fp32 → bf16; kernels/_common.to_output corrects that there. On a
    GPU the cast itself rounds to nearest even.)"""
    dev = kernel_device()
    feats = torch.randn(2, 7, 5, 3, device=dev).to(torch.bfloat16)
    W = torch.randn(3, 7, device=dev)
    out = dops.class_drop(feats, W, drop=torch.tensor([0, -1], device=dev))
    g = ref.channel_gate(ref.weight_importance(W, torch.float32), None, dops.drop_mask(torch.tensor([0, -1]), 2, 3, dev))
    expect = (feats.float() * g[:, :, None, None]).to(torch.bfloat16)
    assert torch.equal(out, expect), f"{int((out != expect).sum())} of {out.numel()} elements round differently"
