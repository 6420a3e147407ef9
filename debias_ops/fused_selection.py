"""Autograd wiring of the fused suppress / class_drop / class_importance ops.

Placeholder until the Triton kernels land (issue 3): every entry point here
runs the reference math, so the dispatch in ``debias_ops.api`` already has
the shape it will keep. Inputs arrive validated, with ``dropped`` a (B, K)
bool mask on the data's device and ``k`` None or an int in [1, C].
"""
from __future__ import annotations

from typing import Optional

import torch

from . import reference as _ref


def class_importance(feats: torch.Tensor, class_logits: torch.Tensor) -> torch.Tensor:
    return _ref.class_importance(feats, class_logits)


def suppress(feats: torch.Tensor, class_logits: torch.Tensor, k: Optional[int], dropped: torch.Tensor) -> torch.Tensor:
    return _ref.suppress(feats, class_logits, k, drop=dropped)


def class_drop(feats: torch.Tensor, class_weight: torch.Tensor, k: Optional[int], dropped: torch.Tensor) -> torch.Tensor:
    return _ref.class_drop(feats, class_weight, k, drop=dropped)
