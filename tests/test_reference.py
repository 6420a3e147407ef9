"""The reference is the spec in code (design §2–§4): these tests check it against
independent formulations -- float64 gradcheck, F.cross_entropy/F.interpolate,
the official class_drop formula, and the linear-head property of §2."""
import pytest
import torch
import torch.nn.functional as F

from debias_ops import reference as ref
from tests.helpers import assert_close

f64 = torch.float64


def _feats(B, C, H, W, dtype=f64, offset=0.0):
    return (torch.randn(B, C, H, W, dtype=dtype) + offset)


# ----------------------------------------------------------------------------- §2 moments / importance

def test_batch_moments_match_definition():
    A, L = _feats(3, 5, 4, 7), _feats(3, 4, 4, 7)
    a_mean, l_mean, G, X = ref.batch_moments(A, L)
    # Straight from the definition, with explicit loops over channels.
    Af = A.permute(1, 0, 2, 3).reshape(5, -1)
    Lf = L.permute(1, 0, 2, 3).reshape(4, -1)
    M = Af.shape[1]
    for c in range(5):
        for d in range(5):
            expect = ((Af[c] - Af[c].mean()) * (Af[d] - Af[d].mean())).sum() / M
            assert abs(G[c, d] - expect) < 1e-12
        for j in range(4):
            expect = ((Lf[j] - Lf[j].mean()) * (Af[c] - Af[c].mean())).sum() / M
            assert abs(X[j, c] - expect) < 1e-12
    assert_close(a_mean, Af.mean(1))
    assert_close(l_mean, Lf.mean(1))


def test_importance_solves_ridge_system():
    G0 = torch.randn(6, 6, dtype=f64)
    G = G0 @ G0.T / 6
    X = torch.randn(3, 6, dtype=f64)
    S = ref.importance_from_moments(G, X)
    rho = 1e-3 * G.diagonal().mean() + 1e-6
    w_fit = X @ torch.linalg.inv(G + rho * torch.eye(6, dtype=f64))
    assert_close(S, w_fit.clamp_min(0))


@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_importance_recovers_linear_head(dtype):
    """Logits from a linear 1×1 head with bias: the probe recovers relu(weight)
    up to the ridge shrinkage ρ/(λ+ρ) ≈ 1e-3 relative on a well-conditioned batch."""
    B, C, K = 4, 12, 5
    head = torch.nn.Conv2d(C, K, 1, bias=True).to(dtype)
    feats = _feats(B, C, 16, 16, dtype=dtype, offset=0.5)
    with torch.no_grad():
        logits = head(feats)
    S = ref.class_importance(feats, logits)
    W = head.weight.detach().reshape(K, C)
    scale = W.abs().max().item()
    assert_close(S, W.clamp_min(0), rtol=0, atol=5e-3 * scale, name="S")


def test_suppress_reduces_to_class_drop_for_linear_head():
    B, C, K = 4, 10, 4
    head = torch.nn.Conv2d(C, K, 1, bias=True).double()
    with torch.no_grad():
        # Well-separated weights so top-k membership is unambiguous under the ridge.
        head.weight.copy_((torch.randperm(K * C).double().reshape(K, C, 1, 1) - K * C / 3) / (K * C))
    feats = _feats(B, C, 16, 16)
    with torch.no_grad():
        logits = head(feats)
    drop = torch.tensor([1, -1, 3, 0])
    for k in (None, 3, C):
        out_s = ref.suppress(feats, logits, k, drop=drop)
        out_c = ref.class_drop(feats, head.weight, k, drop=drop)
        # The ridge shrinks the fitted weights by ~1e-3 relative.
        assert_close(out_s, out_c.detach(), rtol=3e-3, atol=3e-3, name=f"k={k}")


def test_moments_empty_batch_is_zero():
    a, l, G, X = ref.batch_moments(torch.zeros(0, 3, 4, 4), torch.zeros(0, 2, 4, 4))
    assert G.abs().sum() == 0 and X.abs().sum() == 0 and a.shape == (3,) and l.shape == (2,)
    S = ref.class_importance(torch.zeros(0, 3, 4, 4), torch.zeros(0, 2, 4, 4))
    assert S.shape == (2, 3) and S.abs().sum() == 0


# ----------------------------------------------------------------------------- §3 selection

def test_topk_mask_and_gate_by_hand():
    S = torch.tensor([[3.0, 0.0, 1.0, 2.0], [0.5, 4.0, 0.0, 1.0], [1.0, 1.5, 2.5, 0.0]], dtype=f64)
    m = ref.topk_mask(S, 2)
    assert m.tolist() == [[True, False, False, True], [False, True, False, True], [False, True, True, False]]
    dropped = torch.tensor([[False, True, False], [True, True, True], [False, False, False]])
    g = ref.channel_gate(S, 2, dropped)
    T = S * m
    assert_close(g[0], (T[0] + T[2]) / 2)
    assert_close(g[1], torch.zeros(4, dtype=f64))  # every class dropped: g = 0
    assert_close(g[2], T.sum(0) / 3)
    assert ref.topk_mask(S, None).all() and ref.topk_mask(S, 4).all()


def test_class_drop_matches_official_formula():
    """Official code: weights_avg = relu(W * rm).sum(0) / rm.sum(), rm = ones with the dropped class zeroed."""
    B, C, K = 3, 9, 6
    feat = _feats(B, C, 5, 7)
    W = torch.randn(K, C, dtype=f64)
    drop_cls = 4
    rm = torch.ones(K, 1, dtype=f64)
    rm[drop_cls] = 0
    weights_avg = F.relu(W * rm).sum(0) / rm.sum()
    expect = feat * weights_avg[None, :, None, None]
    assert_close(ref.class_drop(feat, W, None, drop=drop_cls), expect)
    assert_close(ref.class_drop(feat, W.reshape(K, C, 1, 1), drop=drop_cls), expect)


def test_suppress_gradient_treats_importance_as_constant():
    """design §2/§3: the fitted importance is a batch statistic held constant, so
    the gradient of suppress w.r.t. feats is exactly dA = dOut·g. gradcheck the
    map A ↦ A·g(S) with S frozen, then check suppress's autograd gradient equals
    dOut·g for a random dOut and for out.sum()."""
    dropped = torch.tensor([[True, False, False], [False, False, False]])
    for k in (None, 2):
        feats = _feats(2, 5, 3, 4).requires_grad_()
        logits = _feats(2, 3, 3, 4).requires_grad_()
        g = ref.channel_gate(ref.class_importance(feats, logits), k, dropped)
        assert torch.autograd.gradcheck(lambda a, g=g: ref.apply_gate(a, g), (feats,))
        out = ref.suppress(feats, logits, k, drop=dropped)
        dout = torch.randn_like(out)
        (grad,) = torch.autograd.grad(out, feats, dout, retain_graph=True)
        assert_close(grad, dout * g[:, :, None, None])
        out.sum().backward()
        assert_close(feats.grad, g[:, :, None, None].expand_as(feats))
        assert logits.grad is None


def test_class_drop_gradcheck():
    feats = _feats(2, 6, 3, 3).requires_grad_()
    W = torch.randn(4, 6, dtype=f64)
    W[W.abs() < 0.05] = 0.3  # keep away from the relu kink, where the finite difference is one-sided
    W.requires_grad_()
    mask = torch.tensor([[True, False, False, False], [False, False, True, True]])
    for k in (None, 1, 3):
        assert torch.autograd.gradcheck(lambda a, w, k=k: ref.class_drop(a, w, k, drop=mask), (feats, W))


def test_class_drop_weight_grad_formula():
    """dW[j,c] = [W>0]·topk[j,c]·Σ_b keep[b,j]·dg[b,c]/max(1, Σ_j keep[b,j]) (design §3)."""
    B, C, K, k = 3, 7, 4, 3
    feats = _feats(B, C, 2, 5)
    W = torch.randn(K, C, dtype=f64, requires_grad=True)
    dropped = torch.tensor([[True, False, False, False], [False, False, False, False], [True, True, True, True]])
    out = ref.class_drop(feats, W, k, drop=dropped)
    dout = torch.randn_like(out)
    out.backward(dout)
    dg = (dout * feats).sum(dim=(2, 3))
    keep = (~dropped).double()
    per_b = keep / keep.sum(1, keepdim=True).clamp_min(1)
    mask = ref.topk_mask(W.detach().clamp_min(0), k)
    expect = (W.detach() > 0).double() * mask.double() * (per_b.T @ dg)
    assert_close(W.grad, expect)


def test_channels_last_and_dtypes_kept():
    feats = _feats(2, 6, 4, 5, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    logits = _feats(2, 3, 4, 5, dtype=torch.float16)
    out = ref.suppress(feats, logits, 2)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    out = ref.class_drop(feats, torch.randn(3, 6), 2, drop=1)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- §4 loss

def _independent_loss_terms(logits, logits_drop, target, dropped, weight, ignore_index):
    H, W = target.shape[1:]
    up = F.interpolate(logits.double(), size=(H, W), mode="bilinear", align_corners=False)
    upd = F.interpolate(logits_drop.double(), size=(H, W), mode="bilinear", align_corners=False)
    ce = F.cross_entropy(up, target.long(), weight=weight, ignore_index=ignore_index)
    y_drop = target.clone().long()
    for b in range(target.shape[0]):
        for j in range(logits.shape[1]):
            if dropped[b, j]:
                y_drop[b][y_drop[b] == j] = ignore_index
    ce_drop = F.cross_entropy(upd, y_drop, weight=weight, ignore_index=ignore_index)
    prob = torch.softmax(logits_drop.double(), 1).mean((2, 3))
    sup = prob[dropped].mean() if dropped.any() else torch.zeros((), dtype=f64)
    return ce, ce_drop, sup


@pytest.mark.parametrize("low,high", [((5, 6), (5, 6)), ((4, 5), (8, 10)), ((3, 4), (12, 16)), ((5, 7), (17, 23))])
@pytest.mark.parametrize("use_weight", [False, True])
def test_loss_matches_cross_entropy(low, high, use_weight):
    B, K = 3, 5
    logits = torch.randn(B, K, *low, dtype=f64)
    logits_drop = torch.randn(B, K, *low, dtype=f64)
    target = torch.randint(0, K, (B, *high))
    target[0, :2] = 255
    weight = torch.rand(K, dtype=f64) + 0.5 if use_weight else None
    dropped = torch.tensor([[False, True, False, False, True], [False] * 5, [True, False, False, False, False]])
    res = ref.dropclass_loss(logits, logits_drop, target, dropped, lam=0.3, alpha=10.0, weight=weight)
    ce, ce_drop, sup = _independent_loss_terms(logits, logits_drop, target, dropped, weight, 255)
    assert_close(res.ce, ce, name="ce")
    assert_close(res.ce_drop, ce_drop, name="ce_drop")
    assert_close(res.sup, sup, name="sup")
    assert_close(res.loss, 0.3 * ce + 0.7 * ce_drop + 10.0 * sup, name="loss")
    assert not res.ce.requires_grad and not res.sup.requires_grad


def test_loss_gradcheck():
    B, K = 2, 4
    logits = torch.randn(B, K, 3, 4, dtype=f64, requires_grad=True)
    logits_drop = torch.randn(B, K, 3, 4, dtype=f64, requires_grad=True)
    target = torch.randint(0, K, (B, 7, 9))
    target[1, 3:] = 255
    weight = torch.rand(K, dtype=f64) + 0.5
    drop = torch.tensor([2, -1])
    fn = lambda a, b: ref.dropclass_loss(a, b, target, drop, lam=0.4, alpha=3.0, weight=weight).loss
    assert torch.autograd.gradcheck(fn, (logits, logits_drop))


def test_loss_all_ignored_is_zero_with_zero_grad():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    logits_drop = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.full((2, 8, 8), 255, dtype=torch.uint8)
    res = ref.dropclass_loss(logits, logits_drop, target, None, lam=0.5)
    assert res.loss.item() == 0.0 and res.ce.item() == 0.0 and res.sup.item() == 0.0
    res.loss.backward()
    assert logits.grad.abs().sum() == 0 and logits_drop.grad.abs().sum() == 0


def test_loss_every_class_of_sample_dropped():
    """Dropping a class removes its pixels from ce_drop only; dropping every class empties ce_drop."""
    logits = torch.randn(1, 3, 4, 4, dtype=f64)
    target = torch.randint(0, 3, (1, 4, 4))
    res = ref.dropclass_loss(logits, logits, target, torch.ones(1, 3, dtype=torch.bool), lam=0.5, alpha=1.0)
    assert res.ce_drop.item() == 0.0
    assert_close(res.sup, torch.tensor(1 / 3, dtype=f64))  # mean of softmax over all classes
