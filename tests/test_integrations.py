"""``dops.dropclass(model)`` on real torchvision / smp models (nothing downloaded:
``weights=None``, ``weights_backbone=None``, ``encoder_weights=None``) and on a
custom model whose classifier is named by a dotted path.

Per family (one test each, sharing one model build): training at fixed
progress lowers the loss and never upsamples logits to the label size; the
eval output has the original model's type and shapes; the eval output equals
the inference path computed by hand from the parts (the classifier's input
captured with a hook while the *plain* model runs, then
classifier(selector(class_drop(feats, W))) and the model's own upsampling);
state dicts round-trip. The backbone/encoder is frozen in those per-family
steps (time: the resnet50 backbones dominate on CPU); full-model training is
exercised by the compile and DDP tests on a tiny model built from torchvision's
own ``FCN`` / ``FCNHead`` classes (the same code path as ``fcn_resnet50``).
"""
from __future__ import annotations

import copy
import math
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import debias_ops as dops
from tests.helpers import assert_close, check_ranks_agree, run_gloo

tv = pytest.importorskip("torchvision.models.segmentation")

K = 5
B, H, W = 2, 32, 32  # divisible by every model's output stride (32)


def _smp():
    return pytest.importorskip("segmentation_models_pytorch")


# name: (build, dropclass kwargs, classifier conv paths, frozen part, upsampling of the logits in eval)
FAMILIES = {
    "deeplabv3_resnet50": (
        lambda: tv.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=K, aux_loss=True),
        dict(aux_weight=0.5), ("classifier.4",), "backbone", "torchvision"),
    "fcn_resnet50": (
        lambda: tv.fcn_resnet50(weights=None, weights_backbone=None, num_classes=K),
        {}, ("classifier.4",), "backbone", "torchvision"),
    "lraspp_mobilenet_v3_large": (
        lambda: tv.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=K),
        {}, ("classifier.low_classifier", "classifier.high_classifier"), "backbone", "torchvision"),
    "smp_Unet_resnet18": (  # smp's Unet head conv is 3×3: the head-agnostic importance
        lambda: _smp().Unet("resnet18", encoder_weights=None, classes=K),
        dict(importance="logits"), ("segmentation_head.0",), "encoder", "smp"),
    "smp_DeepLabV3Plus_resnet18": (
        lambda: _smp().DeepLabV3Plus("resnet18", encoder_weights=None, classes=K),
        {}, ("segmentation_head.0",), "encoder", "smp"),
    "smp_FPN_mobilenet_v2": (
        lambda: _smp().FPN("mobilenet_v2", encoder_weights=None, classes=K),
        {}, ("segmentation_head.0",), "encoder", "smp"),
}


def _batch(seed=1, b=B, h=H, w=W, k=K):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, h, w, generator=g), torch.randint(0, k, (b, h, w), generator=g)


def _no_dropout(module):
    """Dropout off (eval) so that a few steps on one batch are deterministic and monotone."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.eval()


def _shapes(out):
    if isinstance(out, dict):
        return type(out), {k: tuple(v.shape) for k, v in out.items()}
    if isinstance(out, tuple):
        return type(out), [tuple(v.shape) for v in out]
    return type(out), tuple(out.shape)


def _by_hand(wrapped, x, paths, upsampling):
    """(expected, plain): the inference path from the parts -- the classifier's input captured
    while the plain model runs, suppression, the selector, the classifier conv(s), the model's
    upsampling -- and the plain model's own output."""
    m = wrapped.model
    convs = [m.get_submodule(p) for p in paths]
    inputs = []
    hooks = [c.register_forward_pre_hook(lambda mod, args: inputs.append(args[0])) for c in convs]
    try:
        plain = m(x)
    finally:
        for h in hooks:
            h.remove()
    feats = torch.cat(inputs, dim=1)
    if wrapped.importance == "weight":
        suppressed = dops.class_drop(feats, torch.cat([c.weight for c in convs], dim=1), wrapped.k)
    else:
        assert len(convs) == 1
        suppressed = dops.suppress(feats, convs[0](feats), wrapped.k)
    selected = wrapped.selector(suppressed)
    parts = selected.split([c.in_channels for c in convs], dim=1)
    logits = sum(c(z) for c, z in zip(convs, parts))  # LRASPP: low_classifier(.) + high_classifier(.)
    if upsampling == "torchvision":
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False), plain
    head = m.segmentation_head
    return head[2](head[1](logits)), plain


class _InterpolateSpy:
    """Records the output shapes of F.interpolate calls made outside debias_ops' CPU reference
    loss (which upsamples by definition; the fused kernel does not materialise it)."""

    def __init__(self, monkeypatch):
        self.shapes = []
        real = F.interpolate

        def spy(*args, **kwargs):
            out = real(*args, **kwargs)
            caller = sys._getframe(1).f_code.co_filename
            if not caller.endswith(str(Path("debias_ops") / "reference.py")):
                self.shapes.append(tuple(out.shape))
            return out

        monkeypatch.setattr(F, "interpolate", spy)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_train_eval_parts_state_dict(name, monkeypatch):
    build, kwargs, paths, frozen, upsampling = FAMILIES[name]
    model = build()
    sd0 = copy.deepcopy(model.state_dict())
    wrapped = dops.dropclass(model, **kwargs)
    assert isinstance(wrapped, dops.DropClassModel) and dops.is_dropclass(wrapped) and not dops.is_dropclass(model)
    assert wrapped.model is model and wrapped.classifier_paths == paths
    model.get_submodule(frozen).requires_grad_(False)
    _no_dropout(wrapped)
    x, y = _batch()

    # train: fixed progress and drop, one batch -> the loss falls; no (B, K, H, W) logits
    opt = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.02, momentum=0.9)
    spy = _InterpolateSpy(monkeypatch)
    losses = []
    for _ in range(3):
        out = wrapped(x, y, progress=0.5, drop=1)
        assert isinstance(out, dops.DropClassOutput)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < losses[0], f"{name}: loss did not fall over 3 steps at fixed progress: {losses}"
    assert out.logits.shape[:2] == (B, K) and out.logits.shape == out.logits_drop.shape
    assert (B, K, H, W) not in spy.shapes or name == "smp_Unet_resnet18", spy.shapes  # Unet's head is full-res
    if name != "smp_Unet_resnet18":
        assert out.logits.shape[-1] < W
    monkeypatch.undo()

    # eval: the original model's output type and shapes, equal to the inference path by hand
    wrapped.eval()
    with torch.no_grad():
        got = wrapped(x)
        expected, plain = _by_hand(wrapped, x, paths, upsampling)
        assert _shapes(got) == _shapes(plain)
    assert_close(dops.segmentation_logits(got), expected, rtol=1e-4, atol=1e-5, name=f"{name} inference path")
    if isinstance(got, dict) and "aux" in got:
        assert_close(got["aux"], plain["aux"], name=f"{name} aux (left as it is)")

    # state dicts: wrapped -> a new wrapped; the original model's -> wrapped.model
    sd = wrapped.state_dict()
    assert {f"model.{k}" for k in sd0} <= set(sd) and all(k.startswith(("model.", "selector.")) for k in sd)
    other = dops.dropclass(build(), **kwargs)
    other.load_state_dict(sd)
    for k, v in other.state_dict().items():
        assert torch.equal(v, sd[k]), k
    wrapped.model.load_state_dict(sd0)
    for k, v in wrapped.model.state_dict().items():
        assert torch.equal(v, sd0[k]), k


# ---------------------------------------------------------------------- errors and classifier discovery
class _NoClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, K)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def test_no_classifier_type_error():
    with pytest.raises(TypeError, match=r"found no 1×1 classifier.*classifier\[-1\].*segmentation_head\[0\].*"
                                        r"decode_head\.conv_seg.*classifier='dotted\.path"):
        dops.dropclass(_NoClassifier())
    with pytest.raises(TypeError, match="not a submodule"):
        dops.dropclass(_NoClassifier(), "decode_head.conv_seg")
    with pytest.raises(TypeError, match="is a Linear, not the nn.Conv2d"):
        dops.dropclass(_NoClassifier(), "head")


def test_smp_3x3_head_needs_logits_importance():
    smp = _smp()
    with pytest.raises(TypeError, match=r"needs a 1×1 classifier.*segmentation_head\.0.*importance='logits'"):
        dops.dropclass(smp.Unet("resnet18", encoder_weights=None, classes=K))
    assert dops.dropclass(smp.Unet("resnet18", encoder_weights=None, classes=K), importance="logits").family == "smp"


def test_aux_weight_without_aux_head():
    with pytest.raises(ValueError, match="no aux_classifier"):
        dops.dropclass(_tiny_fcn(aux=False), aux_weight=0.5)
    with pytest.warns(UserWarning, match="aux_classifier.*find_unused_parameters"):
        dops.dropclass(_tiny_fcn())


# ---------------------------------------------------------------------- a custom model (generic tap)
class _DecodeHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 12, 3, padding=1)
        self.conv_seg = nn.Conv2d(12, K, 1)

    def forward(self, x):
        return self.conv_seg(F.relu(self.conv(x)))


class _MMSegLike(nn.Module):
    """mmsegmentation-style: backbone + decode_head.conv_seg, then a post-processing module."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.decode_head = _DecodeHead()
        self.calls_after_classifier = 0

    def forward(self, x):
        logits = self.decode_head(self.backbone(x))
        self.calls_after_classifier += 1
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


@pytest.mark.parametrize("classifier", ["decode_head.conv_seg", None, "module"])
def test_custom_model_dotted_path(classifier):
    model = _MMSegLike()
    if classifier == "module":
        classifier = model.decode_head.conv_seg
    wrapped = dops.dropclass(model, classifier)
    assert wrapped.family == "generic" and wrapped.classifier_paths == ("decode_head.conv_seg",)
    x, y = _batch(h=16, w=16)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(4):
        out = wrapped(x, y, progress=0.5, drop=2)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0], losses
    # the first call's check ran the plain model once (eval mode, no gradient); training never does
    assert model.calls_after_classifier == 1, "training ran the model past its classifier"
    assert out.logits.shape == (B, K, 8, 8)
    assert all(p.grad is not None for p in wrapped.parameters()), "a parameter got no gradient"

    wrapped.eval()
    with torch.no_grad():
        got = wrapped(x)
        assert got.shape == model(x).shape == (B, K, 16, 16)
        assert_close(got, _by_hand(wrapped, x, ("decode_head.conv_seg",), "torchvision")[0], name="generic inference")
        # the plain model (hook idle) still computes its own logits
        plain = F.interpolate(model.decode_head(model.backbone(x)), size=(16, 16), mode="bilinear",
                              align_corners=False)
        assert_close(model(x), plain, name="plain model through the idle tap")
        assert not torch.allclose(plain, got)
        # a copy's tap is bound to the copy (deepcopy remaps the hook's bound method)
        twin = copy.deepcopy(wrapped)
        twin.selector[0].weight.mul_(2.0)
        assert_close(wrapped(x), got, name="original after copying")
        assert_close(twin(x), _by_hand(twin, x, ("decode_head.conv_seg",), "torchvision")[0], name="copy")


# ---------------------------------------------------------------------- compile, DDP, channels_last, autocast
def _tiny_fcn(aux=True):
    """torchvision's own FCN / FCNHead / IntermediateLayerGetter around a tiny backbone."""
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.segmentation.fcn import FCN, FCNHead

    def cbr(i, o, s):
        return nn.Sequential(nn.Conv2d(i, o, 3, stride=s, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU())

    body = nn.Sequential(OrderedDict(stem=cbr(3, 8, 2), mid=cbr(8, 16, 2), top=cbr(16, 32, 1)))
    backbone = IntermediateLayerGetter(body, {"mid": "aux", "top": "out"} if aux else {"top": "out"})
    return FCN(backbone, FCNHead(32, K), FCNHead(16, K) if aux else None)


def _grads(module):
    return [p.grad.clone() for p in module.parameters()]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["tiny_fcn", "custom"])
def test_compile_aot_eager(which):
    if which == "tiny_fcn":
        eager = dops.dropclass(_tiny_fcn(), aux_weight=0.5)
    else:
        eager = dops.dropclass(_MMSegLike(), "decode_head.conv_seg")
    _no_dropout(eager)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)  # no graph break
    x, y = _batch(h=32, w=32)
    drop = torch.zeros(B, K, dtype=torch.bool)
    drop[0, 1] = drop[1, 3] = True
    ref = eager(x, y, progress=0.5, drop=drop)
    got = compiled(x, y, progress=0.5, drop=drop)
    ref.loss.backward()
    got.loss.backward()
    assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-6, name="compiled loss")
    for i, (a, b) in enumerate(zip(_grads(twin), _grads(eager))):
        assert_close(a, b, rtol=1e-4, atol=1e-6, name=f"compiled grad {i}")
    eager.eval()
    twin.eval()
    with torch.no_grad():
        assert_close(dops.segmentation_logits(compiled(x)), dops.segmentation_logits(eager(x)), rtol=1e-5,
                     atol=1e-6, name="compiled inference")
    assert dops.is_dropclass(compiled)


def test_channels_last_and_autocast():
    wrapped = dops.dropclass(_tiny_fcn(), aux_weight=0.5)
    _no_dropout(wrapped)
    x, y = _batch(h=32, w=32)
    cl = copy.deepcopy(wrapped).to(memory_format=torch.channels_last)
    ref = wrapped(x, y, progress=0.5, drop=1)
    got = cl(x.contiguous(memory_format=torch.channels_last), y, progress=0.5, drop=1)
    assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-6, name="channels_last loss")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = wrapped(x, y, progress=0.5, drop=1)
        out.loss.backward()
        wrapped.eval()
        pred, plain = wrapped(x), wrapped.model(x)
    assert math.isfinite(out.loss.item())
    assert all(p.grad is not None for p in wrapped.parameters())
    assert {k: (v.dtype, v.shape) for k, v in pred.items()} == {k: (v.dtype, v.shape) for k, v in plain.items()}


def _ddp_train(rank: int, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(rank)  # different initial parameters: DDP broadcasts rank 0's
    ddp = DDP(dops.dropclass(_tiny_fcn(), aux_weight=0.5))  # find_unused_parameters=False: all get gradients
    net = ddp.module
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    init = [p.detach().clone() for p in net.parameters()]
    data_gen = torch.Generator().manual_seed(100 + rank)
    drop_gen = torch.Generator().manual_seed(200 + rank)
    drops = []
    for step in range(3):  # a parameter without gradient fails DDP at the next step
        x, y = torch.randn(2, 3, 16, 16, generator=data_gen), torch.randint(0, K, (2, 16, 16), generator=data_gen)
        out = ddp(x, y, progress=dops.progress(step + 3, 5), generator=drop_gen)
        drops.append(out.drop)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        assert ddp(x)["out"].shape == (2, K, 16, 16)
    torch.save({"params": [p.detach() for p in net.parameters()], "init": init, "drops": torch.stack(drops)},
               Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ddp_gloo_dropclass_model(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    run_gloo(_ddp_train, tmp_path)
    check_ranks_agree(torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt"), "DropClassModel")
