"""Public ops (design §5): validate, normalise ``drop``, dispatch.

Every op validates its inputs first (``debias_ops.validation``; errors name
the argument), turns ``drop`` into a (B, K) bool mask, then runs either the
fused Triton path (``fused_selection`` / ``fused_loss``) or the plain-PyTorch
reference, as ``DEBIAS_OPS_BACKEND`` and the tensors' device decide
(``debias_ops._backend``).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch

from . import _backend
from . import reference as _ref
from . import validation as _v
from .sampling import drop_mask


def _autocast_off(op):
    """Run ``op`` with autocast disabled for its first tensor's device.

    The ops choose their own precision (design §1: float32 accumulation whatever
    the input dtype; outputs in feats' dtype). Under an enclosing
    ``torch.autocast`` the small (K, C) / (B, C) matrix products of the gate
    (``keep @ T`` in ``reference.channel_gate``) and the reference's moments
    would otherwise run in bf16/fp16 and change the result (measured: 9e-3
    absolute on a class_drop output of O(1) under CPU bf16 autocast).
    """
    @functools.wraps(op)
    def wrapper(*args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        dev = first.device.type if first is not None else None
        ctx = torch.autocast(dev, enabled=False) if dev in ("cpu", "cuda") else contextlib.nullcontext()
        with ctx:
            return op(*args, **kwargs)
    return wrapper


@_autocast_off
def class_importance(feats: torch.Tensor, class_logits: torch.Tensor) -> torch.Tensor:
    """S (K, C) float32: importance of channel c for class j, fitted from dense logits (design §2).

    A ridge-regularised linear probe of the head on the batch; no gradient.
    """
    _v.check_class_logits(feats, class_logits)
    if _backend.use_triton(feats, class_logits):
        from . import fused_selection
        return fused_selection.class_importance(feats, class_logits)
    return _ref.class_importance(feats, class_logits)


@_autocast_off
def suppress(feats: torch.Tensor, class_logits: torch.Tensor, k: Optional[int], *, drop=None) -> torch.Tensor:
    """DropClass suppression with the importance fitted from dense logits (design §2 + §3).

    out[b, c] = feats[b, c] · g[b, c], g the mean over kept classes of each
    class's top-k channel importance. Works with any head; differentiable in
    ``feats`` only (``class_logits`` gets no gradient).
    """
    K = _v.check_class_logits(feats, class_logits)
    B, C = feats.shape[:2]
    k = _v.check_k(k, C)
    _v.check_drop(drop, B, K, feats.device)
    dropped = drop_mask(drop, B, K, feats.device)
    if _backend.use_triton(feats, class_logits):
        from . import fused_selection
        return fused_selection.suppress(feats, class_logits, k, dropped)
    return _ref.suppress(feats, class_logits, k, drop=dropped)


@_autocast_off
def class_drop(feats: torch.Tensor, class_weight: torch.Tensor, k: Optional[int] = None, *, drop=None) -> torch.Tensor:
    """The paper's DropClass: importance max(0, W) of a 1×1 classifier's weight (design §2 + §3).

    Differentiable in ``feats`` and ``class_weight``.
    """
    K = _v.check_class_weight(feats, class_weight)
    B, C = feats.shape[:2]
    k = _v.check_k(k, C)
    _v.check_drop(drop, B, K, feats.device)
    dropped = drop_mask(drop, B, K, feats.device)
    if _backend.use_triton(feats, class_weight):
        from . import fused_selection
        return fused_selection.class_drop(feats, class_weight, k, dropped)
    return _ref.class_drop(feats, class_weight, k, drop=dropped)


@_autocast_off
def dropclass_loss(
    logits: torch.Tensor,
    logits_drop: torch.Tensor,
    target: torch.Tensor,
    drop,
    *,
    lam: float,
    alpha: float = 10.0,
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = 255,
) -> _ref.DropClassLoss:
    """The DropClass loss (design §4) -> ``DropClassLoss(loss, ce, ce_drop, sup)``.

    ``loss = lam·CE(logits, y) + (1 − lam)·CE(logits_drop, y_drop) + alpha·sup``,
    logits bilinearly upsampled to the label size. The last three fields are
    detached, for logging. ``alpha`` must be finite and ≥ 0, ``lam`` in [0, 1];
    ``weight`` (K,) finite, ≥ 0 and not all 0 (its values are read with the value
    checks, see :mod:`debias_ops.validation`).
    """
    K = _v.check_loss_inputs(logits, logits_drop, target, drop, lam, alpha, weight, ignore_index)
    dropped = drop_mask(drop, logits.shape[0], K, logits.device)
    tensors = [logits, logits_drop] + ([weight] if weight is not None else [])
    if _backend.use_triton(*tensors):
        from . import fused_loss
        return fused_loss.dropclass_loss(logits, logits_drop, target, dropped, float(lam), float(alpha),
                                         weight, int(ignore_index))
    return _ref.dropclass_loss(logits, logits_drop, target, dropped, lam=float(lam), alpha=float(alpha),
                               weight=weight, ignore_index=int(ignore_index))
