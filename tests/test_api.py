"""Public API (design §5): drop forms, sampling, edge cases, dispatch, packaging."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import debias_ops as dops
from debias_ops import _backend
from tests.helpers import assert_close, kernel_device

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- drop forms

def test_drop_forms_are_equivalent():
    B, K = 3, 4
    as_mask = {
        "none": dops.drop_mask(None, B, K, "cpu"),
        "int": dops.drop_mask(2, B, K, "cpu"),
        "int_none": dops.drop_mask(-1, B, K, "cpu"),
        "long": dops.drop_mask(torch.tensor([1, -1, 3]), B, K, "cpu"),
        "int32": dops.drop_mask(torch.tensor([1, -1, 3], dtype=torch.int32), B, K, "cpu"),
        "scalar": dops.drop_mask(torch.tensor(2), B, K, "cpu"),
    }
    assert not as_mask["none"].any() and not as_mask["int_none"].any()
    assert as_mask["int"].tolist() == [[False, False, True, False]] * 3
    assert torch.equal(as_mask["scalar"], as_mask["int"])
    expect = [[False, True, False, False], [False] * 4, [False, False, False, True]]
    assert as_mask["long"].tolist() == expect and as_mask["int32"].tolist() == expect
    feats, W = torch.randn(B, 5, 2, 3), torch.randn(K, 5)
    assert_close(dops.class_drop(feats, W, drop=torch.tensor([1, -1, 3])),
                 dops.class_drop(feats, W, drop=torch.tensor(expect)))


@pytest.mark.parametrize("per_sample", [True, False])
def test_sample_drop(per_sample):
    g = torch.Generator().manual_seed(1)
    m = dops.sample_drop(4000, 5, 0.3, generator=g, per_sample=per_sample)
    assert m.shape == (4000, 5) and m.dtype == torch.bool
    assert (m.sum(1) <= 1).all()
    if per_sample:
        rate = m.any(1).float().mean().item()
        assert abs(rate - 0.3) < 0.03  # binomial sd ≈ 0.007
        counts = m.sum(0).float()
        assert (counts / counts.sum() - 0.2).abs().max() < 0.04
    else:
        assert (m == m[0]).all()  # one decision for the whole batch
    assert not dops.sample_drop(7, 3, 0.0).any()
    assert (dops.sample_drop(7, 3, 1.0).sum(1) == 1).all()
    assert dops.sample_drop(0, 3, 0.5).shape == (0, 3)
    a = dops.sample_drop(9, 4, 0.5, generator=torch.Generator().manual_seed(3))
    b = dops.sample_drop(9, 4, 0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- edge cases

@pytest.mark.parametrize("B,C,H,W,K,k", [(0, 4, 3, 3, 2, 1), (2, 5, 1, 1, 2, 5), (3, 6, 2, 7, 2, 1), (1, 7, 5, 3, 3, None)])
def test_edge_shapes(B, C, H, W, K, k):
    feats = torch.randn(B, C, H, W, requires_grad=True)
    logits = torch.randn(B, K, H, W)
    out = dops.suppress(feats, logits, k)
    assert out.shape == feats.shape
    out.sum().backward()
    assert torch.isfinite(feats.grad).all()
    out = dops.class_drop(feats, torch.randn(K, C), k, drop=0)
    assert out.shape == feats.shape and torch.isfinite(out).all()
    assert dops.class_importance(feats, logits).shape == (K, C)


def test_every_class_dropped_gives_zero():
    feats = torch.randn(2, 4, 3, 3)
    everything = torch.ones(2, 3, dtype=torch.bool)
    assert dops.class_drop(feats, torch.randn(3, 4), drop=everything).abs().sum() == 0
    assert dops.suppress(feats, torch.randn(2, 3, 3, 3), 2, drop=everything).abs().sum() == 0


def test_layout_and_mixed_dtypes():
    feats = torch.randn(2, 6, 4, 5).contiguous(memory_format=torch.channels_last)
    logits = torch.randn(2, 3, 4, 5, dtype=torch.bfloat16)
    out = dops.suppress(feats, logits, 3)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.dtype == feats.dtype
    expect = dops.suppress(feats.contiguous(), logits, 3)
    assert_close(out, expect)
    assert dops.class_importance(feats, logits).dtype == torch.float32


def test_keyword_arguments():
    """Every op accepts its design §5 argument names as keywords."""
    feats, logits, W = torch.randn(2, 5, 3, 4), torch.randn(2, 3, 3, 4), torch.randn(3, 5)
    assert_close(dops.suppress(feats=feats, class_logits=logits, k=2, drop=1), dops.suppress(feats, logits, 2, drop=1))
    assert_close(dops.class_drop(feats=feats, class_weight=W, k=2), dops.class_drop(feats, W, 2))
    assert_close(dops.class_importance(feats=feats, class_logits=logits), dops.class_importance(feats, logits))
    x, y = torch.randn(2, 3, 2, 2), torch.randint(0, 3, (2, 4, 4))
    assert_close(dops.dropclass_loss(logits=x, logits_drop=x, target=y, drop=1, lam=0.5).loss,
                 dops.dropclass_loss(x, x, y, 1, lam=0.5).loss)


def test_dropclass_loss_returns_named_tuple():
    res = dops.dropclass_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 8, 8)),
                              torch.tensor([0, -1]), lam=0.5)
    assert isinstance(res, dops.DropClassLoss) and res._fields == ("loss", "ce", "ce_drop", "sup")
    assert res.loss.shape == () and res.loss.dtype == torch.float32



def _autocast_cases(device, autocast=False):
    """Outputs and gradients of every op on fp32 inputs (for the autocast regression);
    the forward under autocast, the backward outside it (as PyTorch recommends)."""
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 7, 3, 5, generator=g).to(device).requires_grad_()
    weight = torch.randn(3, 7, generator=g).to(device).requires_grad_()
    logits = torch.randn(2, 3, 3, 5, generator=g).to(device)
    x = torch.randn(2, 3, 3, 4, generator=g).to(device).requires_grad_()
    y = torch.randint(0, 3, (2, 7, 9), generator=g).to(device)
    drop = torch.tensor([1, -1], device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        out_c = dops.class_drop(feats, weight, 3, drop=drop)
        out_s = dops.suppress(feats, logits, 2, drop=drop)
        S = dops.class_importance(feats, logits)
        loss = dops.dropclass_loss(x, x, y, drop, lam=0.3).loss
    (out_c.sum() + out_s.sum() + loss).backward()
    return [out_c, out_s, S, loss, feats.grad, weight.grad, x.grad]


def _check_autocast_ignored(device):
    """Regression: the ops pick their own precision (design §1); under an enclosing
    torch.autocast the gate's (B, K)·(K, C) product ran in bf16 and class_drop's
    output moved by ~1e-2. Now the results are bitwise those without autocast."""
    expect = _autocast_cases(device)
    got = _autocast_cases(device, autocast=True)
    for i, (a, e) in enumerate(zip(got, expect)):
        assert a.dtype == e.dtype and torch.equal(a, e), f"case {i}: autocast changed the result"


def test_ops_ignore_autocast_reference():
    _check_autocast_ignored(torch.device("cpu"))


@pytest.mark.kernel
def test_ops_ignore_autocast_kernels():
    _check_autocast_ignored(kernel_device())



@pytest.mark.kernel
@pytest.mark.parametrize("checks", [False, True], ids=["value_checks_off", "value_checks_on"])
def test_no_python_level_host_sync(checks):
    """design §5: no host sync in the ops' hot path. Forward and backward of every
    fused op with Tensor.item / tolist / __bool__ patched to fail: with value
    checks off nothing may call them; with them on, the (switchable) checks do
    -- which shows the guard bites. (The GPU CUDA-graph tests catch C++-level syncs.)"""
    from unittest import mock

    device = kernel_device()

    def sync(*args, **kwargs):
        raise AssertionError("host sync in the op's path")

    feats = torch.randn(2, 7, 3, 5, device=device, requires_grad=True)
    weight = torch.randn(3, 7, device=device, requires_grad=True)
    logits = torch.randn(2, 3, 3, 5, device=device)
    x = torch.randn(2, 3, 3, 4, device=device, requires_grad=True)
    y = torch.randint(0, 3, (2, 7, 9), device=device)
    drop = torch.tensor([1, -1], device=device)
    patches = [mock.patch.object(torch.Tensor, name, sync) for name in ("item", "tolist", "__bool__")]
    with dops.value_checks(checks), patches[0], patches[1], patches[2]:
        def run():
            total = (dops.class_drop(feats, weight, 3, drop=drop).sum() + dops.suppress(feats, logits, 2, drop=drop).sum()
                     + dops.class_importance(feats, logits).sum() + dops.dropclass_loss(x, x, y, drop, lam=0.3).loss)
            total.backward()
        if checks:
            with pytest.raises(AssertionError, match="host sync"):
                run()
        else:
            run()

# ----------------------------------------------------------------------------- dispatch

def test_backend_env(monkeypatch):
    cpu = torch.randn(2)
    monkeypatch.setenv("DEBIAS_OPS_BACKEND", "reference")
    assert not _backend.use_triton(cpu)
    monkeypatch.setenv("DEBIAS_OPS_BACKEND", "auto")
    assert not _backend.use_triton(cpu)  # auto: CPU tensors run the reference
    monkeypatch.setenv("DEBIAS_OPS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="DEBIAS_OPS_BACKEND"):
        _backend.use_triton(cpu)
    monkeypatch.setenv("DEBIAS_OPS_BACKEND", "triton")
    assert not _backend.use_triton(cpu.double())  # float64 always runs the reference
    if _backend.triton_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            _backend.use_triton(cpu)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert _backend.use_triton(cpu)


def _run(code: str, env=None, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=300)


def test_import_without_triton():
    """`import debias_ops` works where triton is missing; the triton backend then says why it cannot run."""
    code = """
        import sys
        sys.modules["triton"] = None  # import triton -> ImportError; find_spec("triton") -> None
        import torch, debias_ops as d
        f = torch.randn(2, 4, 3, 3); L = torch.randn(2, 3, 3, 3)
        assert d.suppress(f, L, 2).shape == f.shape
        try:
            import os; os.environ["DEBIAS_OPS_BACKEND"] = "triton"
            d.suppress(f, L, 2)
        except RuntimeError as e:
            assert "triton is not installed" in str(e), e
            print("OK")
    """
    r = _run(code, env={"DEBIAS_OPS_BACKEND": "auto"})
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr


def test_import_has_no_side_effects():
    """``import debias_ops`` imports no triton and no kernel: only the triton-free
    ``debias_ops.kernels._env`` (the TRITON_INTERPRET switch) of the kernels package."""
    r = _run("import sys, debias_ops; print('triton' in sys.modules, "
             "sorted(m for m in sys.modules if m.startswith('debias_ops.kernels')))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False ['debias_ops.kernels', 'debias_ops.kernels._env']", r.stdout


def test_installed_package_layout(tmp_path):
    """When debias_ops is installed (make test installs it), the kernels are the
    subpackage debias_ops.kernels, and no bare top-level `kernels` is installed."""
    code = """
        import importlib.util, debias_ops
        print(debias_ops.__file__)
        print(importlib.util.find_spec("debias_ops.kernels") is not None)
        print(importlib.util.find_spec("kernels") is not None)
    """
    r = _run(code, cwd=tmp_path, env={"PYTHONPATH": ""})
    if r.returncode != 0 and "No module named 'debias_ops'" in r.stderr:
        pytest.skip("debias_ops is not installed in this interpreter (tests run from the source tree)")
    assert r.returncode == 0, r.stderr
    path, has_kernels, bare = r.stdout.split()
    assert Path(path).parent != ROOT / "debias_ops", "expected the installed copy, not the source tree"
    assert has_kernels == "True" and bare == "False"
