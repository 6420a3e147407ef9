"""The ``drop`` argument: normalisation of every accepted form, and sampling.

Accepted forms (design §5): ``None`` (keep every class), an ``int`` class index
(the same for every sample; -1 drops nothing), an integer tensor (B,) with -1
for "none", or a bool tensor (B, K) with True = dropped. Every op turns them
into one (B, K) bool mask on the data's device with :func:`drop_mask`, without
a host sync.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import validation as _v


def drop_mask(drop, B: int, K: int, device) -> torch.Tensor:
    """(B, K) bool mask, True = class dropped for that sample. No host sync."""
    device = torch.device(device)
    if drop is None:
        return torch.zeros(B, K, dtype=torch.bool, device=device)
    if isinstance(drop, torch.Tensor):
        if drop.dtype == torch.bool:
            return drop
        idx = drop.reshape(-1).expand(B) if drop.dim() == 0 else drop
        classes = torch.arange(K, device=device, dtype=idx.dtype)
        return idx[:, None] == classes[None, :]  # -1 matches nothing
    mask = torch.zeros(B, K, dtype=torch.bool, device=device)
    if drop >= 0:
        mask[:, drop] = True
    return mask


def sample_drop(
    batch: int,
    num_classes: int,
    p: float,
    *,
    generator: Optional[torch.Generator] = None,
    device=None,
    per_sample: bool = True,
) -> torch.Tensor:
    """Sample which class each sample drops: a (batch, num_classes) bool mask.

    ``per_sample=True``: every sample independently, with probability ``p``,
    drops one class drawn uniformly from ``num_classes``.
    ``per_sample=False``: the paper's scheme -- with probability ``p`` one
    class, drawn uniformly, is dropped for the whole batch.

    Runs on ``device`` (default: the generator's device, else CPU) without a
    host sync, so it can sit inside a CUDA graph.
    """
    _v.check_sample_drop(batch, num_classes, p)
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    draws = batch if per_sample else 1
    u = torch.rand(draws, generator=generator, device=device)
    cls = torch.randint(num_classes, (draws,), generator=generator, device=device)
    idx = torch.where(u < p, cls, torch.full_like(cls, -1))
    if not per_sample:
        idx = idx.expand(batch)
    classes = torch.arange(num_classes, device=device)
    return idx[:, None] == classes[None, :]
