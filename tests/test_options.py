"""The DropClass settings (``DropClassOptions``) and what the wrapper refuses or warns about.

Bad settings fail with ValueError/TypeError naming the argument wherever they enter:
``DropClassOptions``, ``DropClassHead``, ``dops.dropclass`` and (alpha, weight)
``dops.dropclass_loss``. The generic classifier tap refuses a classifier that forward
never calls or calls twice, and names trainable modules that run after it.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import debias_ops as dops
from tests.helpers import assert_close

K = 4
NAN, INF = float("nan"), float("inf")


class _Seg(nn.Module):
    """A tiny custom segmentation model: backbone, then ``classifier`` (a 1×1 conv), then upsampling."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.classifier = nn.Conv2d(8, K, 1)

    def forward(self, x):
        return F.interpolate(self.classifier(self.backbone(x)), size=x.shape[-2:], mode="bilinear",
                             align_corners=False)


class _Twice(_Seg):
    def forward(self, x):
        f = self.backbone(x)
        return self.classifier(f) + self.classifier(f.flip(-1)).flip(-1)


class _Never(_Seg):
    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(8, K, 1)

    def forward(self, x):
        return self.head(self.backbone(x))


class _After(_Seg):
    def __init__(self):
        super().__init__()
        self.refine = nn.Conv2d(K, K, 3, padding=1)

    def forward(self, x):
        return self.refine(self.classifier(self.backbone(x)))


def _batch(b=2, h=16, w=16):
    g = torch.Generator().manual_seed(3)
    return torch.randn(b, 3, h, w, generator=g), torch.randint(0, K, (b, h, w), generator=g)


BAD = [  # (keywords, exception, the argument named)
    (dict(alpha=-1.0), ValueError, "alpha"),
    (dict(alpha=NAN), ValueError, "alpha"),
    (dict(alpha=INF), ValueError, "alpha"),
    (dict(alpha="10"), TypeError, "alpha"),
    (dict(alpha=True), TypeError, "alpha"),
    (dict(per_sample="no"), TypeError, "per_sample"),
    (dict(per_sample=1), TypeError, "per_sample"),
    (dict(weight_grad="yes"), TypeError, "weight_grad"),
    (dict(importance="grad"), ValueError, "importance"),
    (dict(importance=None), ValueError, "importance"),
    (dict(k=0), ValueError, "k"),
    (dict(k=2.0), TypeError, "k"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
    (dict(weight=torch.tensor([1.0, NAN, 1.0, 1.0])), ValueError, "weight"),
    (dict(weight=torch.tensor([1.0, -1.0, 1.0, 1.0])), ValueError, "weight"),
    (dict(weight=torch.tensor([1.0, INF, 1.0, 1.0])), ValueError, "weight"),
    (dict(weight=torch.zeros(K)), ValueError, "weight"),
    (dict(weight=torch.ones(K, dtype=torch.long)), TypeError, "weight"),
    (dict(weight=[1.0] * K), TypeError, "weight"),
    (dict(selector_bn_momentum=1.5), ValueError, "selector_bn_momentum"),
    (dict(selector_bn_momentum=NAN), ValueError, "selector_bn_momentum"),
    (dict(norm_layer=3), TypeError, "norm_layer"),
    (dict(aux_weight=NAN), ValueError, "aux_weight"),
    (dict(aux_weight=-0.5), ValueError, "aux_weight"),
]


@pytest.mark.parametrize("kw,exc,name", BAD, ids=[f"{list(b[0])[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_settings_everywhere(kw, exc, name):
    with pytest.raises(exc, match=name):
        dops.DropClassOptions(**kw)
    with pytest.raises(exc, match=name):
        dops.dropclass(_Seg(), **kw)
    if "aux_weight" not in kw:
        with pytest.raises(exc, match=name):
            dops.DropClassHead(8, K, **kw)


def test_settings_checked_against_the_model():
    with pytest.raises(ValueError, match="k=9"):
        dops.dropclass(_Seg(), k=9)  # C = 8
    with pytest.raises(ValueError, match=r"weight must have shape \(K,\) = \(4,\)"):
        dops.dropclass(_Seg(), weight=torch.ones(5))
    with pytest.raises(ValueError, match="aux_weight"):
        dops.DropClassHead(8, K, options=dops.DropClassOptions(aux_weight=0.5))
    with pytest.raises(TypeError, match="options"):
        dops.dropclass(_Seg(), options={"alpha": 1.0})


@pytest.mark.parametrize("alpha,weight,exc", [
    (-1.0, None, ValueError), (NAN, None, ValueError), (INF, None, ValueError), ("1", None, TypeError),
    (1.0, torch.tensor([1.0, NAN, 1.0]), ValueError), (1.0, torch.tensor([1.0, -2.0, 1.0]), ValueError),
])
def test_dropclass_loss_numbers(alpha, weight, exc):
    logits = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4))
    with pytest.raises(exc, match="weight" if weight is not None else "alpha"):
        dops.dropclass_loss(logits, logits, target, None, lam=0.5, alpha=alpha, weight=weight)


def test_progress_rejects_nan():
    with pytest.raises(ValueError, match="step"):
        dops.progress(NAN, 10)
    with pytest.raises(ValueError, match="total"):
        dops.progress(1, NAN)


def test_options_object_and_keywords_agree():
    opts = dops.DropClassOptions(importance="logits", k=3, alpha=2.5, per_sample=False, weight=torch.ones(K))
    a = dops.DropClassHead(8, K, options=opts)
    b = dops.DropClassHead(8, K, importance="logits", k=3, alpha=2.5, per_sample=False, weight=torch.ones(K))
    for h in (a, b):
        assert (h.importance, h.k, h.alpha, h.per_sample) == ("logits", 3, 2.5, False)
        assert torch.equal(h.ce_weight, torch.ones(K))
    assert dops.DropClassHead(8, K, alpha=4.0, options=opts).alpha == 4.0  # a keyword on top of the object
    w = dops.dropclass(_Seg(), options=opts)
    assert w.options is opts and w.k == 3 and w.family == "generic"
    assert opts.replace(alpha=1.0).alpha == 1.0 and opts.alpha == 2.5
    with pytest.raises(ValueError, match="alpha"):
        opts.replace(alpha=-2.0)


def test_selector_bn_momentum_default_is_the_official_one():
    head = dops.DropClassHead(8, K)
    assert head.selector[1].momentum == 0.01 == dops.DropClassOptions().selector_bn_momentum
    assert dops.DropClassHead(8, K, selector_bn_momentum=0.1).selector[1].momentum == 0.1
    assert dops.DropClassHead(8, K, selector_bn_momentum=None).selector[1].momentum == 0.1  # norm_layer's own
    assert dops.dropclass(_Seg()).selector[1].momentum == 0.01
    # the running statistics move by 1% of the batch statistics per training step
    head.train()
    x = torch.randn(2, 8, 4, 4) + 5.0
    head.selector(x)
    mean = head.selector[0](x).mean((0, 2, 3))
    assert_close(head.selector[1].running_mean, 0.01 * mean.detach(), rtol=1e-5, atol=1e-6, name="running mean")


def test_adapters_one_per_family():
    from debias_ops import adapters
    tv = pytest.importorskip("torchvision.models.segmentation")
    smp = pytest.importorskip("segmentation_models_pytorch")
    lr = tv.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=K)
    assert isinstance(dops.dropclass(lr).adapter, adapters.LRASPPAdapter)
    unet = smp.Unet("resnet18", encoder_weights=None, classes=K)
    w = dops.dropclass(unet, importance="logits")
    assert isinstance(w.adapter, adapters.SmpAdapter) and w.family == "smp"
    assert adapters.input_multiple(w) == adapters.input_multiple(unet) == 1  # smp 0.6's Unet pads itself
    fpn = smp.FPN("resnet18", encoder_weights=None, classes=K)
    assert adapters.input_multiple(dops.dropclass(fpn)) == adapters.input_multiple(fpn) == 32
    assert adapters.input_multiple(lr) == 1 and adapters.input_multiple(_Seg()) == 1
    assert isinstance(dops.dropclass(_Seg()).adapter, adapters.GenericAdapter)


# ---------------------------------------------------------------------- the generic tap refuses or warns
@pytest.mark.parametrize("training", [True, False])
def test_tap_refuses_a_classifier_called_twice(training):
    w = dops.dropclass(_Twice())
    x, y = _batch()
    w.train(training)
    with pytest.raises(TypeError, match=r"classifier classifier is called 2 times in one _Twice\.forward"):
        w(x, y, progress=0.5) if training else w(x)


@pytest.mark.parametrize("training", [True, False])
def test_tap_refuses_a_classifier_never_called(training):
    w = dops.dropclass(_Never(), "classifier")
    x, y = _batch()
    w.train(training)
    with pytest.raises(TypeError, match=r"classifier classifier is never called by _Never\.forward"):
        w(x, y, progress=0.5) if training else w(x)


def test_tap_names_trainable_layers_after_the_classifier():
    model = _After()
    w = dops.dropclass(model, "classifier")
    x, y = _batch()
    with pytest.warns(UserWarning, match=r"refine of _After run\(s\) after the classifier classifier.*no gradient"):
        out = w(x, y, progress=0.5)
    out.loss.backward()
    assert model.refine.weight.grad is None  # what the warning says
    assert all(m.training for m in model.modules())  # the check's eval mode is undone
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w(x, y, progress=0.5)  # checked once
        dops.dropclass(_Seg())(x, y, progress=0.5)  # nothing after the classifier: no warning


def test_training_call_without_target_warns_once():
    w = dops.dropclass(_Seg())
    x, _ = _batch()
    with pytest.warns(UserWarning, match="training mode without a target.*trains nothing of DropClass"):
        w(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w(x)
        w.eval()
        w(x)


def test_fresh_wrap_changes_eval_output_but_not_the_model():
    """Documented: the eval path runs through the untrained selector; ``wrapped.model`` is the original."""
    model = _Seg().eval()
    x, _ = _batch()
    with torch.no_grad():
        before = model(x)
        w = dops.dropclass(model).eval()
        after, original = w(x), w.model(x)
    assert_close(original, before, name="wrapped.model")
    assert not torch.allclose(after, before)
    assert math.isfinite(after.abs().sum().item())


def test_fitting_the_selector_alone_recovers_a_trained_models_accuracy():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices on a shared machine: more threads only spin
    try:
        _fit_selector()
    finally:
        torch.set_num_threads(threads)


def _fit_selector():
    """The fine-tuning advice of DropClassModel's docstring, on a toy model trained to ~0.99 pixel accuracy."""
    g = torch.Generator().manual_seed(1)
    colours = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]])

    def data(n):
        y = F.interpolate(torch.randint(0, K, (n, 1, 2, 2), generator=g).float(), size=(8, 8)).long()[:, 0]
        return colours[y].permute(0, 3, 1, 2) + 0.3 * torch.randn(n, 3, 8, 8, generator=g), y

    (x, y), (xv, yv) = data(128), data(64)
    model = _Seg()
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(60):
        i = torch.randint(0, 128, (16,), generator=g)
        loss = F.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()

    def accuracy(f):
        with torch.no_grad():
            return (f(xv).argmax(1) == yv).float().mean().item()

    plain = accuracy(model.eval())
    wrapped = dops.dropclass(model).eval()
    fresh = accuracy(wrapped)
    model.requires_grad_(False)
    opt = torch.optim.Adam(wrapped.selector.parameters(), lr=1e-2)
    for _ in range(300):  # the selector's BN running statistics (momentum 0.01) settle over a few hundred steps
        wrapped.train()
        model.eval()
        i = torch.randint(0, 128, (16,), generator=g)
        out = wrapped(x[i], y[i], p=0.0, lam=0.0)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    fitted = accuracy(wrapped.eval())
    assert plain > 0.95 and fresh < plain - 0.3, (plain, fresh)
    assert fitted > plain - 0.05, (plain, fresh, fitted)  # measured: 0.998, 0.234, 0.967 (0.997 after 400 steps)
