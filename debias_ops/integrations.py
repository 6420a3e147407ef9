"""DropClass on a segmentation model you already have, in one call.

    model = dops.dropclass(model, importance="weight", k=None, alpha=10.0)
    out = model(images, target, progress=t)   # train: DropClassOutput (loss, ce, ce_drop, sup, logits, ...)
    pred = model(images)                       # inference: the original model's output type and shape

:class:`DropClassModel` holds the original model as ``.model`` untouched (its
classifier stays where it is, so ``wrapped.model.load_state_dict(original_sd)``
works) and adds the DropClass feature selector (design §6). It *is* a
:class:`~debias_ops.modules.DropClassBranches` whose classifier is the model's
own: the same code path as :class:`~debias_ops.DropClassHead`, with the
classifier's weight and bias reused (no retraining from scratch).

Finding the classifier (``classifier=None``):

* torchvision ``deeplabv3_*`` / ``fcn_*`` (``_SimpleSegmentationModel``):
  ``classifier[-1]``, a 1×1 ``Conv2d``; features = ``classifier[:-1](backbone(x)["out"])``.
  ``aux_classifier`` is left as it is: in eval its output is returned under
  ``"aux"`` as the model does; in training it runs only when ``aux_weight`` is
  set, and ``aux_weight · CE(aux logits)`` is added to the loss (torchvision's
  reference recipe uses 0.5).
* torchvision ``lraspp_*`` (``LRASPP``): its logits are
  ``low_classifier(low) + high_classifier(up(high branch))``, two 1×1 convs,
  i.e. one 1×1 conv over ``cat([low, up(high branch)])`` with weight
  ``cat([W_low, W_high], 1)`` and bias ``b_low + b_high``: DropClass runs on
  that concatenated feature map (40 + 128 channels) with that composite
  classifier (built from the live parameters each call).
* segmentation_models_pytorch (``SegmentationModel``: Unet, FPN,
  DeepLabV3Plus, ...): ``segmentation_head[0]``; features = the decoder
  output; ``segmentation_head[1:]`` (the model's upsampling and activation)
  is applied in eval. smp's Unet, Unet++, MAnet, PAN and PSPNet build that
  conv with ``kernel_size=3``: the paper's ``importance="weight"`` needs a
  linear 1×1 classifier and raises a ``TypeError`` for them; the head-agnostic
  ``importance="logits"`` (design §2: a linear probe of any head, fitted on the
  batch) works with any stride-1, size-preserving conv and is the choice there.
* anything else: ``decode_head.conv_seg`` (mmsegmentation), ``classifier``
  (a ``Conv2d`` or a ``Sequential`` ending in one), ``segmentation_head[0]``;
  or name it: ``classifier="decode_head.conv_seg"`` (dotted path; a module
  of the model is accepted too). For these *generic* models a forward hook on
  the conv taps its input: in eval the hook replaces the conv's output with
  the DropClass inference logits and the model's own forward does the rest; in
  training the hook stops the model's forward right after the tap (nothing
  after the classifier runs, e.g. an aux head: its parameters get no gradient).
  The first call (eager, not under torch.compile) runs the plain model once more
  in eval mode without gradient to check the tap: a classifier that ``forward``
  never calls, or calls more than once, raises a TypeError naming it; modules
  with trainable parameters that run after it are named in a warning.

Each family is one adapter (:mod:`debias_ops.adapters`), chosen when the model
is wrapped. The settings are one :class:`~debias_ops.DropClassOptions`
(``wrapped.options``), built from the keywords or passed as ``options=``.

Right after wrapping, eval predictions change: the eval path runs the features
through the new, untrained selector (1×1 conv → BatchNorm → ReLU), so a trained
model's accuracy drops until DropClass training has fitted the selector. The
original model is untouched and still answers as before: ``wrapped.model(x)``.
No initialisation of the selector makes the wrapped model's output equal the
original's in general (see :class:`DropClassModel`). A training-mode call
without a target warns: it returns the inference path, and only
``wrapped(images, target, progress=t)`` trains DropClass.

Training never materialises upsampled logits: the model's forward is run up to
the classifier's input only (explicitly for the known families, by the hook
for generic ones) and :func:`debias_ops.dropclass_loss` takes the
low-resolution logits with the full-resolution target (it upsamples
bilinearly, ``align_corners=False``, inside the fused kernel). smp's own
eval-time ``Upsample`` uses ``align_corners=True``: a sub-pixel difference
between the loss's upsampling and the model's output, as with any
``F.interpolate``-based loss on smp models.

DistributedDataParallel: wrap the ``DropClassModel`` (``DDP(dops.dropclass(model))``)
and call it with the target so that the loss is computed inside DDP's forward.
Every parameter then gets a gradient (the selector, the classifier through
both branches and through ``class_drop``'s weight gradient, the backbone), so
``find_unused_parameters=False`` works, except where a part of the model does
not run in training: an ``aux_classifier`` with ``aux_weight=None``, an smp
``classification_head`` (``aux_params``), or anything after the classifier of
a generic model. Either train them (``aux_weight``), remove them
(``model.aux_classifier = None``), or pass ``find_unused_parameters=True``;
:func:`dropclass` warns when it sees an aux or classification head, and the
first call of a generic model names the trainable modules that run after its
classifier. The selector's BatchNorm is a plain ``BatchNorm2d`` with momentum
0.01 (``selector_bn_momentum``; ``norm_layer=nn.SyncBatchNorm`` or
``nn.SyncBatchNorm.convert_sync_batchnorm`` for synchronised statistics).

``torch.compile`` traces the known families and the generic tap (the hook's
early stop included) without a graph break (torch 2.14, backend aot_eager,
tests/test_integrations.py). ``progress``/``p``/``lam`` are Python floats:
quantise ``t`` to limit recompilations (:func:`debias_ops.progress`). Autocast and channels_last work as for the ops
(the DropClass ops compute in float32 and keep the memory format).
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import api as _api
from .adapters import FamilyAdapter, GenericAdapter, adapter_for, last_conv_path
from .modules import DropClassBranches
from .options import SELECTOR_BN_MOMENTUM, DropClassOptions

__all__ = ["dropclass", "DropClassModel", "is_dropclass", "segmentation_logits"]

# What classifier=None looks for on a model of no known family, in this order.
_GENERIC_PATHS = ("decode_head.conv_seg", "classifier", "segmentation_head")

_LOOKED_FOR = (
    "torchvision DeepLabV3/FCN `classifier[-1]` and LRASPP `classifier.low_classifier` + "
    "`classifier.high_classifier`, smp `segmentation_head[0]`, and on other models "
    "`decode_head.conv_seg`, `classifier` (a Conv2d or a Sequential ending in one), `segmentation_head[0]`"
)


# ---------------------------------------------------------------------- discovery
def _path_of(model: nn.Module, classifier) -> str:
    if isinstance(classifier, str):
        try:
            m = model.get_submodule(classifier)
        except AttributeError as e:
            raise TypeError(f"dropclass: classifier={classifier!r} is not a submodule of "
                            f"{type(model).__name__} ({e})") from None
        if not isinstance(m, nn.Conv2d):
            raise TypeError(f"dropclass: classifier={classifier!r} is a {type(m).__name__}, not the nn.Conv2d "
                            "that produces the logits; name the conv itself (e.g. 'segmentation_head.0')")
        return classifier
    if isinstance(classifier, nn.Module):
        for name, m in model.named_modules():
            if m is classifier and name:
                return _path_of(model, name)
        raise TypeError(f"dropclass: the classifier module given is not a submodule of {type(model).__name__}")
    raise TypeError(f"dropclass: classifier must be None, a dotted path or a submodule, got {type(classifier).__name__}")


def _classifier_paths(model: nn.Module, classifier) -> tuple:
    """(paths, adapter): the classifier conv path(s) and the family adapter that runs them."""
    cls = adapter_for(model)
    own = cls.find(model) if cls is not None else None
    if classifier is None:
        if own is not None:
            return own, cls()
        for name in _GENERIC_PATHS:
            p = last_conv_path(model, name, last=name == "classifier")
            if p is not None:
                return (p,), GenericAdapter()
        raise TypeError(f"dropclass: found no 1×1 classifier conv in {type(model).__name__}; looked for "
                        f"{_LOOKED_FOR}. Name it: dropclass(model, classifier='dotted.path.to.conv')")
    paths = (_path_of(model, classifier),)
    if own is not None and paths == own:
        return paths, cls()
    return paths, GenericAdapter()  # a classifier of the user's choice: the generic tap


def _check_convs(convs, importance: str, where: str) -> None:
    for conv in convs:
        plain = tuple(conv.stride) == (1, 1) and conv.groups == 1
        one = plain and tuple(conv.kernel_size) == (1, 1) and conv.padding in ((0, 0), "valid")
        if importance == "weight" and not one:
            raise TypeError(
                f"dropclass: importance='weight' (the paper's, max(0, W) of the classifier) needs a 1×1 classifier "
                f"(kernel 1, stride 1, padding 0, groups 1), but {where} is {conv}. smp's Unet, Unet++, MAnet, PAN "
                "and PSPNet use a 3×3 head conv: pass importance='logits' (head-agnostic, design §2), or name a "
                "1×1 classifier with classifier='dotted.path'")
        same = conv.padding == "same" or (isinstance(conv.padding, tuple) and all(
            2 * p == d * (k - 1) for p, d, k in zip(conv.padding, conv.dilation, conv.kernel_size)))
        if not (plain and same):
            raise TypeError(f"dropclass: the classifier {where} = {conv} must keep the spatial size "
                            "(stride 1, 'same' padding, groups 1)")


# ---------------------------------------------------------------------- the wrapper
class DropClassModel(DropClassBranches):
    """A segmentation model trained with DropClass. Build it with :func:`dropclass`.

    ``wrapped(images)`` -> the model's own output type and shape, through the
    inference path ``classifier(selector(suppression(feats)))`` (every class kept).
    ``wrapped(images, target, progress=t)`` (or ``p=``, ``lam=``, ``drop=``,
    ``generator=`` as :meth:`DropClassHead.forward`) -> :class:`DropClassOutput`
    whose ``loss`` includes ``aux_weight · CE(aux logits)`` when set; the logits
    are at the classifier's resolution.

    Attributes: ``model`` (the original model), ``selector``, ``options``
    (:class:`~debias_ops.DropClassOptions`), ``adapter`` (the family's
    :class:`~debias_ops.adapters.FamilyAdapter`), ``classifier_paths`` (the dotted
    path(s) of the reused conv(s)), ``family`` ('torchvision', 'lraspp', 'smp' or
    'generic'), ``aux_weight``.

    Eval output right after wrapping is *not* the original model's: the selector
    is new and untrained. An initialisation making it the identity does not exist
    in general: the eval path is ``classifier(ReLU(BN(conv(g ⊙ feats))))`` with the
    gate g of design §3; undoing g with a diagonal conv needs every g_c > 0 (a
    channel outside every class's top-k has g_c = 0) and, for
    ``importance="logits"``, a gate that changes with every batch; the ReLU
    discards negative features; and in training the BatchNorm normalises with batch
    statistics and its running statistics move to the drop path's, so the
    equality would not outlive the first steps while the selector would start
    away from the method's (random) initialisation. ``wrapped.model(images)`` is
    the original model's output at any time.

    Fine-tuning a trained model: to start DropClass from the model's accuracy, fit
    the selector alone on the eval path first -- ``wrapped.model.requires_grad_(False)``,
    ``wrapped.model.eval()``, then steps of ``wrapped(images, target, p=0.0, lam=0.0)``
    (nothing dropped: the loss is the cross-entropy of the eval path) with an optimiser
    over ``wrapped.selector.parameters()`` -- then unfreeze and train with the schedule.
    With the default BatchNorm momentum 0.01 the selector's running statistics need
    a few hundred steps to settle (eval reads them).
    """

    def __init__(self, model: nn.Module, classifier: Union[None, str, nn.Module] = None, *,
                 importance: str = "weight", k: Optional[int] = None, alpha: float = 10.0, per_sample: bool = True,
                 weight: Optional[torch.Tensor] = None, ignore_index: int = 255, aux_weight: Optional[float] = None,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
                 selector_bn_momentum: Optional[float] = SELECTOR_BN_MOMENTUM, weight_grad: bool = True,
                 options: Optional[DropClassOptions] = None) -> None:
        options = DropClassOptions.build(options, importance=importance, k=k, alpha=alpha, per_sample=per_sample,
                                         weight=weight, ignore_index=ignore_index, aux_weight=aux_weight,
                                         norm_layer=norm_layer, selector_bn_momentum=selector_bn_momentum,
                                         weight_grad=weight_grad)
        if not isinstance(model, nn.Module):
            raise TypeError(f"dropclass: model must be an nn.Module, got {type(model).__name__}")
        if isinstance(model, DropClassModel):
            raise TypeError("dropclass: the model is already a DropClassModel")
        paths, adapter = _classifier_paths(model, classifier)
        convs = [model.get_submodule(p) for p in paths]
        _check_convs(convs, options.importance, " + ".join(paths))
        K = convs[0].out_channels
        if any(c.out_channels != K for c in convs):
            raise TypeError(f"dropclass: the classifier convs {paths} disagree on the number of classes")
        C = sum(c.in_channels for c in convs)
        super().__init__(C, K, options)
        w = convs[0].weight
        self.selector.to(device=w.device, dtype=w.dtype)
        if self.ce_weight is not None:
            self.ce_weight = self.ce_weight.to(w.device)
        self.model = model
        self.adapter: FamilyAdapter = adapter
        self.family = adapter.name
        self.classifier_paths = tuple(paths)

        aux_weight = options.aux_weight
        if aux_weight is not None and adapter.aux_head(model) is None:
            raise ValueError(f"aux_weight={aux_weight} but {type(model).__name__} has no aux_classifier that "
                             "dropclass knows how to train (torchvision models built with aux_loss=True)")
        self.aux_weight = aux_weight
        idle = adapter.idle_parts(model, aux_weight)
        if idle:
            warnings.warn(f"dropclass: {', '.join(idle)} of {type(model).__name__} is not trained by the DropClass "
                          "loss (it gets no gradient); under DistributedDataParallel remove it, train it "
                          "(aux_weight=...) or pass find_unused_parameters=True", stacklevel=3)
        self._checked = False  # adapter.check runs at the first eager call
        self._warned_no_target = False
        adapter.attach(self)

    def extra_repr(self) -> str:
        return f"family={self.family!r}, classifier={'+'.join(self.classifier_paths)}, " + super().extra_repr()

    # ------------------------------------------------------------------ the model's classifier
    def _conv(self, i: int) -> nn.Conv2d:
        return self.model.get_submodule(self.classifier_paths[i])

    def _convs(self):
        return [self.model.get_submodule(p) for p in self.classifier_paths]

    def _tap(self, module, inputs, output):
        """The generic family's forward hook on the classifier (bound here so that copies stay bound)."""
        return self.adapter.tap(self, inputs)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        convs = self._convs()
        if len(convs) == 1:
            return convs[0](x)
        return F.conv2d(x, self.class_weight(), sum(c.bias for c in convs if c.bias is not None))

    def class_weight(self) -> torch.Tensor:
        convs = self._convs()
        if len(convs) == 1:
            return convs[0].weight
        return torch.cat([c.weight for c in convs], dim=1)

    # ------------------------------------------------------------------ the model up to the classifier
    def features(self, images: torch.Tensor):
        """(feats, extra): the classifier's input feature map (B, C, h, w), and what the
        model's remaining output needs (torchvision: the backbone's dict; smp: the encoder
        features). Never upsamples past the classifier's resolution."""
        return self.adapter.features(self, images)

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor, target: Optional[torch.Tensor] = None, progress: Optional[float] = None,
                *, p: Optional[float] = None, lam: Optional[float] = None, drop=None,
                generator: Optional[torch.Generator] = None):
        """``wrapped(images)`` -> the model's output (inference path, every class kept);
        ``wrapped(images, target, t)`` -> :class:`DropClassOutput` (see the class)."""
        if not self._checked and not torch.compiler.is_compiling():
            self.adapter.check(self, images)
            self._checked = True
        if target is None:
            if self.training and not self._warned_no_target and not torch.compiler.is_compiling():
                self._warned_no_target = True
                warnings.warn(f"dropclass: {type(self.model).__name__} wrapped for DropClass was called in training "
                              "mode without a target: this returns the inference path and trains nothing of "
                              "DropClass; train with wrapped(images, target, progress=t), or call .eval() to "
                              "predict", stacklevel=2)
            return self.adapter.infer(self, images)
        feats, extra = self.adapter.features(self, images)
        out = super().forward(feats, target, progress, p=p, lam=lam, drop=drop, generator=generator)
        if self.aux_weight is not None:
            aux = self.adapter.aux_logits(self, extra)
            aux_ce = _api.dropclass_loss(aux, aux, target, None, lam=1.0, alpha=0.0, weight=self.ce_weight,
                                         ignore_index=self.ignore_index).loss
            out = out._replace(loss=out.loss + self.aux_weight * aux_ce)
        return out


def dropclass(model: nn.Module, classifier: Union[None, str, nn.Module] = None, *, importance: str = "weight",
              k: Optional[int] = None, alpha: float = 10.0, per_sample: bool = True,
              weight: Optional[torch.Tensor] = None, ignore_index: int = 255, aux_weight: Optional[float] = None,
              norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
              selector_bn_momentum: Optional[float] = SELECTOR_BN_MOMENTUM, weight_grad: bool = True,
              options: Optional[DropClassOptions] = None) -> DropClassModel:
    """Wrap a segmentation model for DropClass training: returns a :class:`DropClassModel`.

    ``classifier``: None (find it, see the module docstring), a dotted path
    (``"decode_head.conv_seg"``) or the conv module itself. The other arguments
    are the fields of :class:`~debias_ops.DropClassOptions` (``importance``, ``k``,
    ``alpha``, ``per_sample``, ``weight``, ``ignore_index``, ``aux_weight``
    (torchvision aux head: add ``aux_weight · CE(aux)``), ``norm_layer``,
    ``selector_bn_momentum`` (0.01, the official code's; it was PyTorch's 0.1
    before this option existed), ``weight_grad``), or ``options=`` holding them.
    Raises TypeError when no classifier is found or it does not fit ``importance``,
    ValueError/TypeError naming the argument for a bad setting.

    Eval predictions change right after wrapping (the selector is untrained; see
    :class:`DropClassModel`); ``wrapped.model`` is the original model, untouched.
    """
    return DropClassModel(model, classifier, importance=importance, k=k, alpha=alpha, per_sample=per_sample,
                          weight=weight, ignore_index=ignore_index, aux_weight=aux_weight, norm_layer=norm_layer,
                          selector_bn_momentum=selector_bn_momentum, weight_grad=weight_grad, options=options)


def is_dropclass(model: nn.Module) -> bool:
    """True for a :class:`DropClassModel`, also inside DDP (``.module``) or torch.compile (``._orig_mod``)."""
    for _ in range(4):
        if isinstance(model, DropClassModel):
            return True
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return False
        model = inner
    return False


def segmentation_logits(output) -> torch.Tensor:
    """The dense logits of a model's output: torchvision's dict -> ``["out"]``, smp's
    ``(masks, labels)`` -> ``masks``, a tensor -> itself, a DropClassOutput -> ``.logits``."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        return output["out"]
    if hasattr(output, "logits") and isinstance(output.logits, torch.Tensor):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"segmentation_logits: cannot find the logits in a {type(output).__name__}")
