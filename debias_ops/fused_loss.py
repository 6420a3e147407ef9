"""Autograd wiring of the fused DropClass loss.

Placeholder until the Triton kernels land (issue 4): runs the reference math.
Inputs arrive validated, with ``dropped`` a (B, K) bool mask on the device.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import reference as _ref


def dropclass_loss(logits, logits_drop, target, dropped: torch.Tensor, lam: float, alpha: float,
                   weight: Optional[torch.Tensor], ignore_index: int) -> _ref.DropClassLoss:
    return _ref.dropclass_loss(logits, logits_drop, target, dropped, lam=lam, alpha=alpha,
                               weight=weight, ignore_index=ignore_index)
