"""Fused DropClass loss (design §4) against the reference.

Kernel tests (``-m kernel``) run the Triton kernels: on a GPU, or on CPU under
``TRITON_INTERPRET=1 DEBIAS_OPS_BACKEND=triton`` (CI). Shapes are tiny but,
with the interpreter's small blocks (``kernels/loss.py: plan``), still span
several row and column blocks of the main kernel, whose borders are where a
gather kernel goes wrong. The GPU tests (``-m gpu``) add the Cityscapes shape.

Tolerances: the fused path computes exactly the reference's function in fp32
from the same (possibly half) inputs, only in another summation order, so the
loss and its components are compared at fp32 tolerance whatever the logits'
dtype; gradients are compared in the logits' dtype with ``helpers.TOL`` (a
half-precision gradient may round one ulp differently from the reference's
cast of its fp32 gradient).
"""
from __future__ import annotations

import pytest
import torch

import debias_ops as dops
from debias_ops import reference as ref
from tests.helpers import F32, assert_close, cuda_device, kernel_device, make_layout
from tests.helpers import check_loss as _check
from tests.helpers import loss_inputs as _inputs

# (h, w) -> (H, W): same size, ×2, ×4, non-integer up, mixed, and downsampling
RATIOS = {
    "same": (5, 6, 5, 6),
    "x2": (4, 5, 8, 10),
    "x4": (3, 5, 12, 20),
    "non_int": (5, 7, 17, 23),
    "mixed": (2, 9, 11, 9),
    "down": (9, 11, 5, 6),
}


@pytest.mark.kernel
@pytest.mark.parametrize("weight", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("ratio", list(RATIOS))
def test_parity_ratios(ratio, weight):
    dev = kernel_device()
    h, w, H, W = RATIOS[ratio]
    x, xd, y, wt, dropped = _inputs(2, 5, h, w, H, W, weight=weight, device=dev)
    _check(x, xd, y, dropped, weight=wt, grad_scale=-1.7)


@pytest.mark.kernel
@pytest.mark.parametrize("form", ["none", "int", "int_none", "index", "mask", "all"])
def test_drop_forms(form):
    dev = kernel_device()
    B, K = 3, 4
    x, xd, y, _, dropped = _inputs(B, K, 3, 4, 7, 9, device=dev)
    drop = {
        "none": None,
        "int": 2,
        "int_none": -1,
        "index": torch.tensor([1, -1, 3], device=dev),
        "mask": dropped,
        "all": torch.ones(B, K, dtype=torch.bool, device=dev),  # every label dropped: CE' = 0
    }[form]
    _check(x, xd, y, drop, lam=0.4, alpha=2.5)


@pytest.mark.kernel
@pytest.mark.parametrize("drop", [None, 1], ids=["nodrop", "drop1"])
def test_all_ignored(drop):
    dev = kernel_device()
    x, xd, y, _, _ = _inputs(2, 3, 3, 4, 6, 8, ignore_frac=1.1, device=dev)
    out, xf, xdf = _check(x, xd, y, drop)
    assert float(out.ce) == 0.0 and float(out.ce_drop) == 0.0  # exactly, not approximately
    assert torch.count_nonzero(xf.grad) == 0
    if drop is None:
        assert float(out.loss.detach()) == 0.0 and torch.count_nonzero(xdf.grad) == 0


@pytest.mark.kernel
@pytest.mark.parametrize("dtype,dtype_drop", [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                              (torch.bfloat16, torch.float32)])
def test_half_dtypes(dtype, dtype_drop):
    dev = kernel_device()
    x, xd, y, wt, dropped = _inputs(2, 7, 3, 5, 11, 19, dtype=dtype, dtype_drop=dtype_drop, weight=True, device=dev)
    _check(x, xd, y, dropped, weight=wt, grad_scale=0.3)


@pytest.mark.kernel
@pytest.mark.parametrize("label_dtype,ignore_index", [(torch.int64, -100), (torch.int32, 255), (torch.uint8, 255),
                                                      (torch.int64, 0)])
def test_label_dtypes_and_ignore_index(label_dtype, ignore_index):
    dev = kernel_device()
    x, xd, y, _, dropped = _inputs(2, 4, 3, 3, 9, 7, label_dtype=label_dtype, ignore_index=ignore_index, device=dev)
    _check(x, xd, y, dropped, ignore_index=ignore_index)


@pytest.mark.kernel
@pytest.mark.parametrize("layout,layout_drop", [("channels_last", "channels_last"), ("strided", "contiguous"),
                                                ("contiguous", "strided")])
def test_layouts(layout, layout_drop):
    dev = kernel_device()
    x, xd, y, _, dropped = _inputs(2, 5, 4, 3, 9, 10, device=dev)
    y = make_layout(y, "strided")  # non-contiguous labels too
    _, xf, xdf = _check(x, xd, y, dropped, layout=layout, layout_drop=layout_drop, grad_scale=2.0)
    if layout == "channels_last":  # the gradient keeps the input's memory format
        assert xf.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.kernel
@pytest.mark.parametrize("shape", [(1, 2, 1, 1, 7, 5), (2, 37, 2, 3, 5, 7), (1, 3, 7, 1, 13, 3)],
                         ids=["1x1", "K37", "w1"])
def test_odd_shapes(shape):
    dev = kernel_device()
    x, xd, y, wt, dropped = _inputs(*shape, weight=True, device=dev)
    _check(x, xd, y, dropped, weight=wt)


@pytest.mark.kernel
def test_many_blocks_and_sum_backward(monkeypatch):
    """Blocks of 1 row × 2 columns (every pixel a block border); backward via .sum()."""
    dev = kernel_device()
    from debias_ops.kernels import loss as kmod
    monkeypatch.setitem(kmod.PLAN_OVERRIDE, "RB", 1)
    monkeypatch.setitem(kmod.PLAN_OVERRIDE, "CB", 2)
    x, xd, y, wt, dropped = _inputs(2, 3, 4, 5, 10, 13, weight=True, device=dev)
    xf, xdf = x.clone().requires_grad_(), xd.clone().requires_grad_()
    out = dops.dropclass_loss(xf, xdf, y, dropped, lam=0.25, weight=wt)
    out.loss.sum().backward()  # hands the backward an expanded gradient
    xr, xdr = x.cpu().requires_grad_(), xd.cpu().requires_grad_()
    exp = ref.dropclass_loss(xr, xdr, y.cpu(), dropped.cpu(), lam=0.25, weight=wt.cpu())
    exp.loss.backward()
    assert_close(out.loss, exp.loss, **F32, name="loss")
    assert_close(xf.grad, xr.grad, name="grad logits")
    assert_close(xdf.grad, xdr.grad, name="grad logits_drop")


@pytest.mark.kernel
@pytest.mark.parametrize("seed", range(4))
def test_random_ratios_int64_offsets(seed, monkeypatch):
    """Random sizes (up, down, mixed, 1-pixel) with random block sizes, on the int64-offset path."""
    dev = kernel_device()
    from debias_ops.kernels import loss as kmod
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    monkeypatch.setitem(kmod.PLAN_OVERRIDE, "IDX64", True)
    monkeypatch.setitem(kmod.PLAN_OVERRIDE, "RB", r(1, 4))
    monkeypatch.setitem(kmod.PLAN_OVERRIDE, "CB", r(1, 4))
    h, w = r(1, 7), r(1, 7)
    H, W = r(1, 19), r(1, 19)
    x, xd, y, wt, dropped = _inputs(2, r(2, 6), h, w, H, W, weight=bool(seed % 2), device=dev)
    _check(x, xd, y, dropped, weight=wt, lam=0.3, grad_scale=1.3)


@pytest.mark.kernel
def test_grad_only_where_needed_and_no_grad():
    dev = kernel_device()
    x, xd, y, _, dropped = _inputs(2, 3, 3, 3, 6, 6, device=dev)
    xf = x.clone().requires_grad_()
    out = dops.dropclass_loss(xf, xd, y, dropped, lam=0.5)
    out.loss.backward()
    xr = x.cpu().requires_grad_()
    exp = ref.dropclass_loss(xr, xd.cpu(), y.cpu(), dropped.cpu(), lam=0.5)
    exp.loss.backward()
    assert_close(xf.grad, xr.grad, name="grad logits")
    with torch.no_grad():
        out = dops.dropclass_loss(xf, xd, y, dropped, lam=0.5)
    assert out.loss.grad_fn is None
    assert_close(out.loss, exp.loss.detach(), **F32, name="loss (no_grad)")


@pytest.mark.kernel
def test_deterministic_and_second_backward_raises():
    dev = kernel_device()
    x, xd, y, wt, dropped = _inputs(2, 4, 4, 4, 11, 13, weight=True, device=dev)
    res = []
    for _ in range(2):
        xf, xdf = x.clone().requires_grad_(), xd.clone().requires_grad_()
        out = dops.dropclass_loss(xf, xdf, y, dropped, lam=0.5, weight=wt)
        out.loss.backward(retain_graph=True)
        res.append((out.loss.detach(), xf.grad, xdf.grad))
    for a, b in zip(*res):
        assert torch.equal(a, b)  # bitwise: no atomics anywhere
    with pytest.raises(RuntimeError, match="twice"):
        out.loss.backward()


@pytest.mark.kernel
def test_bad_labels_error():
    dev = kernel_device()
    x, xd, y, _, dropped = _inputs(1, 3, 2, 2, 4, 4, device=dev)
    y[0, 1, 2] = 7
    with pytest.raises(ValueError, match="target"):
        dops.dropclass_loss(x, xd, y, dropped, lam=0.5)


@pytest.mark.kernel
def test_empty_batch():
    dev = kernel_device()
    x = torch.randn(0, 3, 2, 3, device=dev, requires_grad=True)
    xd = torch.randn(0, 3, 2, 3, device=dev, requires_grad=True)
    y = torch.zeros(0, 5, 7, dtype=torch.long, device=dev)
    out = dops.dropclass_loss(x, xd, y, None, lam=0.5)
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0 and x.grad.shape == x.shape and xd.grad.shape == xd.shape


# ----------------------------------------------------------------------------- op registration (reference body)

def _op_args(device="cpu"):
    x, xd, y, wt, dropped = _inputs(2, 3, 3, 4, 7, 9, weight=True, device=device)
    return x, xd, y, dropped, wt


def test_op_reference_body_matches_autograd():
    """The op's closed-form CPU body (used when not interpreting) = autograd of the reference."""
    from debias_ops import _backend, fused_loss
    if _backend.interpreting():
        pytest.skip("the op body runs the kernels under the interpreter (covered by the kernel tests)")
    x, xd, y, dropped, wt = _op_args()
    xf, xdf = x.clone().requires_grad_(), xd.clone().requires_grad_()
    out = fused_loss.dropclass_loss(xf, xdf, y, dropped, 0.6, 4.0, wt, 255)
    out.loss.backward(torch.tensor(1.5))
    xr, xdr = x.clone().requires_grad_(), xd.clone().requires_grad_()
    exp = ref.dropclass_loss(xr, xdr, y, dropped, lam=0.6, alpha=4.0, weight=wt)
    exp.loss.backward(torch.tensor(1.5))
    for name in ("loss", "ce", "ce_drop", "sup"):
        assert_close(getattr(out, name), getattr(exp, name), **F32, name=name)
    assert_close(xf.grad, xr.grad, name="grad logits")
    assert_close(xdf.grad, xdr.grad, name="grad logits_drop")


def test_opcheck():
    from debias_ops import _backend, fused_loss
    if _backend.interpreting():
        pytest.skip("opcheck traces the op; interpreted kernels cannot be traced (design §9)")
    x, xd, y, dropped, wt = _op_args()
    for need in ((True, True), (False, False)):
        torch.library.opcheck(fused_loss.dropclass_loss_fwd,
                              (x.requires_grad_(need[0]), xd.requires_grad_(need[1]), y, dropped, wt,
                               0.6, 4.0, 255, need[0], need[1]))


def test_compile_fullgraph_cpu():
    from debias_ops import _backend, fused_loss
    if _backend.interpreting():
        pytest.skip("torch.compile cannot trace interpreted kernels (design §9)")
    x, xd, y, dropped, wt = _op_args()

    def f(a, b):
        return fused_loss.dropclass_loss(a, b, y, dropped, 0.6, 4.0, wt, 255).loss

    xf, xdf = x.clone().requires_grad_(), xd.clone().requires_grad_()
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(xf, xdf)
    loss.backward()
    xr, xdr = x.clone().requires_grad_(), xd.clone().requires_grad_()
    exp = ref.dropclass_loss(xr, xdr, y, dropped, lam=0.6, alpha=4.0, weight=wt)
    exp.loss.backward()
    assert_close(loss, exp.loss, **F32, name="loss")
    assert_close(xf.grad, xr.grad, name="grad logits")
    assert_close(xdf.grad, xdr.grad, name="grad logits_drop")


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_cityscapes_parity(dtype):
    """B=2 of the benchmark shape: K=19, 128×256 logits, 512×1024 labels."""
    dev = cuda_device()
    x, xd, y, wt, dropped = _inputs(2, 19, 128, 256, 512, 1024, dtype=dtype, weight=True, device=dev)
    # the CE gradients scale as 1/(1M weighted pixels): a loss gradient of 1e5 makes them O(1e-1),
    # where the fixed atol of helpers.TOL no longer hides a wrong gradient
    _check(x, xd, y, dropped, weight=wt, grad_scale=1e5)


@pytest.mark.gpu
def test_gpu_compile_and_memory():
    """torch.compile(fullgraph) through the Triton op; peak extra memory ≪ eager reference."""
    dev = cuda_device()
    from debias_ops import fused_loss
    x, xd, y, wt, dropped = _inputs(8, 19, 128, 256, 512, 1024, device=dev)

    def f(a, b):
        return fused_loss.dropclass_loss(a, b, y, dropped, 0.6, 10.0, wt, 255).loss

    xf, xdf = x.clone().requires_grad_(), xd.clone().requires_grad_()
    torch.compile(f, fullgraph=True)(xf, xdf).backward()
    xr, xdr = x.clone().requires_grad_(), xd.clone().requires_grad_()
    exp = ref.dropclass_loss(xr, xdr, y, dropped, lam=0.6, alpha=10.0, weight=wt)
    exp.loss.backward()
    assert_close(xf.grad, xr.grad, name="grad logits (compiled)")
    assert_close(xdf.grad, xdr.grad, name="grad logits_drop (compiled)")

    def peak(fn):
        xa, xb = x.clone().requires_grad_(), xd.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(xa, xb).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    eager_ref = peak(lambda a, b: ref.dropclass_loss(a, b, y, dropped, lam=0.6, weight=wt).loss)
    with dops.value_checks(False):  # the label-range check's temporaries are validation, not the op
        fused = peak(lambda a, b: dops.dropclass_loss(a, b, y, dropped, lam=0.6, weight=wt).loss)
    assert fused <= 0.05 * eager_ref, (fused, eager_ref)
