"""GPU-only checks that the per-op files do not have (``@pytest.mark.gpu``; each
skips without a CUDA device). Run by ``scripts/gpu_check.sh`` with the rest of
``-m "kernel or gpu"``:

* suppress / class_drop at design §8's shapes (W48, W18s), bf16 and fp32, NCHW
  and channels_last, out / dA / dW against the reference in float64;
* bitwise determinism: two runs of every fused op (forward and gradients);
* the fused loss under CUDA-graph capture + replay (value checks off) and
  ``torch.library.opcheck`` on CUDA tensors (the selection ops have theirs in
  test_kernels_selection.py);
* ``compute-sanitizer --tool memcheck`` over one small launch of each kernel,
  skipped with the sanitizer's own words where the runtime refuses the device
  (gVisor: "Device not supported").
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import debias_ops as dops
from benchmarks.gpu_check import SANITIZER_TIMEOUT_S, find_sanitizer
from benchmarks.shapes import GPU_SHAPES
from debias_ops import reference as ref

from .helpers import TOL, assert_close, cuda_device, loss_inputs, make_layout
from .helpers import close_on_device as _close_on_device
from .helpers import dg_scale as _dg_scale

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.gpu
DT = {torch.float32: "f32", torch.bfloat16: "bf16"}


def _leaf64(x: torch.Tensor) -> torch.Tensor:
    """A float64 copy in x's memory format (float64 always runs the reference path)."""
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format
    return x.detach().double().contiguous(memory_format=fmt).requires_grad_(x.requires_grad)


# ----------------------------------------------------------------------------- design §8 shapes

@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=DT.get)
@pytest.mark.parametrize("shape", ["W48", "W18s"])
@pytest.mark.parametrize("op", ["class_drop", "suppress"])
def test_gpu_spec_shape_parity(op, shape, dtype, layout):
    """out and dA: the dtype's TOL against float64 cast once (one fp32 product and
    one cast on the fused side). dW (class_drop): dg sums N = 32768 products per
    (b, c) in fp32 chunks; 1e-4 of max Σ|dOut·A| (as in the > 2^31 test) against
    float64, while a lost or doubled chunk moves it by ≳ 1/256 of that. suppress is
    checked at the gate level (the reference gate from the fused S, which is itself
    checked: M = B·N ≥ 8·C, so 1e-4 of max|S| as in test_class_importance)."""
    device = cuda_device()
    s = GPU_SHAPES[shape]
    feats = make_layout(torch.randn(s.B, s.C, s.H, s.W, device=device).to(dtype), layout).requires_grad_(True)
    grad = make_layout(torch.randn(s.B, s.C, s.H, s.W, device=device).to(dtype), layout)
    drop = dops.sample_drop(s.B, s.K, 0.5, device=device)
    dropped = dops.drop_mask(drop, s.B, s.K, device)
    f64 = _leaf64(feats)
    if op == "class_drop":
        weight = torch.randn(s.K, s.C, device=device, requires_grad=True)
        w64 = weight.detach().double().requires_grad_(True)
        out = dops.class_drop(feats, weight, 64, drop=drop)
        exp = ref.class_drop(f64, w64, 64, drop=drop)
    else:
        # logits of a linear head plus noise: S = relu(W_fit) is O(1/√C), far above the rounding of the moments
        w_true = torch.randn(s.K, s.C, device=device) / s.C ** 0.5
        logits = torch.einsum("kc,bchw->bkhw", w_true, feats.detach().float()) + torch.randn(s.B, s.K, s.H, s.W, device=device)
        logits = make_layout(logits.to(dtype), layout)
        S = dops.class_importance(feats, logits)
        S_exp = ref.class_importance(feats.detach().double(), logits.double())
        assert_close(S, S_exp.float(), rtol=0, atol=1e-4 * S_exp.abs().max().item(), name="S")
        out = dops.suppress(feats, logits, 64, drop=drop)
        exp = ref.apply_gate(f64, ref.channel_gate(S, 64, dropped).double())
    assert out.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    out.backward(grad)
    exp.backward(grad.double())
    with torch.no_grad():
        _close_on_device(out, exp.to(dtype), "out")
        _close_on_device(feats.grad, f64.grad.to(dtype), "dA")
        if op == "class_drop":
            scale = _dg_scale(feats, grad)
            assert_close(weight.grad.double(), w64.grad, rtol=0, atol=1e-4 * scale, name="dW")


# ----------------------------------------------------------------------------- determinism

def _run_op(op: str, device: torch.device):
    """One fused forward + backward at W18s (bf16; the loss at its 128×256 → 512×1024
    shape): the outputs and the gradients, cloned."""
    s = GPU_SHAPES["W18s"]
    g = torch.Generator(device=device).manual_seed(0)
    if op == "loss":
        x, xd, y, wt, dropped = loss_inputs(s.B, s.K, s.H, s.W, *s.label_hw, dtype=torch.bfloat16, weight=True,
                                            device=device)
        x.requires_grad_(True)
        xd.requires_grad_(True)
        res = dops.dropclass_loss(x, xd, y, dropped, lam=0.6, weight=wt)
        res.loss.backward()
        return [res.loss, res.ce, res.ce_drop, res.sup, x.grad, xd.grad]
    feats = torch.randn(s.B, s.C, s.H, s.W, device=device, generator=g).to(torch.bfloat16).requires_grad_(True)
    grad = torch.randn(s.B, s.C, s.H, s.W, device=device, generator=g).to(torch.bfloat16)
    logits = torch.randn(s.B, s.K, s.H, s.W, device=device, generator=g).to(torch.bfloat16)
    weight = torch.randn(s.K, s.C, device=device, generator=g, requires_grad=True)
    drop = torch.arange(s.B, device=device) % s.K
    if op == "class_importance":
        return [dops.class_importance(feats, logits)]
    out = dops.class_drop(feats, weight, 64, drop=drop) if op == "class_drop" else dops.suppress(feats, logits, 64, drop=drop)
    out.backward(grad)
    return [out.detach(), feats.grad] + ([weight.grad] if op == "class_drop" else [])


@pytest.mark.parametrize("op", ["class_drop", "suppress", "class_importance", "loss"])
def test_gpu_bitwise_deterministic(op):
    """Two runs on the same inputs give the same bits (no atomics, fixed reduction orders)."""
    device = cuda_device()
    first, again = _run_op(op, device), _run_op(op, device)
    for i, (a, b) in enumerate(zip(first, again)):
        assert torch.equal(a, b), f"{op} output {i}: {int((a != b).sum())} of {a.numel()} elements differ between runs"


# ----------------------------------------------------------------------------- the loss: CUDA graphs, opcheck

def test_gpu_loss_cuda_graph_capture_replay():
    """fwd+bwd of dropclass_loss captured once (value checks off), replayed on new
    inputs copied into the captured tensors: the replay's loss and gradients match
    the reference on those inputs."""
    device = cuda_device()
    x, xd, y, wt, dropped = loss_inputs(2, 5, 16, 16, 64, 64, weight=True, device=device)
    x.requires_grad_(True)
    xd.requires_grad_(True)

    def step():
        res = dops.dropclass_loss(x, xd, y, dropped, lam=0.6, weight=wt)
        res.loss.backward()
        return res.loss

    with dops.value_checks(False):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                x.grad = xd.grad = None
                step()
        torch.cuda.current_stream().wait_stream(s)
        x.grad = xd.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss = step()
    with torch.no_grad():
        x.copy_(torch.randn_like(x) * 3)
        xd.copy_(torch.randn_like(xd) * 3)
        y.copy_(torch.roll(y, 1, dims=1))
        x.grad.zero_()
        xd.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    xr, xdr = x.detach().clone().requires_grad_(True), xd.detach().clone().requires_grad_(True)
    exp = ref.dropclass_loss(xr, xdr, y, dropped, lam=0.6, weight=wt)
    exp.loss.backward()
    assert_close(static_loss, exp.loss.float(), **TOL[torch.float32], name="loss (replay)")
    assert_close(x.grad, xr.grad, name="grad logits (replay)")
    assert_close(xd.grad, xdr.grad, name="grad logits_drop (replay)")


def test_gpu_loss_opcheck():
    device = cuda_device()
    from debias_ops import fused_loss
    x, xd, y, wt, dropped = loss_inputs(2, 3, 3, 4, 7, 9, weight=True, device=device)
    for need in ((True, True), (True, False), (False, False)):
        torch.library.opcheck(fused_loss.dropclass_loss_fwd,
                              (x.requires_grad_(need[0]), xd.requires_grad_(need[1]), y, dropped, wt,
                               0.6, 4.0, 255, need[0], need[1]))


# ----------------------------------------------------------------------------- compute-sanitizer

# One small launch of each kernel: gate (forward, backward with dA and dg) in NCHW
# and channels_last via class_drop; moments (shift, partial, reduce) + gate via
# suppress; the loss's den / main / final kernels, forward + backward. Each result
# is checked against the reference, so the launches really ran on the GPU.
LAUNCHES = """
import torch, debias_ops as dops
from debias_ops import reference as ref
dev = torch.device("cuda")
torch.manual_seed(0)
for fmt in (torch.contiguous_format, torch.channels_last):
    a = torch.randn(2, 24, 5, 7, device=dev).contiguous(memory_format=fmt).requires_grad_(True)
    w = torch.randn(3, 24, device=dev, requires_grad=True)
    l = torch.randn(2, 3, 5, 7, device=dev)
    drop = torch.tensor([1, -1], device=dev)
    for out, exp in ((dops.class_drop(a, w, 5, drop=drop), ref.class_drop(a, w, 5, drop=drop)),
                     (dops.suppress(a, l, 5, drop=drop), None)):
        out.sum().backward()
        if exp is not None:
            torch.testing.assert_close(out, exp)
x = torch.randn(2, 3, 6, 5, device=dev, requires_grad=True)
y = torch.randint(0, 3, (2, 11, 9), device=dev)
res = dops.dropclass_loss(x, x, y, torch.tensor([2, -1], device=dev), lam=0.5)
res.loss.backward()
torch.testing.assert_close(res.loss, ref.dropclass_loss(x, x, y, torch.tensor([2, -1], device=dev), lam=0.5).loss)
torch.cuda.synchronize()
print("launches ok")
"""
REFUSED = re.compile(r"device not supported|not supported on this (device|platform)|unable to (attach|initialize)", re.I)


def test_gpu_compute_sanitizer_memcheck():
    cuda_device()
    tool = find_sanitizer()
    if tool is None:
        pytest.skip("compute-sanitizer not found (PATH, /usr/local/cuda*/bin)")
    # memory errors only: CUDA API calls that fail by design (probes by torch and Triton) are not this test's concern
    cmd = [tool, "--tool", "memcheck", "--report-api-errors", "no", "--error-exitcode", "86", "--print-limit", "20",
           sys.executable, "-c", LAUNCHES]
    # no caching allocator: every tensor is its own allocation, so memcheck sees out-of-bounds accesses
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1", PYTHONPATH=str(ROOT))
    try:
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=SANITIZER_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"compute-sanitizer memcheck ran past {SANITIZER_TIMEOUT_S} s: {(err.stdout or b'')[-2000:]!r}")
    text = res.stdout + res.stderr
    refused = REFUSED.search(text)
    if refused and "launches ok" not in text:
        line = next(ln for ln in text.splitlines() if refused.group(0) in ln).strip()
        pytest.skip(f"compute-sanitizer refused this machine's device (runtime: kernel {os.uname().release}): {line[:160]}")
    summary = re.search(r"ERROR SUMMARY: (\d+) error", text)
    assert res.returncode == 0 and "launches ok" in text and summary and summary.group(1) == "0", \
        f"memcheck exit {res.returncode}:\n{text[-6000:]}"
