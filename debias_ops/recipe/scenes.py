"""Generated street scenes with a co-occurrence shortcut: the recipe's ``--data synthetic``.

Deterministic by seed: S×S images (S = 32) with K = 6 classes,

    0 background   dark, noisy
    1 road         frequent: a large red band in ~90% of images
    2 rider        RARE: a small teal square with vertical stripes, in ~25% of images
    3 sign         a teal square with horizontal stripes (same colour as the rider:
                   the stripe direction is the only local cue), in ~25% of images
    4 car          a blue blob, in ~50% of images, anywhere
    5 bicycle      a yellow 4-pixel-high bar, in ~30% of images

The shortcut: in training the rider sits on its *context* with probability
``bias`` and the sign away from it (and the other way round otherwise).
The context is the road (``context="road"``: a background region) or a bicycle
(``context="bicycle"``: another class's object, the paper's motivating case of a
rider on a bicycle; a bicycle is added where the rider needs one). Two test
splits: "ordinary" (the training distribution) and "conflicting" (every rider
away from its context, every sign on it). A network that learned "teal on the
context = rider" fails on the conflicting split.

A noisy local cue (``cue_flip`` = q > 0, as the noisy shape label of Colored
MNIST): in training the stripe direction of each rider and each sign is
swapped with probability q (a rider then carries the sign's horizontal
stripes and the other way round); the test splits keep the true stripes. The
stripe then predicts the class in a fraction 1 − q of training objects and
the context in a fraction ``bias``; with q > 1 − bias the context is the
better cue in training, so a model trained to convergence keeps the shortcut
(the Bayes classifier given both cues follows the context where they
disagree). With q = 0 (the default) the data are those of earlier versions.

The recipe trains on these scenes in seconds on a CPU (a smoke run of the whole
pipeline); the debiasing study in the repository's ``study/`` folder measures
DropClass on them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, Optional

import numpy as np
import torch

CLASSES = ("background", "road", "rider", "sign", "car", "bicycle")
K = len(CLASSES)
RARE = 2  # rider
FREQ = 1  # road
SIGN = 3
BICYCLE = 5
SPLITS = ("ordinary", "conflicting")


# ----------------------------------------------------------------------------- data

@dataclass(frozen=True)
class Config:
    """The data and the model (what calibration varies: bias, stripe, noise, rare_p, context)."""

    size: int = 32          # image side
    n_train: int = 2000
    n_test: int = 400       # per split
    bias: float = 0.95      # P(rider on its context) = P(sign away from it) in training
    context: str = "road"   # the rider's context: "road" or "bicycle"
    rare_p: float = 0.25    # P(an image holds a rider)
    noise: float = 0.45     # pixel noise std
    stripe: float = 0.5     # stripe amplitude (the only local cue separating rider from sign)
    cue_flip: float = 0.0   # P(a training rider's or sign's stripe direction is swapped); test splits: never
    width: int = 32         # feature channels C
    batch: int = 32
    lr: float = 3e-3


_COLOUR = {0: (0.0, 0.0, 0.0), 1: (0.9, 0.1, 0.1), 2: (0.1, 0.7, 0.7), 3: (0.1, 0.7, 0.7),
           4: (0.1, 0.1, 0.9), 5: (0.8, 0.8, 0.1)}


def _touching(rng, rect, s, size):
    """Top-left of an s×s square sitting on the top edge of rect = (y0, y1, x0, x1)."""
    y0, _, x0, x1 = rect
    y = max(0, y0 - s)
    x = int(rng.integers(max(0, x0 - s // 2), max(1, min(size - s, x1 - s // 2) + 1)))
    return y, min(x, size - s)


def _away(rng, rect, s, size, margin=3):
    """Top-left of an s×s square at least `margin` pixels from rect (if any)."""
    for _ in range(100):
        y = int(rng.integers(0, size - s + 1))
        x = int(rng.integers(0, size - s + 1))
        if rect is None:
            return y, x
        y0, y1, x0, x1 = rect
        if y + s + margin <= y0 or y >= y1 + margin or x + s + margin <= x0 or x >= x1 + margin:
            return y, x
    return 0, 0  # pragma: no cover - a context never covers the whole image


def _bicycle(rng, size):
    """A 4×(8..12) bar in the lower two thirds (room for a rider above it)."""
    w = int(rng.integers(8, 13))
    y0 = int(rng.integers(size // 3, size - 4))
    x0 = int(rng.integers(0, size - w + 1))
    return (y0, y0 + 4, x0, x0 + w)


def make_split(n: int, seed: int, cfg: Config, mode: str) -> tuple:
    """(images float32 (n, 3, S, S), labels int64 (n, S, S)); mode in train | ordinary | conflicting."""
    if mode not in ("train",) + SPLITS:
        raise ValueError(f"mode must be train, ordinary or conflicting, got {mode!r}")
    if cfg.context not in ("road", "bicycle"):
        raise ValueError(f"context must be 'road' or 'bicycle', got {cfg.context!r}")
    if not 0.0 <= cfg.cue_flip <= 1.0:
        raise ValueError(f"cue_flip must be in [0, 1], got {cfg.cue_flip!r}")
    flips = mode == "train" and cfg.cue_flip > 0  # no extra draws otherwise: q = 0 keeps the old data
    rng = np.random.default_rng(seed)
    S = cfg.size
    imgs = np.zeros((n, 3, S, S), np.float32)
    labels = np.zeros((n, S, S), np.int64)
    yy, xx = np.mgrid[0:S, 0:S]
    stripes_v = np.where(xx % 2 == 0, 1.0, -1.0).astype(np.float32)
    stripes_h = np.where(yy % 2 == 0, 1.0, -1.0).astype(np.float32)
    for i in range(n):
        lab = labels[i]
        road = None
        if rng.random() < 0.9:  # road: a band in the lower part of the image
            h = int(rng.integers(S // 4, S // 2))
            w = int(rng.integers(S // 2, S + 1))
            y0 = int(rng.integers(S // 3, S - h + 1))
            x0 = int(rng.integers(0, S - w + 1))
            road = (y0, y0 + h, x0, x0 + w)
            lab[y0:y0 + h, x0:x0 + w] = FREQ
        if rng.random() < 0.5:  # car: a blob anywhere
            r = int(rng.integers(3, 6))
            cy, cx = int(rng.integers(r, S - r)), int(rng.integers(r, S - r))
            lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 4
        bike = _bicycle(rng, S) if rng.random() < 0.3 else None
        objects = []  # (class, on its context?)
        for cls, p in ((SIGN, 0.25), (RARE, cfg.rare_p)):
            if rng.random() < p:
                if mode == "conflicting":
                    on = cls == SIGN
                else:
                    aligned = rng.random() < cfg.bias
                    on = aligned if cls == RARE else not aligned
                objects.append((cls, on, int(rng.integers(4, 8))))
        if cfg.context == "bicycle" and bike is None and any(on for _, on, _ in objects):
            bike = _bicycle(rng, S)
        if bike is not None:
            lab[bike[0]:bike[1], bike[2]:bike[3]] = BICYCLE
        context = bike if cfg.context == "bicycle" else road
        swapped = set()
        for cls, on, s in objects:
            y, x = _touching(rng, context, s, S) if on and context is not None else _away(rng, context, s, S)
            lab[y:y + s, x:x + s] = cls
            if flips and rng.random() < cfg.cue_flip:
                swapped.add(cls)
        img = imgs[i]
        for c, col in _COLOUR.items():
            m = lab == c
            for ch in range(3):
                img[ch][m] = col[ch]
        for cls, own, other in ((RARE, stripes_v, stripes_h), (SIGN, stripes_h, stripes_v)):
            m = lab == cls
            img[:, m] += cfg.stripe * (other if cls in swapped else own)[m]
        img += cfg.noise * rng.standard_normal(img.shape).astype(np.float32)
    return torch.from_numpy(imgs), torch.from_numpy(labels)


def splits(cfg: Config, seed: int, n_train: Optional[int] = None, n_test: Optional[int] = None) -> Dict[str, tuple]:
    """The run's data: "train", "ordinary", "conflicting" (the data seeds 1000·seed + 1, 2, 3)."""
    out = {"train": make_split(n_train or cfg.n_train, 1000 * seed + 1, cfg, "train")}
    for j, mode in enumerate(SPLITS):
        out[mode] = make_split(n_test or cfg.n_test, 1000 * seed + 2 + j, cfg, mode)
    return out


def batches(data: tuple, batch: int, seed: int) -> Iterator:
    """Endless random batches (with replacement) of (images, labels); the same for every method of a seed."""
    x, y = data
    g = torch.Generator().manual_seed(seed + 1)
    while True:
        idx = torch.randint(len(x), (batch,), generator=g)
        yield x[idx], y[idx]
