"""The study's registered settings: the calibration rule, the grid, the seeds, and where runs live.

Both the runner (``study/bias_grid.py``) and the report (``study/bias_report.py``)
import this module; neither imports the other's internals (the report never
imports the runner). Everything here was fixed before the runs it governs:
the calibration rule before the first calibration run, the grid before any
DropClass run (see study/README.md).

**Data.** The generated scenes of ``debias_ops.recipe.scenes`` with a noisy
local cue (``cue_flip`` = q): in training a rider's or a sign's stripe
direction is swapped with probability q, while the rider sits on its context
(the road) with probability ``bias`` = 0.95. With q > 1 − bias the context is
the more predictive cue in training, so the shortcut is what a converged model
should learn (as the colour in Colored MNIST), not an under-trained cue.

**Calibration (baseline only; seeds ``CAL_SEEDS``, never used by the grid).**
For each candidate (data, L) of ``CANDIDATES``, in order, the plain
cross-entropy baseline is trained for L and for 2L steps (two complete runs,
each with its own one-cycle schedule) on every calibration seed. A candidate
*qualifies* when, with means over the calibration seeds,

* the rider's IoU on the ordinary split at L is ≥ ``MIN_ORDINARY`` points
  (the class is learned at all),
* it has plateaued: |rider IoU, ordinary, at 2L − at L| < ``PLATEAU`` points
  (doubling the training changes it by less than that), and
* the gap (ordinary − conflicting rider IoU) is ≥ ``MIN_GAP`` points at L
  *and* at 2L (the bias holds when training is doubled).

The grid runs on the first qualifying candidate; the calibration stops there.
``CHOSEN`` records the pick (set from study/results/calibration.md).

**The grid (registered before any DropClass run).** ``CELLS``: cell name ->
(the training method of ``METHODS``, the evaluation path). Every cell uses the
paper's schedule (p = t, λ = 1 − t), importance "weight" (the paper's) and the
authors' selector BatchNorm momentum 0.01, L steps (the calibration's), seeds
``GRID_SEEDS``; every cell is compared with the baseline on the same seeds
(same data, initial weights and batches).

The run cache: one JSON file per run at
``<out>/runs/<data>/<method>@<steps>/seed<k>-<key>.json`` where ``key`` hashes
every setting that changes the run (the whole data/model config including
n_train and n_test, the whole method, steps, seed, device): a run with other
settings never reuses a stored one.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Tuple

from study import synthetic_bias as sb

RESULTS = Path(__file__).resolve().parent / "results"

# ----------------------------------------------------------------------------- calibration

CAL_SEEDS: Tuple[int, ...] = (100, 101, 102)
GRID_SEEDS: Tuple[int, ...] = tuple(range(15))
MIN_ORDINARY = 60.0  # points
MIN_GAP = 20.0       # points, at L and at 2L
PLATEAU = 2.0        # points: |ordinary rider IoU(2L) - (L)|

# Candidate data settings (all: road context, bias 0.95, stripe 0.5, the scenes' defaults otherwise)
DATA: Dict[str, sb.Config] = {
    "b95-flip0.1": sb.Config(bias=0.95, cue_flip=0.1),
    "b95-flip0.2": sb.Config(bias=0.95, cue_flip=0.2),
    "b95-flip0.3": sb.Config(bias=0.95, cue_flip=0.3),
}
# (data, L) in the order the rule reads them: the weakest noise first, the shorter length first
CANDIDATES: Tuple[Tuple[str, int], ...] = tuple((d, L) for L in (600, 1200) for d in DATA)

# The calibration's pick (study/results/calibration.md), fixed before any DropClass run: the first qualifying
# candidate (q = 0.1 at L = 1200; every candidate at L = 600 failed the plateau check).
CHOSEN: Optional[Tuple[str, int]] = ("b95-flip0.1", 1200)

# ----------------------------------------------------------------------------- the grid

METHODS: Dict[str, sb.Method] = {
    "baseline": sb.BASELINE,
    "a10-batch": sb.Method(alpha=10.0, per_sample=False),   # the paper's setting
    "a1-batch": sb.Method(alpha=1.0, per_sample=False),
    "a0.1-batch": sb.Method(alpha=0.1, per_sample=False),
    "a1-sample": sb.Method(alpha=1.0, per_sample=True),
}
# cell -> (method, evaluation path): "iou" (the model's own inference path) or "iou_recal" (the same
# trained model, its selector's BatchNorm statistics recomputed on all-kept features before evaluation)
CELLS: Dict[str, Tuple[str, str]] = {
    "paper": ("a10-batch", "iou"),
    "alpha=1": ("a1-batch", "iou"),
    "alpha=0.1": ("a0.1-batch", "iou"),
    "alpha=1, per-sample": ("a1-sample", "iou"),
    "paper, BN recalibrated": ("a10-batch", "iou_recal"),
}
ALPHA = 0.05  # family-wise error rate of each co-primary measure over the cells (Holm)


# ----------------------------------------------------------------------------- runs

class Job(NamedTuple):
    data: str
    method: str  # a key of METHODS
    steps: int
    seed: int


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", name).strip("_")


def config_of(data: str, overrides: Optional[Dict] = None) -> sb.Config:
    from dataclasses import replace
    return replace(DATA[data], **(overrides or {}))


def run_key(job: Job, overrides: Optional[Dict] = None, device: str = "cpu") -> str:
    """12 hex digits hashing every setting that changes the run."""
    what = {"config": asdict(config_of(job.data, overrides)), "method": asdict(METHODS[job.method]),
            "steps": job.steps, "seed": job.seed, "device": str(device)}
    return hashlib.sha1(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


def run_path(out: Path, job: Job, overrides: Optional[Dict] = None, device: str = "cpu") -> Path:
    key = run_key(job, overrides, device)
    return Path(out) / "runs" / slug(job.data) / f"{slug(job.method)}@{job.steps}" / f"seed{job.seed}-{key}.json"
