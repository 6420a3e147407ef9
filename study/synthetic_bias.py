"""A segmentation task with a co-occurrence shortcut, and one training run on it.

This module is the benchmark's data and model; ``study/bias_grid.py`` runs
the calibration and the pre-registered grid on it, ``study/bias_report.py``
turns the runs into verdicts. One run::

    from study import synthetic_bias as sb
    res = sb.train_run(sb.Config(), sb.Method(alpha=1.0), seed=0, steps=300)

Data (generated in code, deterministic by seed): S×S images (S = 32) with
K = 6 classes,

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

Model: a small dilated conv net (``Net``: features C = ``width`` at half
resolution, receptive field wide enough to see the context) ending in a 1×1
``classifier``. The baseline trains it with plain cross-entropy; DropClass wraps
it with ``debias_ops.dropclass`` (the classifier's weight reused) under a
:class:`Method`. Both train through the project's one loop
(``debias_ops.recipe.train_steps``) from the same initial weights on the same
batches (seeded by the run's seed), and are evaluated with
``debias_ops.recipe.evaluate`` (torchmetrics' per-class IoU).

On a CUDA device the ops dispatch to the fused Triton kernels (design §5).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn as nn

import debias_ops as dops
from debias_ops.recipe.scenes import (  # noqa: F401  (the study's data, re-exported)
    BICYCLE,
    CLASSES,
    FREQ,
    RARE,
    SIGN,
    SPLITS,
    Config,
    K,
    batches,
    make_split,
    splits,
)

# ----------------------------------------------------------------------------- model

class Net(nn.Module):
    """A small dilated conv net: (B, 3, S, S) -> logits (B, K, S/2, S/2) through a 1×1 ``classifier``."""

    def __init__(self, width: int = 32, num_classes: int = K):
        super().__init__()

        def block(cin, cout, stride=1, dilation=1):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
                nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.backbone = nn.Sequential(
            block(3, width // 2), block(width // 2, width, stride=2),
            block(width, width, dilation=2), block(width, width, dilation=4), block(width, width, dilation=1))
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, x):
        return self.classifier(self.backbone(x))


@dataclass(frozen=True)
class Method:
    """How a run trains: ``baseline=True`` (plain CE) or DropClass with these settings.

    schedule: "paper" (p = t, lam = 1 - t) or "constant" (p = p_const, lam = 1 - p_const).
    pretrain: steps of backbone pre-training before the run (0: a random backbone), see
    :func:`pretrain_backbone`.
    """

    baseline: bool = False
    alpha: float = 1.0
    schedule: str = "paper"
    p_const: float = 0.5
    importance: str = "weight"
    per_sample: bool = True
    pretrain: int = 0


BASELINE = Method(baseline=True)


def pretrain_backbone(net: Net, cfg: Config, seed: int, steps: int, device) -> None:
    """Stand-in for a pretrained backbone (the paper starts from ImageNet weights).

    Trains ``net`` with plain CE for ``steps`` steps on a related task without the
    shortcut: images of the same generator (data seed 1000·seed + 7) with bias 0.5
    (riders and signs on and off the context equally often) and the rider labelled
    as a sign (the task never asks for the stripe direction). Then the classifier
    is re-initialised (seeded), so that only the backbone carries over.
    """
    from dataclasses import replace

    from debias_ops.recipe.loop import train_steps
    x, y = make_split(cfg.n_train, 1000 * seed + 7, replace(cfg, bias=0.5), "train")
    y = torch.where(y == RARE, torch.full_like(y, SIGN), y)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.1)
    train_steps(net, batches((x, y), cfg.batch, seed + 7), steps=steps, optimizer=opt, scheduler=sched,
                device=device, progress_bar=False, log_every=max(1, min(50, steps)))
    torch.manual_seed(seed + 11)
    net.classifier.reset_parameters()


def build(cfg: Config, method: Method, device, seed: int = 0) -> nn.Module:
    """The seeded-by-caller model: the plain Net (pre-trained if ``method.pretrain``), or it wrapped
    by ``dops.dropclass``."""
    net = Net(cfg.width).to(device)
    if method.pretrain:
        pretrain_backbone(net, cfg, seed, method.pretrain, device)
    if method.baseline:
        return net
    return dops.dropclass(net, classifier="classifier", importance=method.importance, alpha=method.alpha,
                          per_sample=method.per_sample)


# ----------------------------------------------------------------------------- one run

def _versions() -> Dict[str, str]:
    try:
        import triton
        tv = triton.__version__
    except ImportError:  # pragma: no cover - triton is in the test environment
        tv = None
    return {"torch": torch.__version__, "triton": tv, "numpy": np.__version__}


def _curve(rows, key: str, parts: int = 10):
    """The mean of rows[key] over `parts` equal stretches of training (a coarse curve)."""
    vals = np.array([r[key] for r in rows], dtype=np.float64)
    return [float(c.mean()) for c in np.array_split(vals, min(parts, len(vals)))] if len(vals) else []


def train_run(cfg: Config, method: Method, seed: int, steps: int, *, device="cpu", progress_bar: bool = False,
              data: Optional[Dict[str, tuple]] = None) -> Dict:
    """Train one model (``method``) for ``steps`` steps on seed ``seed``'s data; evaluate on both splits.

    Returns a JSON-able dict: per-class IoU on each split (``iou``); for DropClass also the IoU through
    the plain path classifier(feats) without the selector (``iou_plain``, a diagnostic); the class
    overlap of the classifier's weight (``overlap``: matrix and mean, k = C // 4); coarse training
    curves of the loss terms (``curves``); wall time and versions. A class absent from both the labels
    and the predictions of a split (NaN in torchmetrics) is stored as IoU 0; at the benchmark's test
    sizes every class occurs in every test split (checked for all of ``bias_grid.DATA`` and seeds
    0-4), so this touches only tiny smoke runs.
    """
    from debias_ops.recipe.loop import constant_schedule, evaluate, paper_schedule, train_steps

    device = torch.device(device)
    data = data or splits(cfg, seed)
    torch.manual_seed(seed)  # the same initial weights for every method of a seed
    model = build(cfg, method, device, seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(steps, 1), pct_start=0.1)
    schedule = paper_schedule if method.schedule == "paper" else constant_schedule(method.p_const)
    drop_gen = torch.Generator(device=device).manual_seed(seed + 2)
    t0 = time.perf_counter()
    rows = train_steps(model, batches(data["train"], cfg.batch, seed), steps=steps, optimizer=opt, scheduler=sched,
                       device=device, dropclass_schedule=schedule, generator=drop_gen, progress_bar=progress_bar,
                       log_every=max(1, min(50, steps)), desc="baseline" if method.baseline else "dropclass")
    train_s = time.perf_counter() - t0

    def iou_on(m) -> Dict[str, list]:
        out = {}
        for split in SPLITS:
            x, y = data[split]
            chunks = [(x[i:i + 200], y[i:i + 200]) for i in range(0, len(x), 200)]
            out[split] = np.nan_to_num(evaluate(m, chunks, K, device), nan=0.0).tolist()
        return out

    net = model if method.baseline else model.model
    ov = dops.class_overlap(net.classifier.weight.detach().cpu())
    res = {"seed": seed, "steps": steps, "config": asdict(cfg), "method": asdict(method), "device": str(device),
           "iou": iou_on(model),
           "overlap": {"mean": float(ov.mean), "chance": ov.chance, "matrix": ov.matrix.tolist()},
           "curves": {key: _curve(rows, key) for key in ("loss", "ce", "ce_drop", "sup")},
           "train_s": train_s, "versions": _versions()}
    if not method.baseline:
        res["iou_plain"] = iou_on(net)  # the hook is idle outside DropClassModel's calls: the plain net
    return res
