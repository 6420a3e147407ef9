"""DropClassHead (design §6) and the progress() schedule helper.

The expected values are written out with torch.nn.functional and the reference
ops of ``debias_ops.reference`` (never through the module's own code path), so
a wrong wiring of classifier / selector / suppression in the module fails here.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import debias_ops as dops
from debias_ops import reference as ref
from tests.helpers import assert_close, kernel_device, make_layout


def _head(C=6, K=4, importance="weight", k=None, **kw):
    head = dops.DropClassHead(C, K, importance=importance, k=k, **kw)
    # Non-trivial BatchNorm state so the eval path's use of running stats is checked.
    bn = head.selector[1]
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return head


def _selector_eval(head, x):
    conv, bn = head.selector[0], head.selector[1]
    y = F.conv2d(x, conv.weight)
    y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps)
    return torch.relu(y)


def _selector_train(head, x):
    conv, bn = head.selector[0], head.selector[1]
    y = F.conv2d(x, conv.weight)
    y = F.batch_norm(y, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
    return torch.relu(y)


def _classify(head, x):
    return F.conv2d(x, head.classifier.weight, head.classifier.bias)


def _suppression(head, feats, drop, logits=None):
    if head.importance == "weight":
        return ref.class_drop(feats, head.classifier.weight, head.k, drop=drop)
    if logits is None:
        logits = _classify(head, feats)
    return ref.suppress(feats, logits, head.k, drop=drop)


# ----------------------------------------------------------------------------- eval path

@pytest.mark.parametrize("importance", ["weight", "logits"])
@pytest.mark.parametrize("k", [None, 1, 3])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 6, 5, 7), (1, 6, 1, 1), (3, 6, 4, 4)])
def test_eval_path_equals_formula(importance, k, layout, shape):
    if importance == "logits" and shape[0] * shape[2] * shape[3] == 1:
        pytest.skip("the logits probe needs more than one position to be informative")
    head = _head(C=shape[1], K=4, importance=importance, k=k).eval()
    feats = make_layout(torch.randn(shape), layout)
    with torch.no_grad():
        out = head(feats)
        expected = _classify(head, _selector_eval(head, _suppression(head, feats, None)))
    assert out.shape == (shape[0], 4, shape[2], shape[3])
    # fp32 throughout; conv/BN orderings differ only in summation order
    assert_close(out, expected, rtol=1e-5, atol=1e-5, name="eval logits")
    assert_close(head.predict(feats), out, name="predict == forward(feats)")


def test_eval_ignores_progress_and_keeps_every_class():
    head = _head().eval()
    feats = torch.randn(2, 6, 3, 3)
    with torch.no_grad():
        kept = head.suppression(feats, None)
        expected = ref.class_drop(feats, head.classifier.weight, None, drop=None)
    assert_close(kept, expected, name="suppression with every class kept")


# ----------------------------------------------------------------------------- training path

@pytest.mark.parametrize("importance", ["weight", "logits"])
@pytest.mark.parametrize("k", [None, 2])
@pytest.mark.parametrize("label_size", [(5, 7), (10, 14)])  # same size, and upsampled 2x
def test_train_output_matches_formula(importance, k, label_size):
    torch.manual_seed(1)
    head = _head(importance=importance, k=k, alpha=3.0).train()
    B, K = 3, 4
    feats = torch.randn(B, 6, 5, 7, requires_grad=True)
    target = torch.randint(0, K, (B,) + label_size)
    target[0, 0, :3] = 255
    drop = torch.tensor([[False, True, False, False], [False] * 4, [True, False, False, False]])
    t = 0.3
    out = head(feats, target, t, drop=drop)
    assert isinstance(out, dops.DropClassOutput)
    assert out._fields == ("loss", "ce", "ce_drop", "sup", "logits", "logits_drop", "drop")
    assert out.drop.dtype == torch.bool and out.drop.shape == (B, K)
    assert torch.equal(out.drop, drop)

    logits = _classify(head, feats)
    logits_drop = _classify(head, _selector_train(head, _suppression(head, feats, drop, logits)))
    exp = ref.dropclass_loss(logits, logits_drop, target, drop, lam=1 - t, alpha=3.0)
    assert_close(out.logits, logits, name="logits")
    assert_close(out.logits_drop, logits_drop, rtol=1e-5, atol=1e-5, name="logits_drop")
    for name in ("loss", "ce", "ce_drop", "sup"):
        assert_close(getattr(out, name), getattr(exp, name), rtol=1e-5, atol=1e-6, name=name)
    assert not out.ce.requires_grad and out.loss.requires_grad

    # gradients: module vs the written-out formula, for every parameter and the input
    params = [feats] + list(head.parameters())
    g_mod = torch.autograd.grad(out.loss, params)
    g_exp = torch.autograd.grad(exp.loss, params)
    names = ["feats"] + [n for n, _ in head.named_parameters()]
    for n, a, e in zip(names, g_mod, g_exp):
        assert_close(a, e, rtol=1e-4, atol=1e-6, name=f"grad {n}")  # fp32, different op order in BN


def test_weight_gradient_flows_through_class_drop():
    """design §3: class_drop is differentiable in class_weight; the head keeps that gradient
    (weight_grad=True), and weight_grad=False removes exactly the importance's part."""
    torch.manual_seed(2)
    feats = torch.randn(2, 6, 4, 4)
    target = torch.randint(0, 4, (2, 4, 4))
    drop = torch.tensor([1, 2])
    grads = {}
    for wg in (True, False):
        torch.manual_seed(3)
        head = dops.DropClassHead(6, 4, weight_grad=wg)
        out = head(feats, target, 0.5, drop=drop)
        grads[wg] = torch.autograd.grad(out.loss, head.classifier.weight)[0]
    torch.manual_seed(3)
    head = dops.DropClassHead(6, 4)
    W = head.classifier.weight
    logits = _classify(head, feats)
    sup_in = ref.class_drop(feats, W.detach(), None, drop=drop)
    logits_drop = _classify(head, _selector_train(head, sup_in))
    exp = ref.dropclass_loss(logits, logits_drop, target, drop, lam=0.5)
    g_detached = torch.autograd.grad(exp.loss, W)[0]
    assert_close(grads[False], g_detached, rtol=1e-5, atol=1e-7, name="grad W, importance detached")
    assert (grads[True] - grads[False]).abs().max() > 1e-6, "class_drop sent no gradient into classifier.weight"


def test_all_parameters_receive_gradients():
    head = _head(importance="logits")
    feats = torch.randn(2, 6, 3, 3, requires_grad=True)
    out = head(feats, torch.randint(0, 4, (2, 3, 3)), 0.5, drop=torch.tensor([0, -1]))
    out.loss.backward()
    for n, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert feats.grad is not None


def test_p_and_lam_follow_progress():
    head = _head()
    feats, target = torch.randn(8, 6, 3, 3), torch.randint(0, 4, (8, 3, 3))
    out0 = head(feats, target, 0.0)
    assert not out0.drop.any(), "t = 0 means p = 0: nothing dropped"
    # lam = 1 - t and p = t; with nothing dropped sup = 0 and loss = lam*ce + (1-lam)*ce_drop
    assert_close(out0.loss, out0.ce, name="t=0: loss == ce")
    out1 = head(feats, target, 1.0)
    assert torch.equal(out1.drop.sum(1), torch.ones(8, dtype=torch.long)), "t = 1: every sample drops one class"
    assert_close(out1.loss, out1.ce_drop + 10.0 * out1.sup, name="t=1: loss == ce_drop + alpha*sup")
    # overrides
    out = head(feats, target, 0.0, p=1.0)
    assert out.drop.any(1).all()
    out = head(feats, target, None, p=0.0, lam=0.25)
    assert_close(out.loss, 0.25 * out.ce + 0.75 * out.ce_drop, name="lam override")


def test_per_sample_false_drops_one_class_for_the_batch():
    head = _head(per_sample=False)
    feats, target = torch.randn(5, 6, 3, 3), torch.randint(0, 4, (5, 3, 3))
    for _ in range(5):
        d = head(feats, target, 1.0).drop
        assert torch.equal(d, d[:1].expand_as(d)) and d.sum(1).eq(1).all()


def test_generator_makes_drops_reproducible():
    head = _head()
    feats, target = torch.randn(6, 6, 3, 3), torch.randint(0, 4, (6, 3, 3))
    d1 = head(feats, target, 0.7, generator=torch.Generator().manual_seed(5)).drop
    d2 = head(feats, target, 0.7, generator=torch.Generator().manual_seed(5)).drop
    assert torch.equal(d1, d2)


def test_class_weight_and_ignore_index():
    w = torch.tensor([1.0, 2.0, 0.5, 1.0])
    head = _head(weight=w, ignore_index=7)
    feats = torch.randn(2, 6, 3, 3)
    target = torch.randint(0, 4, (2, 3, 3))
    target[0, 0, 0] = 7
    drop = torch.tensor([-1, 3])
    out = head(feats, target, 0.4, drop=drop)
    exp = ref.dropclass_loss(out.logits, out.logits_drop, target, drop, lam=0.6, alpha=10.0, weight=w, ignore_index=7)
    assert_close(out.loss, exp.loss, name="weighted loss")


def test_channels_last_matches_contiguous():
    torch.manual_seed(4)
    head = _head()
    feats = torch.randn(2, 6, 5, 3)
    target = torch.randint(0, 4, (2, 5, 3))
    drop = torch.tensor([2, 0])
    a = head(feats, target, 0.5, drop=drop)
    b = head(feats.contiguous(memory_format=torch.channels_last), target, 0.5, drop=drop)
    assert_close(b.loss, a.loss, name="loss, channels_last")
    assert_close(b.logits_drop, a.logits_drop, rtol=1e-5, atol=1e-6, name="logits_drop, channels_last")
    head.eval()
    with torch.no_grad():
        assert_close(head(feats.contiguous(memory_format=torch.channels_last)), head(feats),
                     rtol=1e-5, atol=1e-6, name="eval, channels_last")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(dtype):
    if dtype == torch.float16 and not torch.amp.autocast_mode.is_autocast_available("cpu"):
        pytest.skip("no CPU autocast")
    head = _head()
    feats = torch.randn(2, 6, 4, 4, requires_grad=True)
    target = torch.randint(0, 4, (2, 8, 8))
    with torch.autocast("cpu", dtype=dtype):
        out = head(feats, target, 0.5, drop=torch.tensor([1, -1]))
    assert out.logits.dtype == dtype and out.logits_drop.dtype == dtype
    assert out.loss.dtype == torch.float32  # the loss accumulates in fp32 (design §1)
    out.loss.backward()
    assert torch.isfinite(feats.grad).all() and torch.isfinite(head.classifier.weight.grad).all()
    # close to the fp32 result: bf16 has 8 mantissa bits, so a few 1e-2 relative
    ref_out = head(feats.detach(), target, 0.5, drop=torch.tensor([1, -1]))
    assert_close(out.loss, ref_out.loss.detach(), rtol=5e-2, atol=5e-2, name="autocast loss vs fp32")
    head.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        assert torch.isfinite(head(feats).float()).all()


@pytest.mark.parametrize("importance", ["weight", "logits"])
def test_torch_compile_fullgraph(importance):
    """The head traces without graph breaks (aot_eager: no C++ toolchain needed on CPU)."""
    torch._dynamo.reset()
    head = _head(importance=importance)
    feats = torch.randn(2, 6, 4, 4)
    target = torch.randint(0, 4, (2, 4, 4))
    drop = torch.tensor([[True, False, False, False], [False, False, True, False]])
    compiled = torch.compile(head, backend="aot_eager", fullgraph=True)
    out = compiled(feats, target, 0.5, drop=drop)
    exp = head(feats, target, 0.5, drop=drop)
    assert_close(out.loss, exp.loss, rtol=1e-5, atol=1e-6, name="compiled loss")
    out.loss.backward()
    # sampling inside the compiled graph (no explicit drop)
    out2 = compiled(feats, target, 0.5)
    assert out2.drop.shape == (2, 4)
    head.eval()
    with torch.no_grad():
        assert_close(compiled(feats), head(feats), rtol=1e-5, atol=1e-6, name="compiled eval")


# ----------------------------------------------------------------------------- errors, schedule

def test_errors():
    with pytest.raises(ValueError, match="importance"):
        dops.DropClassHead(4, 3, importance="grad")
    with pytest.raises(ValueError, match="num_classes"):
        dops.DropClassHead(4, 1)
    with pytest.raises(ValueError, match="k"):
        dops.DropClassHead(4, 3, k=5)
    head = dops.DropClassHead(4, 3)
    feats, target = torch.randn(1, 4, 2, 2), torch.randint(0, 3, (1, 2, 2))
    with pytest.raises(ValueError, match="progress"):
        head(feats, target)
    with pytest.raises(ValueError, match="progress"):
        head(feats, target, 1.5)
    with pytest.raises(ValueError, match="in_channels"):
        head(torch.randn(1, 5, 2, 2), target, 0.5)
    with pytest.raises(ValueError, match="drop"):
        head(feats, target, 0.5, drop=torch.zeros(1, 4, dtype=torch.bool))


def test_progress():
    assert dops.progress(0, 10) == 0.0
    assert dops.progress(5, 10) == 0.5
    assert dops.progress(12, 10) == 1.0
    assert dops.progress(-1, 10) == 0.0
    assert dops.progress(333, 1000, steps=10) == 0.3
    assert dops.progress(2.5, 5.0) == 0.5
    with pytest.raises(ValueError):
        dops.progress(1, 0)
    with pytest.raises(TypeError):
        dops.progress("1", 3)


# ----------------------------------------------------------------------------- fused path (interpreter or GPU)

@pytest.mark.kernel
@pytest.mark.parametrize("importance", ["weight", "logits"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_head_on_kernel_path_matches_formula(importance, layout):
    """The head on the fused ops (CUDA, or CPU under TRITON_INTERPRET=1 with
    DEBIAS_OPS_BACKEND=triton) against the written-out reference formula."""
    device = kernel_device()
    torch.manual_seed(6)
    head = _head(C=16, K=4, importance=importance).to(device)
    feats = make_layout(torch.randn(2, 16, 4, 5, device=device), layout).requires_grad_(True)
    target = torch.randint(0, 4, (2, 8, 10), device=device)
    drop = torch.tensor([[False, False, True, False], [True, False, False, False]], device=device)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # fp32 convs at fp32 accuracy on a GPU
        out = head(feats, target, 0.5, drop=drop)
        logits = _classify(head, feats)
        logits_drop = _classify(head, _selector_train(head, _suppression(head, feats, drop, logits)))
        exp = ref.dropclass_loss(logits, logits_drop, target, drop, lam=0.5, alpha=10.0)
        # fp32 kernels vs the fp32 reference: same math, different reduction order; the logits
        # probe's ridge solve can amplify that by ~10x, hence 1e-4 rather than TOL's 1e-5.
        assert_close(out.loss, exp.loss, rtol=1e-4, atol=1e-5, name="loss on the kernel path")
        params = [feats] + list(head.parameters())
        for n, a, e in zip(["feats"] + [n for n, _ in head.named_parameters()],
                           torch.autograd.grad(out.loss, params), torch.autograd.grad(exp.loss, params)):
            assert_close(a, e, rtol=1e-4, atol=1e-5, name=f"grad {n} on the kernel path")
        head.eval()
        with torch.no_grad():
            expected = _classify(head, _selector_eval(head, _suppression(head, feats, None)))
            assert_close(head(feats), expected, rtol=1e-4, atol=1e-5, name="eval on the kernel path")


# ----------------------------------------------------------------------------- GPU (fused path)

@pytest.mark.gpu
@pytest.mark.parametrize("importance", ["weight", "logits"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_matches_cpu_reference(importance, dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(5)
    head = _head(C=16, K=5, importance=importance)
    feats = torch.randn(3, 16, 9, 11)
    target = torch.randint(0, 5, (3, 18, 22))
    drop = torch.tensor([0, -1, 4])
    exp = head(feats, target, 0.5, drop=drop)
    head_gpu = head.cuda()
    feats_gpu = feats.cuda().contiguous(memory_format=torch.channels_last)
    # cuDNN convolutions default to TF32 for fp32 inputs: turn that off to compare at fp32 accuracy
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False), \
            torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        out = head_gpu(feats_gpu, target.cuda(), 0.5, drop=drop.cuda())
    # fp32: kernels accumulate in fp32 like the reference; bf16 autocast: 8 mantissa bits
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    assert_close(out.loss.cpu(), exp.loss.detach(), name="gpu loss", **tol)
    out.loss.backward()
    head_gpu.eval()
    with torch.no_grad():
        assert torch.isfinite(head_gpu(feats.cuda())).all()
