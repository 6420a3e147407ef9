"""One adapter per model family for :class:`~debias_ops.DropClassModel`.

An adapter knows, for its family, where the classifier is (:meth:`~FamilyAdapter.find`),
how to run the model up to the classifier's input (:meth:`~FamilyAdapter.features`),
how to finish the model's own inference output from DropClass logits
(:meth:`~FamilyAdapter.infer`), its auxiliary head (:meth:`~FamilyAdapter.aux_logits`),
the parts the DropClass loss does not train (:meth:`~FamilyAdapter.idle_parts`) and the
input-size constraint (:meth:`~FamilyAdapter.input_multiple`). The wrapper picks one
adapter when it is built (:func:`adapter_for`); nothing else switches on the family.

Families: ``torchvision`` (``deeplabv3_*`` / ``fcn_*``), ``lraspp`` (torchvision
``lraspp_*``), ``smp`` (segmentation_models_pytorch), ``generic`` (anything else:
a forward hook taps the named conv). The libraries are imported only if installed.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["FamilyAdapter", "TorchvisionAdapter", "LRASPPAdapter", "SmpAdapter", "GenericAdapter",
           "adapter_for", "input_multiple"]


class _Stop(Exception):
    """Raised by the generic tap to end the model's forward at the classifier; ``args[0]`` = its input."""


def last_conv_path(model: nn.Module, name: str, last: bool) -> Optional[str]:
    """Path of ``name`` if it is a Conv2d, or of its last (``last``) / first item if it is a Sequential."""
    try:
        m = model.get_submodule(name)
    except AttributeError:
        return None
    if isinstance(m, nn.Conv2d):
        return name
    if isinstance(m, nn.Sequential) and len(m) > 0:
        idx = len(m) - 1 if last else 0
        if isinstance(m[idx], nn.Conv2d):
            return f"{name}.{idx}"
    return None


class FamilyAdapter:
    """The family-specific part of :class:`~debias_ops.DropClassModel` (the base is the generic tap's
    interface; every method gets the wrapper, whose ``.model`` is the original model)."""

    name = "generic"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return False

    @classmethod
    def find(cls, model: nn.Module) -> Optional[Tuple[str, ...]]:
        """The dotted path(s) of the family's own classifier conv(s), or None."""
        return None

    def attach(self, wrapper) -> None:
        """Called once when the wrapper is built."""

    def check(self, wrapper, images: torch.Tensor) -> None:
        """Called once, eagerly, at the wrapper's first call (not while torch.compile traces)."""

    def features(self, wrapper, images: torch.Tensor):
        """(feats, extra): the classifier's input (B, C, h, w) and what :meth:`infer` /
        :meth:`aux_logits` need. Never upsamples past the classifier's resolution."""
        raise NotImplementedError

    def infer(self, wrapper, images: torch.Tensor):
        """The model's own output type and shapes, from ``wrapper.predict(feats)``."""
        raise NotImplementedError

    def aux_head(self, model: nn.Module) -> Optional[nn.Module]:
        """An auxiliary head ``aux_weight`` can train, or None."""
        return None

    def aux_logits(self, wrapper, extra) -> torch.Tensor:
        raise NotImplementedError

    def idle_parts(self, model: nn.Module, aux_weight: Optional[float]) -> List[str]:
        """Parts of the model that get no gradient from the DropClass loss (for a warning)."""
        head = self.aux_head(model)
        return ["aux_classifier (aux_weight=None)"] if head is not None and aux_weight is None else []

    def input_multiple(self, model: nn.Module) -> int:
        """Input heights and widths must be multiples of this (1: any size)."""
        return 1


# ---------------------------------------------------------------------- torchvision
def _torchvision_classes():
    try:
        from torchvision.models.segmentation._utils import _SimpleSegmentationModel
        from torchvision.models.segmentation.lraspp import LRASPP
    except ImportError:  # pragma: no cover - torchvision missing
        return None, None
    return _SimpleSegmentationModel, LRASPP


def _torchvision_output(model: nn.Module, logits: torch.Tensor, features, size) -> "OrderedDict[str, torch.Tensor]":
    """As ``_SimpleSegmentationModel.forward`` / ``LRASPP.forward``: upsampled "out" (and "aux")."""
    result = OrderedDict()
    result["out"] = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    if getattr(model, "aux_classifier", None) is not None:
        aux = model.aux_classifier(features["aux"])
        result["aux"] = F.interpolate(aux, size=size, mode="bilinear", align_corners=False)
    return result


class TorchvisionAdapter(FamilyAdapter):
    """torchvision ``deeplabv3_*`` / ``fcn_*``: ``classifier[-1]``; features =
    ``classifier[:-1](backbone(x)["out"])``; ``aux_classifier`` on ``backbone(x)["aux"]``."""

    name = "torchvision"

    @classmethod
    def matches(cls, model):
        simple, _ = _torchvision_classes()
        return simple is not None and isinstance(model, simple)

    @classmethod
    def find(cls, model):
        p = last_conv_path(model, "classifier", last=True)
        return (p,) if p is not None and p != "classifier" else None

    def features(self, wrapper, images):
        m = wrapper.model
        features = m.backbone(images)
        x = features["out"]
        for layer in list(m.classifier)[:-1]:
            x = layer(x)
        return x, features

    def infer(self, wrapper, images):
        feats, features = self.features(wrapper, images)
        return _torchvision_output(wrapper.model, wrapper.predict(feats), features, images.shape[-2:])

    def aux_head(self, model):
        return getattr(model, "aux_classifier", None)

    def aux_logits(self, wrapper, extra):
        return wrapper.model.aux_classifier(extra["aux"])


class LRASPPAdapter(TorchvisionAdapter):
    """torchvision ``lraspp_*``: ``low_classifier(low) + high_classifier(up(high branch))`` is one
    1×1 conv over ``cat([low, up(high branch)])`` (weights concatenated, biases summed).
    Its own classifier and features; the output (and the absent aux head) as the torchvision family's."""

    name = "lraspp"

    @classmethod
    def matches(cls, model):
        _, lraspp = _torchvision_classes()
        return lraspp is not None and isinstance(model, lraspp)

    @classmethod
    def find(cls, model):
        return ("classifier.low_classifier", "classifier.high_classifier")

    def features(self, wrapper, images):
        m = wrapper.model
        features = m.backbone(images)
        low, high = features["low"], features["high"]
        h = m.classifier
        x = h.cbr(high) * h.scale(high)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([low, x], dim=1), features


# ---------------------------------------------------------------------- segmentation_models_pytorch
class SmpAdapter(FamilyAdapter):
    """smp ``SegmentationModel``: ``segmentation_head[0]``; features = the decoder output;
    ``segmentation_head[1:]`` (upsampling, activation) and ``classification_head`` in eval."""

    name = "smp"

    @classmethod
    def matches(cls, model):
        try:
            from segmentation_models_pytorch.base import SegmentationModel
        except ImportError:  # pragma: no cover - smp missing
            return False
        return isinstance(model, SegmentationModel)

    @classmethod
    def find(cls, model):
        p = last_conv_path(model, "segmentation_head", last=False)
        return (p,) if p is not None and p != "segmentation_head" else None

    def features(self, wrapper, images):
        m = wrapper.model
        if not torch.compiler.is_compiling() and not torch.jit.is_scripting():
            m.check_input_shape(images)
        features = m.encoder(images)
        return m.decoder(features), features

    def infer(self, wrapper, images):
        m = wrapper.model
        feats, features = self.features(wrapper, images)
        masks = wrapper.predict(feats)
        for layer in list(m.segmentation_head)[1:]:  # the model's upsampling and activation
            masks = layer(masks)
        if m.classification_head is not None:
            return masks, m.classification_head(features[-1])
        return masks

    def idle_parts(self, model, aux_weight):
        return (["classification_head (smp aux_params)"]
                if getattr(model, "classification_head", None) is not None else [])

    def input_multiple(self, model):
        if not getattr(model, "requires_divisible_input_shape", True):
            return 1
        return int(getattr(model.encoder, "output_stride", 1) or 1)


# ---------------------------------------------------------------------- anything else: the tap
class GenericAdapter(FamilyAdapter):
    """Any model: a forward hook on the named conv taps its input.

    Eval: the hook replaces the conv's output with the DropClass inference logits and the
    model's own forward does the rest. Training: the hook stops the forward right after the
    tap (nothing after the classifier runs). The first call (eager) runs the plain model once
    more, in eval mode without gradient, to see what the tap would change: a classifier that
    ``forward`` never calls, or calls more than once, is refused (TypeError); modules with
    trainable parameters that run after it are named in a warning (in training they get no
    gradient; in eval they run on the DropClass logits).
    """

    name = "generic"

    def __init__(self) -> None:
        self.mode = None  # None/"probe": pass through; "capture"; "predict" -> "predicted"

    def attach(self, wrapper):
        wrapper._conv(0).register_forward_hook(wrapper._tap)

    def tap(self, wrapper, inputs):
        mode = self.mode
        if mode == "capture":
            raise _Stop(inputs[0])
        if mode == "predict":
            self.mode = None  # predict() calls the conv again: pass through then
            try:
                return wrapper.predict(inputs[0])
            finally:
                self.mode = "predicted"
        if mode == "predicted":
            raise TypeError(self._twice(wrapper, 2))
        return None

    def _twice(self, wrapper, n) -> str:
        path = wrapper.classifier_paths[0]
        return (f"dropclass: the classifier {path} is called {n} times in one {type(wrapper.model).__name__}.forward, "
                "but the tap replaces one call: name the conv that produces the final logits once "
                "(classifier='dotted.path'), or give DropClassHead a module of its own")

    def features(self, wrapper, images):
        self.mode = "capture"
        try:
            wrapper.model(images)
        except _Stop as stop:
            return stop.args[0], None
        finally:
            self.mode = None
        raise TypeError(self._never(wrapper))

    def _never(self, wrapper) -> str:
        return (f"dropclass: the classifier {wrapper.classifier_paths[0]} is never called by "
                f"{type(wrapper.model).__name__}.forward: name the conv that produces the logits")

    def infer(self, wrapper, images):
        self.mode = "predict"
        try:
            out = wrapper.model(images)
            if self.mode == "predict":
                raise TypeError(self._never(wrapper))
            return out
        finally:
            self.mode = None

    def check(self, wrapper, images):
        model, path = wrapper.model, wrapper.classifier_paths[0]
        order: List[str] = []
        hooks = []
        for name, m in model.named_modules():
            if name == path or any(p.requires_grad for p in m.parameters(recurse=False)):
                hooks.append(m.register_forward_hook(lambda mod, i, o, name=name: order.append(name)))
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        self.mode = "probe"
        try:
            with torch.no_grad():
                model(images)
        finally:
            self.mode = None
            for h in hooks:
                h.remove()
            for m, training in modes:
                m.training = training
        calls = order.count(path)
        if calls == 0:
            raise TypeError(self._never(wrapper))
        if calls > 1:
            raise TypeError(self._twice(wrapper, calls))
        # modules that finish after the classifier, except those that contain it (they finish after it anyway)
        after = list(OrderedDict.fromkeys(n for n in order[order.index(path) + 1:]
                                          if n != path and not path.startswith(n + ".") and n != ""))
        if after:
            names = ", ".join(after[:5]) + (f" (+{len(after) - 5} more)" if len(after) > 5 else "")
            warnings.warn(f"dropclass: {names} of {type(model).__name__} run(s) after the classifier {path} and "
                          "hold trainable parameters: in training the forward stops at the classifier, so they get "
                          "no gradient from the DropClass loss, while in eval they run on the DropClass logits. "
                          "Name the last conv as the classifier, train them apart, or freeze them knowingly",
                          stacklevel=4)


ADAPTERS = (TorchvisionAdapter, LRASPPAdapter, SmpAdapter)


def adapter_for(model: nn.Module) -> Optional[type]:
    """The adapter class of ``model``'s family, or None (then :class:`GenericAdapter`)."""
    for cls in ADAPTERS:
        if cls.matches(model):
            return cls
    return None


def input_multiple(model: nn.Module) -> int:
    """Input heights and widths ``model`` accepts must be multiples of this (1: any size).

    A :class:`~debias_ops.DropClassModel` (also inside DDP or torch.compile) answers for its model.
    """
    for _ in range(4):
        if isinstance(getattr(model, "adapter", None), FamilyAdapter):
            return model.adapter.input_multiple(model.model)
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    cls = adapter_for(model)
    return cls().input_multiple(model) if cls is not None else 1
