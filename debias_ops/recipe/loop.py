"""The training recipe: torchvision / smp segmentation models, with or without DropClass.

    python -m debias_ops.recipe --data cityscapes --root /data/cityscapes --model deeplabv3_resnet50 \\
        --steps 40000 --batch 8 --crop 512 1024 --dropclass --out runs/dc
    torchrun --nproc_per_node 8 -m debias_ops.recipe ... --sync-bn       # several GPUs / nodes
    python -m debias_ops.recipe --data synthetic --model Unet --encoder resnet18 --steps 300 --out runs/syn
    python -m debias_ops.recipe plot --runs runs/base runs/dc --out runs/compare   # baseline vs DropClass

This module holds the project's one training loop: :func:`train_steps` and
:func:`evaluate` (the debiasing study calls them too); the command line
(:mod:`debias_ops.recipe.cli`) is a thin layer on them.

* ``train_steps`` runs SGD steps on a DropClass model (``dops.dropclass``:
  ``model(x, y, progress=t, p=p, lam=lam)`` returns the loss) or a plain model
  (plain cross-entropy through ``dops.dropclass_loss`` with lam = 1, nothing
  dropped). The DropClass schedule is a function t -> (p, lam) of the progress
  t = step / total_steps; the paper's is p = t, lam = 1 - t (alpha = 10 is the
  wrapper's). Losses stay on the device and are read once every ``log_every``
  steps (one host sync per log, none per step); bf16 autocast on CUDA with
  ``amp=True``.
* ``evaluate`` returns per-class IoU through the model's own inference output,
  with torchmetrics' ``MulticlassJaccardIndex`` (average="none",
  ignore_index=255, NaN for a class absent from both prediction and labels).
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import debias_ops as dops

IGNORE = 255
LOSS_KEYS = ("loss", "ce", "ce_drop", "sup")

# ----------------------------------------------------------------------------- DropClass schedules


def paper_schedule(t: float) -> Tuple[float, float]:
    """The paper's schedule: drop probability p = t, CE weight lam = 1 - t."""
    return t, 1.0 - t


def constant_schedule(p: float, lam: Optional[float] = None) -> Callable[[float], Tuple[float, float]]:
    """A fixed drop probability p, with lam = 1 - p unless given."""
    lam = 1.0 - p if lam is None else lam
    return lambda t: (p, lam)


# ----------------------------------------------------------------------------- the loop


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def baseline_loss(output, target: torch.Tensor, aux_weight: Optional[float] = None) -> Tuple[torch.Tensor, tuple]:
    """Plain CE of a plain model's output (+ aux_weight x CE of a torchvision "aux" output).

    Returns (loss, (ce, ce_drop, sup)) like a DropClass call: ce_drop = ce, sup = 0.
    """
    res = dops.dropclass_loss(dops.segmentation_logits(output), dops.segmentation_logits(output), target, None,
                              lam=1.0, alpha=0.0, ignore_index=IGNORE)
    loss = res.loss
    if aux_weight and isinstance(output, dict) and output.get("aux") is not None:
        aux = output["aux"]
        loss = loss + aux_weight * dops.dropclass_loss(aux, aux, target, None, lam=1.0, alpha=0.0,
                                                       ignore_index=IGNORE).loss
    return loss, (res.ce, res.ce_drop, res.sup)


def train_steps(
    model: torch.nn.Module,
    batches: Iterator,
    *,
    steps: int,
    optimizer: torch.optim.Optimizer,
    scheduler=None,
    device,
    amp: bool = False,
    dropclass_schedule: Callable[[float], Tuple[float, float]] = paper_schedule,
    start_step: int = 0,
    total_steps: Optional[int] = None,
    on_step: Optional[Callable[[int], None]] = None,
    progress_bar: bool = True,
    log_every: int = 10,
    on_log: Optional[Callable[[List[Dict]], None]] = None,
    aux_weight: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    value_checks: bool = False,
    desc: str = "train",
) -> List[Dict]:
    """Run ``steps`` optimiser steps (global steps start_step+1 .. start_step+steps); one log row per step.

    model: a DropClass model (``dops.is_dropclass``), a plain segmentation model, or either in DDP.
    batches: iterator (or iterable) of (images (B,3,H,W) float, target (B,H,W) int64, 255 = ignore),
        at least ``steps`` of them.
    total_steps: length of the whole run (default start_step + steps): t = step / total_steps,
        also what a poly ``scheduler`` was built for.
    on_step(step): called after every step (step = steps done so far, globally), e.g. to checkpoint
        or evaluate; rows up to a multiple of ``log_every`` and the last step are flushed before it.
    on_log(rows): called with the newly flushed rows (every ``log_every`` steps and at the end).
    aux_weight: the plain model's aux loss weight (a DropClass model carries its own).
    generator: draws the dropped classes (a DropClass model; default: the device's generator).
    value_checks: debias_ops' label-range checks in the loss (a host sync per step on a GPU);
        the data pipelines here check labels themselves.

    Each row: step, t, p, lam, lr (the step's learning rate), loss, ce, ce_drop, sup (floats).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"log_every must be a positive int, got {log_every!r}")
    if steps == 0:
        return []
    device = torch.device(device)
    end = start_step + steps
    total = end if total_steps is None else int(total_steps)
    if total < end:
        raise ValueError(f"total_steps={total_steps} is less than start_step + steps = {end}")
    dropclass = dops.is_dropclass(model)  # also inside DDP
    use_amp = bool(amp) and device.type == "cuda"
    rows: List[Dict] = []
    pending: List[Tuple[int, float, float, float, float, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        values = torch.stack([v for *_, v in pending]).tolist()  # the one host sync of a log interval
        new = []
        for (step, t, p, lam, lr, _), vals in zip(pending, values):
            row = {"step": step, "t": t, "p": p, "lam": lam, "lr": lr, **dict(zip(LOSS_KEYS, vals))}
            new.append(row)
        pending.clear()
        bad = [r for r in new if not np.isfinite(r["loss"])]
        if bad:
            raise FloatingPointError(f"the loss is {bad[0]['loss']} at step {bad[0]['step']}")
        rows.extend(new)
        bar.set_postfix(loss=f"{new[-1]['loss']:.4f}", refresh=False)
        if on_log is not None:
            on_log(new)

    from tqdm.auto import tqdm
    bar = tqdm(total=total, initial=start_step, desc=desc, disable=not progress_bar, dynamic_ncols=True,
               mininterval=1.0)
    model.train()
    batches = iter(batches)
    with dops.value_checks(value_checks):
        for step in range(start_step, end):
            try:
                images, target = next(batches)
            except StopIteration:
                raise ValueError(f"batches ran out after {step - start_step} of {steps} steps: pass an endless "
                                 "iterator (debias_ops.recipe.data.batch_stream) or enough batches") from None
            images = images.to(device, non_blocking=True)
            target = target.to(device, non_blocking=True)
            t = dops.progress(step, total)
            p, lam = dropclass_schedule(t)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                if dropclass:
                    out = model(images, target, progress=t, p=p, lam=lam, generator=generator)
                    loss, parts = out.loss, (out.ce, out.ce_drop, out.sup)
                else:
                    loss, parts = baseline_loss(model(images), target, aux_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            lr = optimizer.param_groups[0]["lr"]
            if scheduler is not None:
                scheduler.step()
            pending.append((step + 1, t, float(p), float(lam), lr,
                            torch.stack([loss.detach().float()] + [v.detach().float() for v in parts])))
            if (step + 1) % log_every == 0 or step + 1 == end:
                flush()
            bar.update(1)
            if on_step is not None:
                on_step(step + 1)
    bar.close()
    return rows


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable, num_classes: int, device, ignore_index: int = IGNORE, *,
             amp: bool = False, distributed: bool = False,
             on_batch: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None) -> np.ndarray:
    """Per-class IoU (K,) in [0, 1] over ``batches``; NaN for a class absent from prediction and labels.

    The model runs in eval mode (its training mode is restored afterwards) through its own
    inference output (a DropClass model: every class kept); logits smaller than the labels are
    upsampled bilinearly; images and labels of different sizes are a ValueError. ``distributed=True``: every rank evaluated its own shard; the counts are
    summed over ranks (each rank must call this). ``on_batch(pred, target)``: called with every batch's
    predicted labels and target (e.g. ``ContextConflictEval.update``).
    """
    from torchmetrics.classification import MulticlassJaccardIndex
    device = torch.device(device)
    core = unwrap(model)
    was_training = core.training
    core.eval()
    metric = MulticlassJaccardIndex(num_classes, average="none", ignore_index=ignore_index,
                                    zero_division=float("nan"), sync_on_compute=distributed).to(device)
    use_amp = bool(amp) and device.type == "cuda"
    try:
        for images, target in batches:
            if images.shape[-2:] != target.shape[-2:]:
                raise ValueError(f"evaluate: a batch's images are {tuple(images.shape[-2:])} (H, W) but its labels "
                                 f"{tuple(target.shape[-2:])}: labels must match their images pixel for pixel")
            images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = dops.segmentation_logits(core(images))
            if logits.shape[-2:] != target.shape[-2:]:
                logits = F.interpolate(logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
            pred = logits.argmax(1)
            metric.update(pred, target)
            if on_batch is not None:
                on_batch(pred, target)
        return metric.compute().double().cpu().numpy()
    finally:
        core.train(was_training)


def mean_iou(iou: np.ndarray) -> float:
    """mIoU over the classes present (NaN entries skipped)."""
    iou = np.asarray(iou, dtype=np.float64)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")
