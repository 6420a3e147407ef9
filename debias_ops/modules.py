"""``DropClassHead``: the DropClass segmentation head as a module (design §6).

It wraps any backbone's last feature map ``feats`` (B, C, h, w) like the
official HRNet head:

* ``classifier``: a 1×1 conv C → K (with bias);
* ``selector``: the feature selector, 1×1 conv C → C (own weights, no bias)
  → ``norm_layer`` (BatchNorm2d by default; pass ``nn.SyncBatchNorm`` or
  convert with ``nn.SyncBatchNorm.convert_sync_batchnorm`` for DDP, the
  user's choice; momentum 0.01 as in the official code, ``selector_bn_momentum``)
  → ReLU.

Settings: one :class:`~debias_ops.DropClassOptions` (``head.options``), built from
the keywords or passed as ``options=``, validated once.

**Eval** (``head(feats)``): every class kept,

    importance="weight":  classifier(selector(class_drop(feats, classifier.weight, k)))
    importance="logits":  classifier(selector(suppress(feats, classifier(feats), k)))

**Train** (``head(feats, target, t)``, ``t`` the training progress in [0, 1],
see :func:`progress`)::

    logits      = classifier(feats)
    drop        = sample_drop(B, K, p, device=feats.device, per_sample=...)   # p = t
    logits_drop = classifier(selector(suppression(feats, drop)))
    loss, ce, ce_drop, sup = dropclass_loss(logits, logits_drop, target, drop,
                                            lam=1 - t, alpha=alpha, ...)

and returns a :class:`DropClassOutput`. ``p`` and ``lam`` can be overridden
per call; ``drop`` can be given explicitly (any form design §5 accepts).

Decisions (design §6 leaves them open):

* The gradient of ``class_drop`` with respect to ``classifier.weight`` flows
  (design §3: ``class_drop`` is differentiable in ``class_weight``), as in the
  official code where the importance is the live classifier weight. Pass
  ``weight_grad=False`` to treat the importance as a constant (detached
  weight). ``importance="logits"`` never sends a gradient through the
  importance (it is a batch statistic, design §2).
* The drop is sampled on ``feats.device`` with :func:`debias_ops.sample_drop`
  (no host sync), from the device's default generator or the ``generator``
  given to ``forward``. Under DistributedDataParallel each rank draws from its
  own generator; ranks may drop the same or different classes -- gradients are
  all-reduced either way, so parameters stay identical across ranks (tested in
  ``tests/test_ddp.py``). Different per-rank drops (the default when ranks are
  seeded differently) give more drop diversity per global batch.
* The eval path uses the selector (design §6), so the selector's BatchNorm
  running statistics are those of the drop path's suppressed features.
* ``progress``/``p`` must be Python numbers (``sample_drop`` and
  ``dropclass_loss`` take floats). Under ``torch.compile`` a new float value
  may trigger a recompilation; quantise ``t`` (``progress(..., steps=...)``)
  or compile only the backbone if that matters.
* Logits are returned at the feature resolution; the loss upsamples them to
  the label size (design §4).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn

from . import api as _api
from . import validation as _v
from .options import SELECTOR_BN_MOMENTUM, DropClassOptions
from .sampling import drop_mask, sample_drop

__all__ = ["DropClassBranches", "DropClassHead", "DropClassOptions", "DropClassOutput", "progress"]


class DropClassOutput(NamedTuple):
    """What a training call of :class:`DropClassHead` returns.

    loss:        scalar, differentiable: lam·ce + (1 − lam)·ce_drop + alpha·sup (design §4).
    ce:          detached CE of ``logits`` against the target.
    ce_drop:     detached CE of ``logits_drop`` against the target with dropped classes ignored.
    sup:         detached suppression term (mean probability of the dropped classes).
    logits:      (B, K, h, w) ``classifier(feats)``, differentiable.
    logits_drop: (B, K, h, w) ``classifier(selector(suppression(feats, drop)))``, differentiable.
    drop:        (B, K) bool, True = class dropped for that sample.
    """
    loss: torch.Tensor
    ce: torch.Tensor
    ce_drop: torch.Tensor
    sup: torch.Tensor
    logits: torch.Tensor
    logits_drop: torch.Tensor
    drop: torch.Tensor


def progress(step, total, *, steps: Optional[int] = None) -> float:
    """Training progress t = step / total clipped to [0, 1] (the paper: epoch / epochs).

    Works for (epoch, epochs) and (iteration, iterations) alike. ``steps``
    quantises t to multiples of 1/steps (fewer distinct values, e.g. to limit
    ``torch.compile`` recompilations). The head uses p = t, lam = 1 − t.
    """
    if isinstance(total, bool) or not isinstance(total, (int, float)) or not total > 0 or not math.isfinite(total):
        raise ValueError(f"total must be a positive finite number, got {total!r}")
    step = _v.check_float(step, "step")
    t = min(max(step / float(total), 0.0), 1.0)
    if steps is not None:
        steps = _v.check_int(steps, "steps", 1)
        t = float(int(t * steps)) / steps
    return t


class DropClassBranches(nn.Module):
    """The DropClass logic around a classifier (design §6), shared by
    :class:`DropClassHead` and ``debias_ops.integrations.DropClassModel``.

    Holds the settings (a :class:`~debias_ops.DropClassOptions`, ``.options``),
    the feature selector and both paths (eval: :meth:`predict`; train:
    :meth:`forward` with a target). The classifier is reached only through
    :meth:`classify` (x -> logits) and :meth:`class_weight` (its (K, C[, 1, 1])
    weight, for ``importance="weight"``): :class:`DropClassHead` owns a new 1×1
    conv, the integration points them at a model's own classifier.
    ``classifier`` (optional) is registered as the submodule ``classifier``.
    """

    def __init__(self, in_channels: int, num_classes: int, options: DropClassOptions, *,
                 classifier: Optional[nn.Module] = None) -> None:
        super().__init__()
        if not isinstance(options, DropClassOptions):
            raise TypeError(f"options must be a DropClassOptions, got {type(options).__name__}")
        in_channels = _v.check_int(in_channels, "in_channels", 1)
        num_classes = _v.check_int(num_classes, "num_classes", 2)
        self.options = options
        self.in_channels = in_channels
        self.num_classes = num_classes
        # plain attributes (read on every call, also under torch.compile)
        self.importance = options.importance
        self.k = _v.check_k(options.k, in_channels)
        self.alpha = options.alpha
        self.per_sample = options.per_sample
        self.ignore_index = options.ignore_index
        self.weight_grad = options.weight_grad
        weight = options.weight
        if weight is not None and weight.shape[0] != num_classes:
            raise ValueError(f"weight must have shape (K,) = ({num_classes},), got {tuple(weight.shape)}")
        self.register_buffer("ce_weight", None if weight is None else weight.clone())  # None unless given
        if classifier is not None:
            self.classifier = classifier
        self.selector = options.make_selector(in_channels)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, num_classes={self.num_classes}, importance={self.importance!r}, "
                f"k={self.k}, alpha={self.alpha}, per_sample={self.per_sample}")

    # ------------------------------------------------------------------ the classifier
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier: (B, C, h, w) -> (B, K, h, w) logits."""
        raise NotImplementedError

    def class_weight(self) -> torch.Tensor:
        """The classifier's (K, C) or (K, C, 1, 1) weight, for ``importance="weight"``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ pieces
    def suppression(self, feats: torch.Tensor, drop=None, logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The head's suppression of ``feats`` (design §3) with its importance source.

        ``logits``: ``classifier(feats)`` if already computed (importance="logits").
        """
        if self.importance == "weight":
            w = self.class_weight()
            if not self.weight_grad:
                w = w.detach()
            return _api.class_drop(feats, w, self.k, drop=drop)
        if logits is None:
            logits = self.classify(feats)
        return _api.suppress(feats, logits, self.k, drop=drop)

    def predict(self, feats: torch.Tensor) -> torch.Tensor:
        """Inference logits (B, K, h, w): classifier(selector(suppression(feats))), every class kept."""
        return self.classify(self.selector(self.suppression(feats, None)))

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        feats: torch.Tensor,
        target: Optional[torch.Tensor] = None,
        progress: Optional[float] = None,
        *,
        p: Optional[float] = None,
        lam: Optional[float] = None,
        drop=None,
        generator: Optional[torch.Generator] = None,
    ):
        """``head(feats)`` -> inference logits; ``head(feats, target, t)`` -> :class:`DropClassOutput`.

        The training call needs ``target`` (B, H, W) integer labels and the
        progress ``t`` in [0, 1] (or both ``p`` and ``lam``). ``drop``
        (optional) replaces the sampled drop; ``generator`` is used to sample
        it (on ``feats.device``).
        """
        if target is None:
            return self.predict(feats)
        if progress is not None:
            progress = _v.check_unit_float(progress, "progress")
        if p is None:
            if progress is None:
                raise ValueError("the training call needs progress (t in [0, 1]) or p and lam")
            p = progress
        if lam is None:
            if progress is None:
                raise ValueError("the training call needs progress (t in [0, 1]) or p and lam")
            lam = 1.0 - progress
        _v.check_feats(feats)
        B, C = feats.shape[:2]
        if C != self.in_channels:
            raise ValueError(f"feats must have in_channels={self.in_channels} channels, got shape {tuple(feats.shape)}")
        K = self.num_classes
        if drop is None:
            dropped = sample_drop(B, K, float(p), generator=generator, device=feats.device,
                                  per_sample=self.per_sample)
        else:
            _v.check_drop(drop, B, K, feats.device)
            dropped = drop_mask(drop, B, K, feats.device)

        logits = self.classify(feats)
        suppressed = self.suppression(feats, dropped, logits=logits)
        logits_drop = self.classify(self.selector(suppressed))
        res = _api.dropclass_loss(logits, logits_drop, target, dropped, lam=float(lam), alpha=self.alpha,
                                  weight=self.ce_weight, ignore_index=self.ignore_index)
        return DropClassOutput(res.loss, res.ce, res.ce_drop, res.sup, logits, logits_drop, dropped)


class DropClassHead(DropClassBranches):
    """The DropClass head (design §6) with its own 1×1 classifier. See the module docstring for the math.

    Args:
        in_channels: C, channels of the backbone's last feature map.
        num_classes: K ≥ 2.
        importance: ``"weight"`` (the paper: max(0, classifier.weight)) or
            ``"logits"`` (head-agnostic probe fitted on the batch, design §2).
        k: top-k channels per class (None: all).
        alpha: weight of the suppression term (finite, ≥ 0).
        per_sample: each sample draws its own dropped class (True) or one class
            for the whole batch, the paper's scheme (False).
        weight: optional (K,) class weights of the cross-entropy (finite, ≥ 0;
            stored as the buffer ``ce_weight``).
        ignore_index: label ignored by the loss (default 255).
        norm_layer: the selector's normalisation (default ``nn.BatchNorm2d``).
        selector_bn_momentum: the selector norm's momentum, default 0.01 as in the
            official code (it was PyTorch's 0.1 before this option existed).
        weight_grad: let the gradient of ``class_drop`` reach ``classifier.weight``
            (default True, design §3).
        options: a :class:`~debias_ops.DropClassOptions` holding all of the above;
            keywords that differ from their defaults are applied on top of it.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        importance: str = "weight",
        k: Optional[int] = None,
        alpha: float = 10.0,
        per_sample: bool = True,
        *,
        weight: Optional[torch.Tensor] = None,
        ignore_index: int = 255,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
        selector_bn_momentum: Optional[float] = SELECTOR_BN_MOMENTUM,
        weight_grad: bool = True,
        options: Optional[DropClassOptions] = None,
    ) -> None:
        options = DropClassOptions.build(options, importance=importance, k=k, alpha=alpha, per_sample=per_sample,
                                         weight=weight, ignore_index=ignore_index, norm_layer=norm_layer,
                                         selector_bn_momentum=selector_bn_momentum, weight_grad=weight_grad)
        if options.aux_weight is not None:
            raise ValueError("aux_weight is for dropclass(model) (a torchvision aux head); DropClassHead has none")
        in_channels = _v.check_int(in_channels, "in_channels", 1)
        num_classes = _v.check_int(num_classes, "num_classes", 2)
        super().__init__(in_channels, num_classes, options,
                         classifier=nn.Conv2d(in_channels, num_classes, kernel_size=1, bias=True))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)

    def class_weight(self) -> torch.Tensor:
        return self.classifier.weight
