"""A segmentation task with a co-occurrence shortcut, and one training run on it.

This module is the study's data and model; ``study/registry.py`` holds the
registered settings, ``study/bias_grid.py`` runs the calibration and the grid,
``study/bias_report.py`` turns the runs into verdicts (study/README.md). One run::

    from study import synthetic_bias as sb
    res = sb.train_run(sb.Config(cue_flip=0.2), sb.Method(alpha=10.0, per_sample=False), seed=0, steps=600)

Data: the generated scenes of ``debias_ops.recipe.scenes`` (its docstring has the
classes, the shortcut and the noisy local cue ``cue_flip``): 32×32 images, six
classes, a rare *rider* that in training sits on its context (the road) with
probability ``bias``; two test splits, "ordinary" (the training distribution)
and "conflicting" (every rider off the road, every sign on it).

Model: a small dilated conv net (``Net``: features C = ``width`` at half
resolution, receptive field wide enough to see the context) ending in a 1×1
``classifier``. The baseline trains it with plain cross-entropy; DropClass wraps
it with ``debias_ops.dropclass`` (the classifier's weight reused) under a
:class:`Method`, the selector's BatchNorm momentum set to ``Method.bn_momentum``
(default 0.01, the authors'). Both train through the project's one loop
(``debias_ops.recipe.loop.train_steps``) from the same initial weights on the
same batches (seeded by the run's seed), and are evaluated with
``debias_ops.recipe.loop.evaluate`` (torchmetrics' per-class IoU).

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
    bn_momentum: the momentum of the selector's BatchNorm (the authors' 0.01; PyTorch's default is 0.1).
    """

    baseline: bool = False
    alpha: float = 1.0
    schedule: str = "paper"
    p_const: float = 0.5
    importance: str = "weight"
    per_sample: bool = True
    pretrain: int = 0
    bn_momentum: float = 0.01


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
    model = dops.dropclass(net, classifier="classifier", importance=method.importance, alpha=method.alpha,
                           per_sample=method.per_sample)
    for m in model.selector.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = method.bn_momentum
    return model


@torch.no_grad()
def recalibrate_selector_bn(model: nn.Module, images: torch.Tensor, device, chunk: int = 200) -> None:
    """Recompute the selector's BatchNorm statistics on all-kept features (an eval-path variant).

    In training the selector sees the drop path's suppressed features, so its running
    statistics are those of features with a class dropped (or, early on, none); the eval
    path feeds it all-kept features. This resets the statistics and re-estimates them as
    the plain average over ``images`` (in chunks) of the batch mean and variance of
    ``selector``'s input on the inference path, every other layer in eval mode; the
    weights do not change.
    """
    bns = [m for m in model.selector.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    was = model.training
    saved = [m.momentum for m in bns]
    model.eval()
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
            m.train()
        for i in range(0, len(images), chunk):
            model(images[i:i + chunk].to(device))
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.train(was)


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
    the plain path classifier(feats) without the selector (``iou_plain``, a diagnostic) and through the
    inference path after :func:`recalibrate_selector_bn` on the training images (``iou_recal``); the class
    overlap of the classifier's weight (``overlap``: matrix and mean, k = C // 4); coarse training
    curves of the loss terms (``curves``); training time ``train_s``, the whole run's time
    ``total_s`` (data, training, evaluation) and its CPU time ``cpu_s``; versions. A class absent from both the labels and the
    predictions of a split (NaN in torchmetrics) is stored as IoU 0; at the study's test size (400
    images per split) every class occurs in every test split, so this touches only tiny smoke runs.
    """
    from debias_ops.recipe.loop import constant_schedule, evaluate, paper_schedule, train_steps

    t_start, cpu_start = time.perf_counter(), time.process_time()
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
        recalibrate_selector_bn(model, data["train"][0], device)
        res["iou_recal"] = iou_on(model)
    res["total_s"] = time.perf_counter() - t_start
    res["cpu_s"] = time.process_time() - cpu_start  # this process's CPU time (all its threads)
    return res
