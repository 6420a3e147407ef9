"""Disentanglement, measured: how many channels do the classes share?

The paper's second claim is that DropClass *disentangles*: after training, each
class relies on its own channels rather than on channels shared with the
classes it co-occurs with. :func:`class_overlap` measures that from a class
importance matrix S (K, C), the same one DropClass selects with:

* ``dops.class_importance(feats, logits)``: the head-agnostic ridge probe (design §2), or
* a 1×1 classifier's weight (K, C[, 1, 1]): S = max(0, W), the paper's importance.

Math. T_i = the top-k channels of class i among those with S[i, c] > 0
(``torch.topk``'s tie-breaking; a class with fewer than k positive channels
keeps only those). The overlap of classes i and j is the Jaccard index

    O[i, j] = |T_i ∩ T_j| / |T_i ∪ T_j|          (0 when both sets are empty)

so O is symmetric, O[i, i] = 1 for any class with a positive channel, and the
summary is the mean of O over the K (K − 1) off-diagonal pairs: 0 = every
class has channels of its own, 1 = every class uses the same k channels. Two
random k-subsets of C channels have an expected Jaccard index of about
k / (2C − k) (``chance``), the level to compare with.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import reference as _ref
from . import validation as _v

__all__ = ["ClassOverlap", "class_overlap"]


class ClassOverlap(NamedTuple):
    """matrix (K, K) float32, the Jaccard index of the classes' top-k channel sets;
    mean: 0-d float32, the mean off-diagonal overlap; sets: (K, C) bool, the sets T_i;
    chance: the expected mean for random k-subsets, k / (2C − k)."""

    matrix: torch.Tensor
    mean: torch.Tensor
    sets: torch.Tensor
    chance: float


@torch.no_grad()
def class_overlap(S: torch.Tensor, k: Optional[int] = None) -> ClassOverlap:
    """The K×K overlap of the classes' top-k channel sets and its off-diagonal mean (module docstring).

    S: (K, C) class importance (non-negative; ``class_importance``'s output), or a
    1×1 classifier weight (K, C, 1, 1), taken as S = max(0, W).
    k: channels per class, in [1, C] (None: C // 4, at least 1).
    """
    _v.check_tensor(S, "S", ndim=(2, 4))
    if S.dim() == 4:
        if S.shape[2:] != (1, 1):
            raise ValueError(f"S as a conv weight must be (K, C, 1, 1), got shape {tuple(S.shape)}")
        S = _ref.weight_importance(S, torch.float32)
    K, C = S.shape
    if K < 2 or C < 1:
        raise ValueError(f"S must be (K, C) with K >= 2 classes and C >= 1 channels, got shape {tuple(S.shape)}")
    k = max(1, C // 4) if k is None else _v.check_k(k, C)
    S = S.detach().float()
    sets = _ref.topk_mask(S, k) & (S > 0)  # the same top-k selection DropClass uses (design §3)
    m = sets.float()
    inter = m @ m.T
    size = m.sum(1)
    union = size[:, None] + size[None, :] - inter
    matrix = torch.where(union > 0, inter / union.clamp_min(1.0), torch.zeros_like(inter))
    off = ~torch.eye(K, dtype=torch.bool, device=S.device)
    return ClassOverlap(matrix, matrix[off].mean(), sets, k / (2 * C - k))
