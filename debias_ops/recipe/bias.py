"""Co-occurrence bias in the recipe: context statistics of the training labels, conflict views in evaluation.

With ``--context-stats`` a run

1. counts, once, co-occurrence and 4-neighbour adjacency of the classes over the training label
   maps (:class:`debias_ops.ContextStatistics`; the label files are read as stored, without
   augmentation; under torchrun each rank reads a shard and the counts are summed), and caches
   the counts in ``<out>/context_stats.pt``, keyed by the data set (root, split, a hash of the
   label files' names and sizes, or of the labels themselves for in-memory data, number of
   classes, ignore index). A later run or a resume with the same key reads the cache instead;
   the context rule (its thresholds, ``RULE``) is applied to the cached counts every time;
2. derives each class's context classes with the rule of :mod:`debias_ops.context` and adds,
   to every evaluation, the per-class IoU on the images and on the pixels where a class appears
   without its context (:class:`debias_ops.ContextConflictEval`): ``eval.csv`` gains the columns
   ``<class>/conflict_images`` and ``<class>/conflict_pixels``, ``log.json`` the rows of
   ``ConflictResult.as_rows`` (IoU, gap, images and pixels of each view) under ``"conflict"``
   and the statistics' summary under ``"context"``.

``debias-ops-train plot --runs BASE DC`` then draws, when the runs have them, the ordinary and
conflicting IoU of each class with a context for every run side by side (``context_iou.png``)
and the adjacency matrix of the cached statistics (``context_adjacency.png``).
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from debias_ops.context import VIEWS, ContextConflictEval, ContextResult, ContextStatistics

from . import data as D

STATS_FILE = "context_stats.pt"
# The context rule's thresholds (debias_ops.context; ContextStatistics.compute's defaults).
RULE = dict(min_images=5, min_cooccurrence=0.5, min_lift=1.25, min_touch=0.1, min_touch_lift=1.25)
CONFLICT_VIEWS = VIEWS[1:]


# ----------------------------------------------------------------------------- the training labels


class _CityscapesLabels(Dataset):
    """The train-ID masks of a :class:`~debias_ops.recipe.data.CityscapesSegmentation`, read as stored."""

    def __init__(self, dataset: D.CityscapesSegmentation):
        self.files = [t[0] for t in dataset.base.targets]
        self.lut, self.num_ids = dataset.lut, dataset.num_ids

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image
        ids = np.asarray(Image.open(self.files[index]))
        if ids.ndim != 2:
            raise ValueError(f"{self.files[index]}: expected a single-channel label-ID image, got shape {ids.shape}")
        bad = np.unique(ids[ids >= self.num_ids])
        if bad.size:
            raise ValueError(f"{self.files[index]}: label IDs {bad.tolist()[:10]} are outside the Cityscapes "
                             f"label table (0..{self.num_ids - 1}); expected *_gtFine_labelIds.png")
        return torch.from_numpy(self.lut[ids].astype(np.int64))


def dataset_key(dataset, num_classes: int, ignore_index: int = D.IGNORE) -> Dict[str, object]:
    """What the cached counts depend on: the data set's identity, its number of classes and ignore index."""
    h = hashlib.sha256()
    if isinstance(dataset, D.CityscapesSegmentation):
        root = Path(dataset.base.root).resolve()
        files = _CityscapesLabels(dataset).files
        for f in files:
            h.update(f"{os.path.relpath(f, root)}:{os.path.getsize(f)}\n".encode())
        key = {"root": str(root), "split": dataset.base.split, "files": len(files)}
    elif isinstance(dataset, D.TensorSegmentation):
        labels = dataset.labels.detach().cpu().contiguous()
        h.update(str((tuple(labels.shape), str(labels.dtype))).encode())
        h.update(labels.numpy().tobytes())
        key = {"root": None, "split": "in-memory", "files": len(labels)}
    else:
        raise TypeError(f"dataset must be a CityscapesSegmentation or a TensorSegmentation, got {type(dataset).__name__}")
    return {**key, "sha256": h.hexdigest(), "num_classes": int(num_classes), "ignore_index": int(ignore_index)}


def label_maps(dataset, *, rank: int = 0, world: int = 1, workers: int = 0) -> Iterator[torch.Tensor]:
    """The data set's label maps (H, W) int64, without augmentation; rank r yields maps r, r + world, ..."""
    if isinstance(dataset, D.TensorSegmentation):
        yield from dataset.labels[rank::world]
        return
    if not isinstance(dataset, D.CityscapesSegmentation):
        raise TypeError(f"dataset must be a CityscapesSegmentation or a TensorSegmentation, got {type(dataset).__name__}")
    from torch.utils.data import Subset
    files = _CityscapesLabels(dataset)
    yield from DataLoader(Subset(files, range(rank, len(files), world)), batch_size=None, num_workers=workers)


def context_statistics(dataset, num_classes: int, *, ignore_index: int = D.IGNORE, device="cpu", rank: int = 0,
                       world: int = 1, workers: int = 0) -> ContextStatistics:
    """One pass over the training labels; with ``world > 1`` every rank passes over its shard and the
    counts are summed over ranks (each rank must call this)."""
    stats = ContextStatistics(num_classes, ignore_index, device=torch.device(device))
    for target in label_maps(dataset, rank=rank, world=world, workers=workers):
        stats.update(target.to(device))
    return stats.sync() if world > 1 else stats


# ----------------------------------------------------------------------------- the run's setup


@dataclass
class ContextSetup:
    """The statistics of a run's training labels and the context sets the evaluation uses."""

    result: ContextResult
    classes: List[str]
    min_pixels: int
    path: Path
    cached: bool

    @property
    def context(self):
        return self.result.context

    def summary(self) -> Dict[str, object]:
        """For log.json: the rule, the statistics' file and each class's context (names)."""
        return {"file": str(self.path), "rule": dict(RULE), "min_pixels": self.min_pixels,
                "num_images": self.result.num_images,
                "context": {self.classes[a]: [self.classes[b] for b in ctx] for a, ctx in enumerate(self.context) if ctx}}

    def describe(self) -> str:
        pairs = [f"{self.classes[a]} <- {', '.join(self.classes[b] for b in ctx)}"
                 for a, ctx in enumerate(self.context) if ctx]
        how = "read from" if self.cached else "written to"
        return (f"context statistics of {self.result.num_images} training label maps ({how} {self.path}): "
                + ("; ".join(pairs) if pairs else "no class has a context"))


def _agree(flag: bool, world: int) -> bool:
    """True on every rank iff true on every rank (every rank decides alike, even without a shared --out)."""
    if world <= 1:
        return flag
    t = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def load_stats(path: Path) -> Optional[Dict]:
    """The cache file's content, or None if there is none."""
    path = Path(path)
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def prepare(args, train_ds, classes: Sequence[str], info, ignore_index: int = D.IGNORE) -> Optional[ContextSetup]:
    """The statistics of ``--context-stats`` (None without the flag): the cache if its key matches,
    else one pass over the training labels (sharded over ranks), written by rank 0."""
    if not getattr(args, "context_stats", False):
        return None
    path = Path(args.out) / STATS_FILE
    key = dataset_key(train_ds, len(classes), ignore_index)
    cached = load_stats(path)
    hit = _agree(cached is not None and cached.get("dataset") == key, info.world)
    stats = ContextStatistics(len(classes), ignore_index)
    if hit:
        stats.load_state_dict(cached["counts"])
    else:
        stats = context_statistics(train_ds, len(classes), ignore_index=ignore_index, device=info.device,
                                   rank=info.rank, world=info.world, workers=args.workers)
    result = stats.compute(**RULE)
    if info.main and not (hit and cached.get("rule") == RULE):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"dataset": key, "rule": dict(RULE), "classes": list(classes), "counts": stats.state_dict(),
                    "context": [list(c) for c in result.context]}, tmp)
        os.replace(tmp, path)
    if info.world > 1:
        dist.barrier()
    setup = ContextSetup(result, list(classes), int(args.context_min_pixels), path, hit)
    if info.main:
        print(setup.describe(), flush=True)
    return setup


# ----------------------------------------------------------------------------- evaluation


def eval_columns(setup: Optional[ContextSetup], classes: Sequence[str]) -> List[str]:
    """The eval.csv columns the conflict views add (none without a setup)."""
    if setup is None:
        return []
    return [f"{name}/{view}" for view in CONFLICT_VIEWS for name in classes]


def conflict_eval(setup: Optional[ContextSetup], num_classes: int, device) -> Optional[ContextConflictEval]:
    """A fresh evaluator for one evaluation (None without a setup); feed it ``update(pred, target)``."""
    if setup is None:
        return None
    return ContextConflictEval(num_classes, setup.context, min_pixels=setup.min_pixels, device=torch.device(device))


def _nan_to_none(v):
    return None if isinstance(v, float) and math.isnan(v) else v


def eval_entry(ev: Optional[ContextConflictEval], classes: Sequence[str], distributed: bool = False) -> Dict:
    """What an evaluation adds to its log entry: ``conflict`` (one row per class, NaN as None) and
    ``columns`` (the eval.csv cells). With ``distributed`` the counts are summed over ranks first
    (each rank must call this)."""
    if ev is None:
        return {}
    if distributed:
        ev.sync()
    rows = [{k: _nan_to_none(v) for k, v in row.items()} for row in ev.compute().as_rows(list(classes))]
    columns = {f"{r['name']}/{view}": r[f"iou_{view}"] for view in CONFLICT_VIEWS for r in rows}
    return {"conflict": rows, "columns": columns}


def describe_entry(entry: Dict) -> str:
    """One line: IoU (%) all / conflict images / conflict pixels of each class with a conflict view."""
    def pct(v):
        return "nan" if v is None else f"{100 * v:.1f}"
    parts = [f"{r['name']} {pct(r['iou_all'])}/{pct(r['iou_conflict_images'])}/{pct(r['iou_conflict_pixels'])}"
             for r in entry.get("conflict", []) if r["images_conflict_pixels"]]
    return "IoU (%) all/conflict images/conflict pixels: " + (", ".join(parts) if parts else "no class has a context")
