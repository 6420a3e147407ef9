"""Property-based parity of the fused ops with the reference (design §2–§5).

``hypothesis`` draws small random problems -- B (0 included), C, H, W, K, k,
the feats / logits dtypes, the memory layout (contiguous, channels_last, a
step-sliced view, a cropped view, and views with a non-zero storage offset in
NCHW and channels_last), the drop form, and for the loss random label / logit
sizes (up, down, same size, non-integer ratios), label dtypes, class weights,
ignore fractions, lam and alpha -- and checks the fused op against
``debias_ops.reference`` on ``tests.helpers.kernel_device()`` (CPU under the
Triton interpreter in CI, or a GPU).

The comparisons reuse the checkers of the targeted test files, so the
tolerances are theirs (explained there, summarised here):

* outputs and dA (A·g, dOut·g: one fp32 product, one cast): ``helpers.TOL`` of
  the dtype (fp32 1e-5 relative; fp16 / bf16 one rounding of the store);
* dW (a keep-weighted mean of dg = Σ_n dOut·A, fp32 sums in another order):
  the weight dtype's TOL plus 1e-5 of max_(b,c) Σ_n |dOut·A|
  (``tests.helpers.check_class_drop``);
* S = class_importance: 1e-4 of max|S| when M = B·N ≥ 8·C (well conditioned),
  5e-3 of max|S| otherwise (the ridge solve amplifies the fp32 rounding of G by
  up to (λ_max + ρ)/ρ ≈ 1e3; ``test_kernels_selection.test_class_importance``);
* loss terms at fp32 TOL, gradients at the logits dtype's TOL
  (``tests.helpers.check_loss``).

Top-k near-ties: the fused S differs from the reference S by rounding, so two
channels near-tied at the k-th place may swap. As in
``test_kernels_selection``, suppress is therefore checked at the gate level:
against ``reference.apply_gate(feats, reference.channel_gate(S_fused, k, drop))``
with S_fused the (deterministic) fused ``class_importance``; S itself is
compared separately above. class_drop has no such issue (the same S = relu(W)
on both sides).

Settings: few examples, ``derandomize=True`` (the same examples on every run:
CI is not flaky) and ``deadline=None`` (the interpreter's speed varies).
"""
from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import debias_ops as dops  # noqa: E402
from debias_ops import reference as ref  # noqa: E402

from .helpers import assert_close, kernel_device, make_layout  # noqa: E402
from .helpers import check_class_drop as _check_class_drop  # noqa: E402
from .helpers import check_loss as _check_loss  # noqa: E402
from .helpers import check_suppress_gate_level as _check_suppress_gate_level  # noqa: E402
from .helpers import drop_of_form as _drop  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "strided", "cropped", "offset", "offset_cl"]
LOSS_LAYOUTS = ["contiguous", "channels_last", "strided", "offset", "offset_cl"]
DROPS = ["none", "int", "long", "mask", "all"]

SETTINGS = dict(max_examples=20, deadline=None, derandomize=True, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of x in the given layout; the offset layouts are views at a
    non-zero storage_offset into a NaN-filled larger tensor (``helpers.make_layout``)."""
    B, C, H, W = x.shape
    if layout in ("offset", "offset_cl"):
        return make_layout(x, layout)
    if layout == "cropped":  # H, W that do not merge into one stride
        wide = torch.zeros(B, C, H + 1, W + 2, dtype=x.dtype, device=x.device)
        wide[:, :, 1:, 2:] = x
        return wide[:, :, 1:, 2:]
    if layout == "strided" and x.numel() == 0:
        return torch.empty(B, C, H, 2 * W, dtype=x.dtype, device=x.device)[..., ::2]
    return make_layout(x, layout)


def _leaf(x: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
    return x.requires_grad_(requires_grad)


@st.composite
def problems(draw, max_c=40):
    B = draw(st.sampled_from([0, 1, 1, 2, 2, 3]))
    C = draw(st.integers(1, max_c))
    H = draw(st.integers(1, 6))
    W = draw(st.integers(1, 6))
    K = draw(st.integers(2, 6))
    k = draw(st.one_of(st.none(), st.integers(1, C)))
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(LAYOUTS))
    drop = draw(st.sampled_from(DROPS))
    grad_kind = draw(st.sampled_from(["random", "sum"]))
    seed = draw(st.integers(0, 2**16))
    return dict(B=B, C=C, H=H, W=W, K=K, k=k, dtype=dtype, layout=layout, drop=drop, grad_kind=grad_kind, seed=seed)


def _note(p):
    hypothesis.note(repr({k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in p.items()}))


@pytest.mark.kernel
@settings(**SETTINGS)
@given(p=problems(), weight_4d=st.booleans(), wdtype=st.sampled_from(DTYPES),
       needs=st.sampled_from(["both", "feats", "weight"]))
def test_class_drop_matches_reference(p, weight_4d, wdtype, needs):
    """out, dA and dW of class_drop (design §3), weight (K, C) or (K, C, 1, 1) in any
    float dtype (dW in the weight's dtype), either input frozen."""
    device = kernel_device()
    _note(p)
    torch.manual_seed(p["seed"])
    B, C, H, W, K = p["B"], p["C"], p["H"], p["W"], p["K"]
    feats = _leaf(_layout(torch.randn(B, C, H, W, device=device).to(p["dtype"]), p["layout"]), needs != "weight")
    w = torch.randn(K, C, device=device)
    w[torch.rand(K, C, device=device) < 0.1] = 0.0  # relu kink: d/dx max(0, x) at 0 is 0
    w = (w[:, :, None, None] if weight_4d else w).to(wdtype).requires_grad_(needs != "feats")
    _check_class_drop(feats, w, p["k"], _drop(p["drop"], B, K, device), device, p["grad_kind"])
    if w.requires_grad:
        assert w.grad.dtype == w.dtype and w.grad.shape == w.shape
    if feats.requires_grad:
        assert feats.grad.dtype == feats.dtype and feats.grad.shape == feats.shape


@pytest.mark.kernel
@settings(**SETTINGS)
@given(p=problems(), ldtype=st.sampled_from(DTYPES), llayout=st.sampled_from(LAYOUTS))
def test_suppress_matches_reference(p, ldtype, llayout):
    """suppress at the gate level (see the module docstring for top-k ties):
    out and dA (random and stride-0 dOut), logits in another dtype / layout
    and requiring grad (they get none)."""
    device = kernel_device()
    _note(p)
    torch.manual_seed(p["seed"])
    B, C, H, W, K = p["B"], p["C"], p["H"], p["W"], p["K"]
    feats = _leaf(_layout(torch.randn(B, C, H, W, device=device).to(p["dtype"]), p["layout"]))
    logits = _leaf(_layout(torch.randn(B, K, H, W, device=device).to(ldtype), llayout))
    _check_suppress_gate_level(feats, logits, p["k"], _drop(p["drop"], B, K, device), device)


@pytest.mark.kernel
@settings(**SETTINGS)
@given(p=problems(max_c=24), ldtype=st.sampled_from(DTYPES), llayout=st.sampled_from(LAYOUTS),
       mean=st.sampled_from([0.0, 0.0, 3.0]))
def test_class_importance_matches_reference(p, ldtype, llayout, mean):
    """S (K, C) of design §2 vs the reference from the same (rounded) inputs; a
    shifted mean checks the centring (Ā, L̄ removed) of the one-pass moments."""
    device = kernel_device()
    _note(p)
    torch.manual_seed(p["seed"])
    B, C, H, W, K = p["B"], p["C"], p["H"], p["W"], p["K"]
    feats = _layout((torch.randn(B, C, H, W, device=device) + mean).to(p["dtype"]), p["layout"])
    logits = _layout((torch.randn(B, K, H, W, device=device) - mean).to(ldtype), llayout)
    S = dops.class_importance(feats, logits)
    exp = ref.class_importance(feats, logits)
    assert S.dtype == torch.float32 and S.shape == (K, C)
    M = B * H * W
    # tolerance: module docstring (conditioning of G + ρI); with |mean| = 3 ≫ σ = 1 the
    # shifted moments keep G's relative error at the unshifted level (kernels/moments.py)
    rel = 1e-4 if M >= 8 * C else 5e-3
    assert_close(S, exp, rtol=0, atol=rel * exp.abs().max().clamp_min(1e-6).item(), name="S")
    if M == 0:
        assert torch.count_nonzero(S) == 0


@st.composite
def loss_problems(draw):
    B = draw(st.sampled_from([0, 1, 2, 2, 3]))
    K = draw(st.integers(2, 7))
    h = draw(st.integers(1, 7))
    w = draw(st.integers(1, 7))
    ratio = draw(st.sampled_from(["same", "up", "down", "any"]))
    if ratio == "same":
        H, W = h, w
    elif ratio == "up":
        H, W = h * draw(st.integers(1, 3)) + draw(st.integers(0, 2)), w * draw(st.integers(1, 3)) + draw(st.integers(0, 2))
    elif ratio == "down":
        H, W = max(1, h - draw(st.integers(0, 5))), max(1, w - draw(st.integers(0, 5)))
    else:
        H, W = draw(st.integers(1, 13)), draw(st.integers(1, 13))
    return dict(
        B=B, K=K, h=h, w=w, H=H, W=W,
        dtype=draw(st.sampled_from(DTYPES)), dtype_drop=draw(st.sampled_from(DTYPES)),
        layout=draw(st.sampled_from(LOSS_LAYOUTS)), layout_drop=draw(st.sampled_from(LOSS_LAYOUTS)),
        label=draw(st.sampled_from([(torch.int64, 255), (torch.int64, -100), (torch.uint8, 255), (torch.int32, 0)])),
        ignore_frac=draw(st.sampled_from([0.0, 0.2, 0.6, 1.1])),
        weight=draw(st.booleans()), drop=draw(st.sampled_from(DROPS)),
        lam=draw(st.sampled_from([0.0, 0.3, 1.0])), alpha=draw(st.sampled_from([0.0, 1.0, 10.0])),
        grad_scale=draw(st.sampled_from([None, -1.7])), seed=draw(st.integers(0, 2**16)),
    )


@pytest.mark.kernel
@settings(**{**SETTINGS, "max_examples": 15})  # the slowest under the interpreter (several s per example)
@given(p=loss_problems())
def test_dropclass_loss_matches_reference(p):
    """loss, CE, CE', sup and both logits' gradients (design §4): random label and
    logit sizes (bilinear up / down / same size), dtypes per branch, layouts,
    label dtypes and ignore_index, class weights, ignored fractions up to
    every pixel, every drop form."""
    device = kernel_device()
    _note(p)
    g = torch.Generator().manual_seed(p["seed"])
    B, K, h, w, H, W = p["B"], p["K"], p["h"], p["w"], p["H"], p["W"]
    ldt, ignore_index = p["label"]
    x = (torch.randn(B, K, h, w, generator=g) * 3).to(p["dtype"]).to(device)
    xd = (torch.randn(B, K, h, w, generator=g) * 3).to(p["dtype_drop"]).to(device)
    y = torch.randint(0, K, (B, H, W), generator=g)
    y[torch.rand(B, H, W, generator=g) < p["ignore_frac"]] = ignore_index
    y = y.to(ldt).to(device)
    wt = (torch.rand(K, generator=g) * 2 + 0.1).to(device) if p["weight"] else None
    drop = _drop(p["drop"], B, K, device)
    # make_layout's "strided" asserts a non-contiguous view, which an empty tensor is not
    lay = [("contiguous" if (B == 0 and lt == "strided") else lt) for lt in (p["layout"], p["layout_drop"])]
    _check_loss(x, xd, y, drop, lam=p["lam"], alpha=p["alpha"], weight=wt, ignore_index=ignore_index,
                grad_scale=p["grad_scale"], layout=lay[0], layout_drop=lay[1])
