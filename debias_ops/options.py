"""``DropClassOptions``: the DropClass settings shared by :class:`~debias_ops.DropClassHead`
and :func:`~debias_ops.dropclass`, validated once (design §6).

    opts = DropClassOptions(importance="weight", k=None, alpha=10.0)
    head = DropClassHead(C, K, options=opts)
    model = dropclass(model, options=opts)

Every constructor that takes these settings as keywords (``DropClassHead``,
``DropClassModel``, ``dropclass``) builds one of these from them; passing
``options=`` instead is equivalent. Errors are ValueError/TypeError naming the
argument.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Callable, Optional

import torch
import torch.nn as nn

from . import validation as _v

__all__ = ["DropClassOptions", "SELECTOR_BN_MOMENTUM"]

# The official DropClass code builds its BatchNorms with momentum 0.01 (PyTorch's default is 0.1).
SELECTOR_BN_MOMENTUM = 0.01


@dataclass(frozen=True, eq=False)
class DropClassOptions:
    """The DropClass settings (design §6), checked when the object is built.

    importance: ``"weight"`` (the paper's: max(0, classifier.weight), needs a 1×1
        classifier) or ``"logits"`` (a linear probe of any head fitted on the batch, design §2).
    k: top-k channels per class; None keeps all (checked against C ≥ k where C is known).
    alpha: weight of the suppression term, finite and ≥ 0 (the paper: 10).
    per_sample: each sample draws its own dropped class (True) or one class for the
        whole batch, the paper's scheme (False). A real bool.
    weight: optional (K,) cross-entropy class weights, finite, ≥ 0, not all 0
        (stored detached, float32).
    ignore_index: label ignored by the loss.
    aux_weight: :func:`~debias_ops.dropclass` only: a torchvision aux head's loss weight
        (finite, ≥ 0), None = the aux head is not trained.
    norm_layer: the selector's normalisation, called as ``norm_layer(C)``
        (``nn.BatchNorm2d``; ``nn.SyncBatchNorm`` for synchronised statistics).
    selector_bn_momentum: the selector norm's ``momentum`` where it has one, in [0, 1];
        default 0.01, the official code's (PyTorch's BatchNorm default is 0.1; before this
        option the selector used 0.1). None keeps ``norm_layer``'s own momentum.
    weight_grad: let the gradient of ``class_drop`` reach the classifier's weight (design §3).
    """

    importance: str = "weight"
    k: Optional[int] = None
    alpha: float = 10.0
    per_sample: bool = True
    weight: Optional[torch.Tensor] = None
    ignore_index: int = 255
    aux_weight: Optional[float] = None
    norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d
    selector_bn_momentum: Optional[float] = SELECTOR_BN_MOMENTUM
    weight_grad: bool = True

    def __post_init__(self) -> None:
        def put(name, value):
            object.__setattr__(self, name, value)

        if not isinstance(self.importance, str) or self.importance not in ("weight", "logits"):
            raise ValueError(f"importance must be 'weight' or 'logits', got {self.importance!r}")
        if self.k is not None:
            put("k", _v.check_int(self.k, "k", 1))
        put("alpha", _v.check_float(self.alpha, "alpha", 0.0))
        put("per_sample", _v.check_bool(self.per_sample, "per_sample"))
        put("weight_grad", _v.check_bool(self.weight_grad, "weight_grad"))
        put("ignore_index", _v.check_int(self.ignore_index, "ignore_index"))
        if self.aux_weight is not None:
            put("aux_weight", _v.check_float(self.aux_weight, "aux_weight", 0.0))
        if self.selector_bn_momentum is not None:
            put("selector_bn_momentum", _v.check_float(self.selector_bn_momentum, "selector_bn_momentum", 0.0, 1.0))
        if not callable(self.norm_layer):
            raise TypeError(f"norm_layer must be callable (norm_layer(C) -> nn.Module), got "
                            f"{type(self.norm_layer).__name__}")
        if self.weight is not None:
            _v.check_tensor(self.weight, "weight", ndim=1)
            _v.check_class_weight_values(self.weight)
            put("weight", self.weight.detach().float().clone())

    @classmethod
    def build(cls, options: Optional["DropClassOptions"] = None, **given) -> "DropClassOptions":
        """``options`` with the keywords in ``given`` that differ from the defaults applied on top
        (so ``DropClassHead(C, K, alpha=3.0, options=opts)`` is ``opts`` with alpha 3)."""
        if options is not None and not isinstance(options, DropClassOptions):
            raise TypeError(f"options must be a DropClassOptions, got {type(options).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = set(given) - names
        if unknown:
            raise TypeError(f"unknown DropClass option(s): {', '.join(sorted(unknown))}")
        if options is None:
            return cls(**given)
        defaults = {f.name: f.default for f in fields(cls)}
        changed = {k: v for k, v in given.items() if v is not defaults[k] and not _same(v, defaults[k])}
        return dataclasses.replace(options, **changed) if changed else options

    def replace(self, **changes) -> "DropClassOptions":
        """A copy with some settings changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def make_selector(self, channels: int) -> nn.Sequential:
        """The feature selector: 1×1 conv C → C (no bias) → ``norm_layer(C)`` → ReLU."""
        norm = self.norm_layer(channels)
        if self.selector_bn_momentum is not None and hasattr(norm, "momentum"):
            norm.momentum = self.selector_bn_momentum
        return nn.Sequential(nn.Conv2d(channels, channels, kernel_size=1, bias=False), norm, nn.ReLU(inplace=False))


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 - an exotic __eq__: treat as changed
        return False
