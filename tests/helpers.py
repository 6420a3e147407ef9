"""Shared test helpers: a comparison that says where tensors differ, per-dtype
tolerances, input factories for odd shapes and memory layouts, the device
on which the Triton kernels can be tested, and the two-rank gloo runner of the
DDP tests."""
from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch

import debias_ops as dops
from debias_ops import reference as ref

# Tolerances per dtype of the *compared* tensors (outputs are cast to the input
# dtype; a bf16 store can round one ulp differently from PyTorch's cast).
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol=None, atol=None, name: str = "tensor") -> None:
    """torch.testing.assert_close, plus where and how badly the tensors differ."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    tol = TOL.get(expected.dtype, TOL[torch.float32])
    rtol = tol["rtol"] if rtol is None else rtol
    atol = tol["atol"] if atol is None else atol
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    bad = ~torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=False) | torch.isnan(a) != torch.isnan(e)
    if bool(bad.any()):
        idx = bad.nonzero()[:8]
        lines = [f"  at {tuple(i.tolist())}: got {a[tuple(i)].item():.8g}, expected {e[tuple(i)].item():.8g}" for i in idx]
        diff = (a - e).abs()
        diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
        worst = diff.argmax()
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements differ (rtol={rtol}, atol={atol}); "
            f"max abs diff {diff.max().item():.4g} at flat index {int(worst)}\n" + "\n".join(lines)
        )


def kernel_device() -> torch.device:
    """Where the Triton kernels can be tested: CPU under the interpreter
    (TRITON_INTERPRET=1 with DEBIAS_OPS_BACKEND=triton), else CUDA when present;
    otherwise the test is skipped."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        if os.environ.get("DEBIAS_OPS_BACKEND") != "triton":
            pytest.skip("under TRITON_INTERPRET=1 the kernels run on CPU tensors with DEBIAS_OPS_BACKEND=triton")
        return torch.device("cpu")
    if torch.cuda.is_available():
        try:
            import triton  # noqa: F401
        except ImportError:
            pytest.skip("triton not installed")
        if os.environ.get("DEBIAS_OPS_BACKEND", "auto") == "reference":
            pytest.skip("DEBIAS_OPS_BACKEND=reference")
        return torch.device("cuda")
    pytest.skip("kernel tests need a GPU, or TRITON_INTERPRET=1 with DEBIAS_OPS_BACKEND=triton")


def cuda_device() -> torch.device:
    """A real CUDA device for the GPU-only tests (no interpreter), else the test is skipped."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("GPU tests run without the interpreter")
    pytest.importorskip("triton")
    return torch.device("cuda")


def make_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout: 'contiguous', 'channels_last',
    'strided' (a non-contiguous view: every other element of a wider tensor), or
    'offset' / 'offset_cl' (4-D: a view at a non-zero storage offset into a larger
    NCHW / channels_last tensor whose other entries are NaN, so that a kernel
    ignoring the offset or reading outside the view produces NaN)."""
    if layout in ("offset", "offset_cl"):
        B, C, H, W = x.shape
        fmt = torch.channels_last if layout == "offset_cl" else torch.contiguous_format
        big = torch.full((B + 1, C + 3, H, W), float("nan"), dtype=x.dtype, device=x.device)
        view = big.contiguous(memory_format=fmt)[1:, 2:2 + C]
        view.copy_(x)
        assert view.storage_offset() > 0
        return view
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        wide = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        view = wide[..., ::2]
        assert not view.is_contiguous() or x.shape[-1] <= 1
        return view
    raise ValueError(layout)


# ----------------------------------------------------------------------------- two gloo ranks (DDP tests)
WORLD = 2


def run_gloo(fn, out_dir) -> None:
    """Run ``fn(rank, out_dir)`` in WORLD spawned processes joined in a gloo process group
    (``fn`` must be a module-level function, for pickling)."""
    import torch.multiprocessing as mp
    mp.spawn(_gloo_worker, args=(fn, str(out_dir)), nprocs=WORLD, join=True)


def _gloo_worker(rank: int, fn, out_dir: str) -> None:
    import torch.distributed as dist
    # Rendezvous through a file in the test's tmp dir (no port to pick and race for);
    # gloo itself connects the ranks over loopback.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD)
    try:
        fn(rank, out_dir)
        # Every rank finishes its collectives (and frees its DDP reducer) before teardown.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def check_ranks_agree(r0, r1, what):
    """Both ranks dropped (different classes) and ended with bit-identical, moved parameters."""
    assert not torch.equal(r0["drops"], r1["drops"]), "ranks were meant to drop different classes"
    assert r0["drops"].any()
    moved = False
    for i, (a, b, a0) in enumerate(zip(r0["params"], r1["params"], r0["init"])):
        assert torch.equal(a, b), f"{what}: parameter {i} differs between ranks: max diff {(a - b).abs().max():.3g}"
        moved |= not torch.equal(a, a0)
    assert moved, "training did not change the parameters"


# ----------------------------------------------------------------------------- a miniature Cityscapes (recipe tests)
CITYSCAPES_HW = (64, 128)
# Real label IDs: road, sidewalk, building, sky, person, car, and ignored ones (unlabeled, ego vehicle, static)
REGIONS = (7, 8, 11, 23, 24, 26, 0, 1, 4)


def make_cityscapes(root: Path, counts=(("train", 4), ("val", 2)), bad_id=None) -> Path:
    """A miniature dataset in the exact Cityscapes layout (64x128 PNGs, *_gtFine_labelIds.png masks)."""
    import numpy as np
    from cityscapesscripts.helpers.labels import id2label
    from PIL import Image
    H, W = CITYSCAPES_HW
    rng = np.random.default_rng(0)
    for split, n in counts:
        for i in range(n):
            city = ("aachen", "bochum")[i % 2]
            stem = f"{city}_{i:06d}_000019"
            ids = np.zeros((H, W), np.uint8)
            cuts = np.sort(rng.choice(np.arange(8, W - 8), size=len(REGIONS) - 1, replace=False))
            for lab, (a, b) in zip(rng.permutation(REGIONS), zip(np.r_[0, cuts], np.r_[cuts, W])):
                ids[:, a:b] = lab
            ids[H // 2:, : W // 4] = 7  # some road in every image
            if bad_id is not None and split == "train":
                ids[0, 0] = bad_id
            colour = np.array([id2label[int(v)].color for v in range(34)], np.float32)[np.minimum(ids, 33)]
            img = np.clip(colour + rng.normal(0, 20, colour.shape), 0, 255).astype(np.uint8)
            for sub, name, arr in (("leftImg8bit", f"{stem}_leftImg8bit.png", img),
                                   ("gtFine", f"{stem}_gtFine_labelIds.png", ids)):
                d = root / sub / split / city
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(d / name)
    return root


def cityscapes_args(root, out, *extra):
    return ["--data", "cityscapes", "--root", str(root), "--model", "FPN", "--encoder", "resnet18",
            "--batch", "2", "--crop", "32", "64", "--base-size", "64", "--scale", "0.75", "1.25",
            "--workers", "0", "--device", "cpu", "--no-progress", "--out", str(out), *extra]


# ----------------------------------------------------------------------------- kernel checks (fused vs reference)
# Shared by tests/test_kernels_loss.py, tests/test_kernels_selection.py, tests/test_kernels_gpu.py and
# tests/test_properties.py.
F32 = TOL[torch.float32]


def loss_inputs(B, K, h, w, H, W, *, dtype=torch.float32, dtype_drop=None, label_dtype=torch.int64,
                ignore_frac=0.15, ignore_index=255, weight=False, device="cpu", scale=3.0):
    g = torch.Generator().manual_seed(1234 + B * 7 + K * 13 + h * 17 + W)
    x = (torch.randn(B, K, h, w, generator=g) * scale).to(dtype)
    xd = (torch.randn(B, K, h, w, generator=g) * scale).to(dtype_drop or dtype)
    y = torch.randint(0, K, (B, H, W), generator=g)
    y[torch.rand(B, H, W, generator=g) < ignore_frac] = ignore_index
    y = y.to(label_dtype)
    wt = (torch.rand(K, generator=g) * 2 + 0.1) if weight else None
    dropped = torch.rand(B, K, generator=g) < 0.3
    dropped[0, y[0].flatten()[0].clamp(0, K - 1).long()] = True  # at least one present class dropped
    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    return mv(x), mv(xd), mv(y), mv(wt), mv(dropped)


def check_loss(x, xd, y, drop, *, lam=0.7, alpha=10.0, weight=None, ignore_index=255, grad_scale=None,
               layout="contiguous", layout_drop=None):
    """Fused (on x's device) vs reference (CPU): loss, its components and both gradients."""
    xf = make_layout(x.detach().clone(), layout).requires_grad_()
    xdf = make_layout(xd.detach().clone(), layout_drop or layout).requires_grad_()
    out = dops.dropclass_loss(xf, xdf, y, drop, lam=lam, alpha=alpha, weight=weight, ignore_index=ignore_index)
    assert out.loss.dim() == 0 and out.loss.dtype == torch.float32
    assert not out.ce.requires_grad and not out.ce_drop.requires_grad and not out.sup.requires_grad
    xr = x.detach().cpu().clone().requires_grad_()
    xdr = xd.detach().cpu().clone().requires_grad_()
    cpu = lambda t: t.cpu() if isinstance(t, torch.Tensor) else t  # noqa: E731
    exp = ref.dropclass_loss(xr, xdr, y.cpu(), cpu(drop), lam=lam, alpha=alpha, weight=cpu(weight),
                             ignore_index=ignore_index)
    for name in ("loss", "ce", "ce_drop", "sup"):
        assert_close(getattr(out, name), getattr(exp, name).float(), **F32, name=name)
    if grad_scale is None:
        out.loss.backward()
        exp.loss.backward()
    else:
        out.loss.backward(torch.tensor(grad_scale, device=x.device))
        exp.loss.backward(torch.tensor(grad_scale))
    assert xf.grad.dtype == x.dtype and xdf.grad.dtype == xd.dtype
    assert_close(xf.grad, xr.grad, name="grad logits")
    assert_close(xdf.grad, xdr.grad, name="grad logits_drop")
    return out, xf, xdf


def drop_of_form(form, B, K, device):
    if form == "none":
        return None
    if form == "int":
        return K - 1
    if form == "long":  # -1: this sample drops nothing
        return torch.tensor([(b % (K + 1)) - 1 for b in range(B)], dtype=torch.long, device=device)
    if form == "mask":
        m = torch.rand(B, K, device=device) < 0.4
        return m
    if form == "all":
        return torch.ones(B, K, dtype=torch.bool, device=device)
    raise ValueError(form)


def clone_leaf(x):
    y = x.detach().clone()
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        y = y.contiguous(memory_format=torch.channels_last)
    return y.requires_grad_(x.requires_grad)


def grad_cases(out, device):
    """A random dOut (in a different layout from out: channels_last) and the
    stride-0 gradient of out.sum() (design §9)."""
    g = torch.randn(out.shape, device=device).to(out.dtype)
    return [("random", make_layout(g, "channels_last")), ("sum", None)]


def run_backward(out, grad):
    if grad is None:
        out.sum().backward()  # hands the backward ones(1).expand(shape): stride 0
    else:
        out.backward(grad)


def dg_scale(feats, grad):
    """max over (b, c) of Σ_n |dOut·A|: the magnitude that bounds the float32
    rounding of dg = Σ_n dOut·A (and of dW, a keep-weighted mean of dg)."""
    d = torch.ones_like(feats, dtype=torch.float32) if grad is None else grad.float()
    return (d.abs() * feats.detach().float().abs()).sum(dim=(2, 3)).max().clamp_min(1e-30).item() if feats.numel() else 1.0


def check_class_drop(feats, weight, k, drop, device, grad_kind):
    f2, w2 = clone_leaf(feats), clone_leaf(weight)
    out = dops.class_drop(feats, weight, k, drop=drop)
    exp = ref.class_drop(f2, w2, k, drop=drop)
    assert out.dtype == feats.dtype and out.shape == feats.shape
    cl = feats.is_contiguous(memory_format=torch.channels_last) and not feats.is_contiguous()
    assert out.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    assert_close(out, exp, name="out")
    grad = None if grad_kind == "sum" else make_layout(torch.randn(out.shape, device=device).to(out.dtype), "channels_last")
    run_backward(out, grad)
    run_backward(exp, grad)
    if feats.requires_grad:
        assert_close(feats.grad, f2.grad, name="dA")
    if weight.requires_grad:
        # dW = Σ_b keep·dg/|keep| restricted to W>0 and top-k: float32 sums over
        # N in chunked order vs PyTorch's; |error| ≲ (N + B)·2^-24·Σ_n|dOut·A|,
        # far below 1e-5 of that scale for these N; a wrong index or stride
        # gives errors of order the scale itself. dW is then cast to W's dtype.
        scale = dg_scale(feats, grad)
        tol = TOL[weight.dtype]
        assert_close(weight.grad, w2.grad, rtol=tol["rtol"], atol=max(tol["atol"], 1e-5 * scale), name="dW")


def check_suppress_gate_level(feats, logits, k, drop, device):
    """suppress == reference.apply_gate(feats, channel_gate(S_fused)) with S_fused
    the fused class_importance (deterministic, so the same S as inside suppress):
    checks the gate/apply/backward kernels independently of top-k ties."""
    B, C = feats.shape[:2]
    K = logits.shape[1]
    S = dops.class_importance(feats, logits)
    assert S.dtype == torch.float32 and S.shape == (K, C)
    dropped = dops.drop_mask(drop, B, K, device)
    g = ref.channel_gate(S, k, dropped)
    f2 = clone_leaf(feats)
    out = dops.suppress(feats, logits, k, drop=drop)
    exp = ref.apply_gate(f2, g)
    assert out.dtype == feats.dtype
    cl = feats.is_contiguous(memory_format=torch.channels_last) and not feats.is_contiguous()
    assert out.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    assert_close(out, exp, name="out")
    for grad_kind, grad in grad_cases(out, device):
        feats.grad = None
        f2.grad = None
        out = dops.suppress(feats, logits, k, drop=drop)
        exp = ref.apply_gate(f2, g)
        run_backward(out, grad)
        run_backward(exp, grad)
        assert_close(feats.grad, f2.grad, name=f"dA ({grad_kind})")
    assert logits.grad is None  # class_logits gets no gradient


def close_on_device(actual, expected, name):
    """assert_close for huge tensors, without copying them to the host (bf16 TOL)."""
    tol = TOL[expected.dtype]
    a, e = actual.float(), expected.float()
    bad = ~torch.isclose(a, e, rtol=tol["rtol"], atol=tol["atol"])
    n_bad = int(bad.sum())
    assert n_bad == 0, f"{name}: {n_bad} elements differ, max abs diff {(a - e).abs().max().item():.4g}"
