"""Bad input raises ValueError/TypeError naming the argument (design §5), before
any computation: the reference and fused functions are patched to fail if
they are reached."""
import pytest
import torch

import debias_ops as dops
from debias_ops import api


@pytest.fixture
def no_compute(monkeypatch):
    monkeypatch.setenv("DEBIAS_OPS_BACKEND", "reference")  # the patched math below is the reference's

    def boom(*a, **k):
        raise AssertionError("computation reached before validation")
    for name in ("suppress", "class_drop", "class_importance", "dropclass_loss"):
        monkeypatch.setattr(api._ref, name, boom)


F = torch.randn(2, 6, 4, 5)
L = torch.randn(2, 3, 4, 5)
W = torch.randn(3, 6)


@pytest.mark.parametrize("call,exc,name", [
    (lambda: dops.suppress(F[0], L, 2), ValueError, "feats"),
    (lambda: dops.suppress(F.long(), L, 2), TypeError, "feats"),
    (lambda: dops.class_drop(F[:, :0], W[:, :0]), ValueError, "feats"),  # C = 0 (was a reshape RuntimeError)
    (lambda: dops.suppress([1.0], L, 2), TypeError, "feats"),
    (lambda: dops.suppress(F, L[:, :, :3], 2), ValueError, "class_logits"),
    (lambda: dops.suppress(F, L[:1], 2), ValueError, "class_logits"),
    (lambda: dops.suppress(F, L[:, :1], 2), ValueError, "class_logits"),
    (lambda: dops.suppress(F, L.int(), 2), TypeError, "class_logits"),
    (lambda: dops.suppress(F, L, 0), ValueError, "k"),
    (lambda: dops.suppress(F, L, 7), ValueError, "k"),
    (lambda: dops.suppress(F, L, 2.0), TypeError, "k"),
    (lambda: dops.suppress(F, L, True), TypeError, "k"),
    (lambda: dops.suppress(F, L, 2, drop=3), ValueError, "drop"),
    (lambda: dops.suppress(F, L, 2, drop=-2), ValueError, "drop"),
    (lambda: dops.suppress(F, L, 2, drop=torch.tensor([0, 3])), ValueError, "drop"),
    (lambda: dops.suppress(F, L, 2, drop=torch.tensor([0, -2])), ValueError, "drop"),
    (lambda: dops.suppress(F, L, 2, drop=torch.tensor([0, 1, 2])), ValueError, "drop"),
    (lambda: dops.suppress(F, L, 2, drop=torch.zeros(2, 4, dtype=torch.bool)), ValueError, "drop"),
    (lambda: dops.suppress(F, L, 2, drop=torch.zeros(2, 3)), TypeError, "drop"),
    (lambda: dops.suppress(F, L, 2, drop="cat"), TypeError, "drop"),
    (lambda: dops.class_importance(F, L[:, :1]), ValueError, "class_logits"),
    (lambda: dops.class_importance(F.int(), L), TypeError, "feats"),
    (lambda: dops.class_drop(F, W[:, :5]), ValueError, "class_weight"),
    (lambda: dops.class_drop(F, W[:1]), ValueError, "class_weight"),
    (lambda: dops.class_drop(F, W.reshape(3, 6, 1, 1).expand(3, 6, 2, 1)), ValueError, "class_weight"),
    (lambda: dops.class_drop(F, W[0]), ValueError, "class_weight"),
    (lambda: dops.class_drop(F, W.long()), TypeError, "class_weight"),
    (lambda: dops.class_drop(F, W, k=0), ValueError, "k"),
    (lambda: dops.class_drop(F, W, k=7), ValueError, "k"),
    (lambda: dops.class_drop(F, W, drop=torch.tensor([5, 0])), ValueError, "drop"),
])
def test_selection_bad_inputs(no_compute, call, exc, name):
    with pytest.raises(exc, match=name):
        call()


LG = torch.randn(2, 3, 4, 5)
T = torch.randint(0, 3, (2, 8, 10))


@pytest.mark.parametrize("call,exc,name", [
    (lambda: dops.dropclass_loss(LG[0], LG, T, None, lam=0.5), ValueError, "logits"),
    (lambda: dops.dropclass_loss(LG.long(), LG, T, None, lam=0.5), TypeError, "logits"),
    (lambda: dops.dropclass_loss(LG, LG[:, :2], T, None, lam=0.5), ValueError, "logits_drop"),
    (lambda: dops.dropclass_loss(LG[:, :1], LG[:, :1], T, None, lam=0.5), ValueError, "logits"),
    (lambda: dops.dropclass_loss(LG, LG, T.float(), None, lam=0.5), TypeError, "target"),
    (lambda: dops.dropclass_loss(LG, LG, T[0], None, lam=0.5), ValueError, "target"),
    (lambda: dops.dropclass_loss(LG, LG, T[:1], None, lam=0.5), ValueError, "target"),
    (lambda: dops.dropclass_loss(LG, LG, T + 3, None, lam=0.5), ValueError, "target"),
    (lambda: dops.dropclass_loss(LG, LG, T - 1, None, lam=0.5), ValueError, "target"),
    (lambda: dops.dropclass_loss(LG, LG, T, 3, lam=0.5), ValueError, "drop"),
    (lambda: dops.dropclass_loss(LG, LG, T, None, lam=1.5), ValueError, "lam"),
    (lambda: dops.dropclass_loss(LG, LG, T, None, lam=-0.1), ValueError, "lam"),
    (lambda: dops.dropclass_loss(LG, LG, T, None, lam="a"), TypeError, "lam"),
    (lambda: dops.dropclass_loss(LG, LG, T, None, lam=0.5, weight=torch.ones(4)), ValueError, "weight"),
    (lambda: dops.dropclass_loss(LG, LG, T, None, lam=0.5, weight=torch.ones(3, dtype=torch.long)), TypeError, "weight"),
    (lambda: dops.dropclass_loss(LG, LG, T, None, lam=float("nan")), ValueError, "lam"),
    (lambda: dops.dropclass_loss(LG, LG, T, None, lam=0.5, alpha=-1.0), ValueError, "alpha"),
    (lambda: dops.dropclass_loss(LG, LG, T, None, lam=0.5, alpha=float("nan")), ValueError, "alpha"),
    (lambda: dops.dropclass_loss(LG, LG, T, None, lam=0.5, alpha=float("inf")), ValueError, "alpha"),
    (lambda: dops.dropclass_loss(LG, LG, T, None, lam=0.5, alpha="10"), TypeError, "alpha"),
    (lambda: dops.dropclass_loss(LG, LG, T, None, lam=0.5, weight=torch.tensor([1.0, float("nan"), 1.0])),
     ValueError, "weight"),
    (lambda: dops.dropclass_loss(LG, LG, T, None, lam=0.5, weight=torch.tensor([1.0, -1.0, 1.0])), ValueError, "weight"),
    (lambda: dops.dropclass_loss(LG, LG, T, None, lam=0.5, weight=torch.zeros(3)), ValueError, "weight"),
    (lambda: dops.sample_drop(2, 3, float("nan")), ValueError, "p"),
    (lambda: dops.sample_drop(2, 1, 0.5), ValueError, "num_classes"),
    (lambda: dops.sample_drop(2, 3, 1.5), ValueError, "p"),
    (lambda: dops.sample_drop(2, 3.0, 0.5), TypeError, "num_classes"),
])
def test_loss_and_sampling_bad_inputs(no_compute, call, exc, name):
    with pytest.raises(exc, match=name):
        call()


def test_value_checks_can_be_switched_off(no_compute):
    bad = torch.tensor([0, 3])
    with pytest.raises(ValueError, match="drop"):
        dops.suppress(F, L, 2, drop=bad)
    with dops.value_checks(False):
        assert not dops.value_checks_enabled()
        with pytest.raises(AssertionError, match="before validation"):  # passes validation, reaches the (patched) math
            dops.suppress(F, L, 2, drop=bad)
        with pytest.raises(AssertionError, match="before validation"):
            dops.dropclass_loss(LG, LG, T + 3, None, lam=0.5)
    assert dops.value_checks_enabled()


def test_value_checks_env(monkeypatch):
    monkeypatch.setenv("DEBIAS_OPS_VALUE_CHECKS", "0")
    assert not dops.value_checks_enabled()
    monkeypatch.setenv("DEBIAS_OPS_VALUE_CHECKS", "1")
    assert dops.value_checks_enabled()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for mixed devices")
def test_mixed_devices():
    with pytest.raises(ValueError, match="class_logits"):
        dops.suppress(F.cuda(), L, 2)
    with pytest.raises(ValueError, match="drop"):
        dops.class_drop(F.cuda(), W.cuda(), drop=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="target"):
        dops.dropclass_loss(LG.cuda(), LG.cuda(), T, None, lam=0.5)


def test_mixed_devices_meta():
    """Mixed devices are detected from metadata alone (meta tensors stand in for a second device)."""
    with pytest.raises(ValueError, match="class_logits"):
        dops.suppress(F, L.to("meta"), 2)
    with pytest.raises(ValueError, match="class_weight"):
        dops.class_drop(F, W.to("meta"))
    with pytest.raises(ValueError, match="weight"):
        dops.dropclass_loss(LG, LG, T, None, lam=0.5, weight=torch.ones(3, device="meta"))
