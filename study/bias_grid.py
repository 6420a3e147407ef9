"""When does DropClass help? The calibration and the pre-registered grid on study/synthetic_bias.py.

    python -m study.bias_grid calibrate --jobs 2   # baseline only: pick the data (CPU, ~4 min)
    python -m study.bias_grid grid --jobs 2        # the grid below on CHOSEN (CPU, 2 cores: see the README)
    python -m study.bias_grid grid --jobs 2 --data bicycle-b98   # ... on SECOND
    python -m study.bias_grid grid --device cuda   # the same grid through the fused kernels
    python -m study.bias_grid report               # tables and plots from the runs on disk

**Calibration (baseline only, before any DropClass run).** The plain
cross-entropy baseline is trained on each candidate data setting of
``DATA`` (S = 300 steps, seeds 0-4). A setting *qualifies* when the baseline's
rare-class (rider) IoU is ≥ 60 on the ordinary split and ≥ 20 points lower on the
conflicting split (means over seeds). Rule fixed beforehand: the grid uses the
first qualifying setting in ``DATA``'s order (the order goes from the fewest
changes to the default data to the most). ``CHOSEN`` records the pick;
study/results/calibration.md the numbers. The calibration found a
qualifying setting of the second bias type too (the rider's context is a
bicycle, another class's object: the paper's motivating case); decided after
the calibration and before any DropClass run, the grid also runs on the first
qualifying bicycle setting, ``SECOND``.

**The grid (pre-registered; one factor at a time around a central cell).**
Central cell: α = 1, the paper's schedule (p = t, λ = 1 − t), importance
"weight" (the paper's), per-sample drops, S steps. Each other cell changes one
factor: 3S steps; α = 10 (the paper's value); α = 0.1; a constant schedule
(p = 0.5, λ = 0.5); importance "logits" (the ridge probe); per-batch drops (the
paper's sampling); and α = 10 at 3S (the paper's α with a longer run). A full
factorial (3 α × 2 schedules × 2 importances × 2 drops × 2 lengths = 48 cells ×
5 seeds) would not fit 90 CPU minutes; one-at-a-time shows each factor's effect
around one point, at the price of missing interactions (α × length is the one
interaction included, as the earlier example saw α = 10 collapse at short
lengths). Seeds 0-4 per cell; every cell is compared with the baseline of the
same length on the same seeds: same data, same initial weights, same batches.
Diagnostic cells (``DIAGNOSTICS``) are run only with ``--diagnostics`` and are
reported apart, as diagnostics.

Runs are written one JSON file each to
``<out>/runs/<data>/<cell>@<steps>/seed<k>.json``: a file already there is not
run again (the grid resumes), and a baseline shared by several cells is run
once. ``--jobs N`` runs N trainings in parallel processes (one thread each).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence

from study import synthetic_bias as sb

RESULTS = Path(__file__).resolve().parent / "results"
S = 300  # the short training length

# Candidate data settings, in the order the calibration rule reads them (fewest changes first).
DATA: Dict[str, sb.Config] = {
    "b95": sb.Config(bias=0.95),                                # the earlier example's data
    "b98": sb.Config(bias=0.98),                                # a stronger co-occurrence
    "b95-stripe0.3": sb.Config(bias=0.95, stripe=0.3),          # a weaker local cue
    "b98-stripe0.3": sb.Config(bias=0.98, stripe=0.3),
    "b98-rare0.1": sb.Config(bias=0.98, rare_p=0.1),            # a rarer rider
    "bicycle-b98": sb.Config(bias=0.98, context="bicycle"),     # context = another class's object
}
# The calibration's picks (study/results/calibration.md), fixed before any DropClass run:
CHOSEN = "b95-stripe0.3"  # the first qualifying setting (context: the road)
SECOND = "bicycle-b98"    # the first qualifying setting whose context is a bicycle
GRID_DATA = (CHOSEN, SECOND)

# The pre-registered grid: name -> (method, length in units of S)
CELLS: Dict[str, tuple] = {
    "central": (sb.Method(alpha=1.0), 1),
    "3S": (sb.Method(alpha=1.0), 3),
    "alpha=10": (sb.Method(alpha=10.0), 1),
    "alpha=0.1": (sb.Method(alpha=0.1), 1),
    "constant p=0.5": (sb.Method(alpha=1.0, schedule="constant", p_const=0.5), 1),
    "logits": (sb.Method(alpha=1.0, importance="logits"), 1),
    "per-batch": (sb.Method(alpha=1.0, per_sample=False), 1),
    "alpha=10, 3S": (sb.Method(alpha=10.0), 3),
}
# Diagnostics, named as such and reported apart (not cells of the grid; see the README's disclosure)
DIAGNOSTICS: Dict[str, tuple] = {
    "diag: alpha=0": (sb.Method(alpha=0.0), 1),   # the drop branch's CE only: what does the suppression term cost?
    # the central cell from a pre-trained backbone (sb.pretrain_backbone, S steps), against a baseline
    # pre-trained the same way: does DropClass need pre-trained features?
    "diag: pretrained": (sb.Method(alpha=1.0, pretrain=S), 1),
}


class Job(NamedTuple):
    data: str
    cell: str  # "baseline" or a cell name
    steps: int
    seed: int


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", name).strip("_")


def run_path(out: Path, job: Job) -> Path:
    return Path(out) / "runs" / slug(job.data) / f"{slug(job.cell)}@{job.steps}" / f"seed{job.seed}.json"


def baseline_of(cell: str) -> str:
    """The baseline a cell compares with: "baseline", or "baseline-pretrain<N>" for a pre-trained cell."""
    n = {**CELLS, **DIAGNOSTICS}[cell][0].pretrain
    return f"baseline-pretrain{n}" if n else "baseline"


def method_of(cell: str) -> sb.Method:
    if cell.startswith("baseline"):
        n = cell[len("baseline-pretrain"):] if cell.startswith("baseline-pretrain") else "0"
        return replace(sb.BASELINE, pretrain=int(n))
    return {**CELLS, **DIAGNOSTICS}[cell][0]


def grid_jobs(data: str, cells: Sequence[str], seeds: Sequence[int], short: int) -> List[Job]:
    """The DropClass runs of `cells` and the baselines they compare with (one per length), deduplicated."""
    table = {**CELLS, **DIAGNOSTICS}
    jobs = []
    for cell in cells:
        steps = table[cell][1] * short
        jobs += [Job(data, baseline_of(cell), steps, s) for s in seeds] + [Job(data, cell, steps, s) for s in seeds]
    return list(dict.fromkeys(jobs))


# ----------------------------------------------------------------------------- running

def _worker_init() -> None:
    import torch
    torch.set_num_threads(1)


def _run_job(job: Job, out: str, device: str, overrides: Dict) -> str:
    """Train one run and write its JSON atomically (a half-written file never counts as done)."""
    cfg = replace(DATA[job.data], **overrides)
    res = sb.train_run(cfg, method_of(job.cell), job.seed, job.steps, device=device)
    res.update(data=job.data, cell=job.cell)
    path = run_path(Path(out), job)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, path)
    return str(path)


def run_jobs(jobs: Sequence[Job], out: Path, *, n_jobs: int = 1, device: str = "cpu", overrides: Optional[Dict] = None,
             progress_bar: bool = True) -> List[Job]:
    """Run the jobs whose file is missing; returns the jobs run. A progress bar counts runs."""
    from tqdm.auto import tqdm
    overrides = overrides or {}
    todo = [j for j in jobs if not run_path(out, j).exists()]
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="runs", unit="run", disable=not progress_bar,
               file=sys.stderr, dynamic_ncols=True)
    if n_jobs <= 1 or device != "cpu":
        for job in todo:
            bar.set_postfix_str(f"{job.cell}@{job.steps} seed {job.seed}", refresh=False)
            _run_job(job, str(out), device, overrides)
            bar.update(1)
    else:
        import multiprocessing as mp
        with ProcessPoolExecutor(n_jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init) as ex:
            futures = {ex.submit(_run_job, job, str(out), device, overrides): job for job in todo}
            for fut in as_completed(futures):
                fut.result()  # a failed run stops the grid with its error
                job = futures[fut]
                bar.set_postfix_str(f"{job.cell}@{job.steps} seed {job.seed}", refresh=False)
                bar.update(1)
    bar.close()
    return todo


# ----------------------------------------------------------------------------- CLI

def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m study.bias_grid", description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=("calibrate", "grid", "report"))
    ap.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 per cell (default 5)")
    ap.add_argument("--steps", type=int, default=S, help=f"the short length S (default {S})")
    ap.add_argument("--data", default=CHOSEN, help=f"data setting of the grid (default {CHOSEN!r}): {', '.join(DATA)}")
    ap.add_argument("--cells", nargs="+", default=None, help="grid cells to run (default: all of CELLS)")
    ap.add_argument("--diagnostics", action="store_true", help="also run the diagnostic cells")
    ap.add_argument("--jobs", type=int, default=1, help="parallel runs (CPU; one thread each)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (the fused kernels; runs one at a time)")
    ap.add_argument("--n-train", type=int, default=None, help="override the training-set size (smoke runs)")
    ap.add_argument("--n-test", type=int, default=None, help="override the test-split size (smoke runs)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: Optional[List[str]] = None) -> Dict:
    from study import bias_report as br

    args = parser().parse_args(argv)
    if args.data not in DATA:
        raise SystemExit(f"--data must be one of {', '.join(DATA)}, got {args.data!r}")
    unknown = [c for c in args.cells or () if c not in CELLS and c not in DIAGNOSTICS]
    if unknown:
        raise SystemExit(f"unknown cells {unknown}; the grid's cells: {', '.join(CELLS)}; "
                         f"diagnostics: {', '.join(DIAGNOSTICS)}")
    seeds = list(range(args.seeds))
    overrides = {k: v for k, v in (("n_train", args.n_train), ("n_test", args.n_test)) if v is not None}
    run = dict(n_jobs=args.jobs, device=args.device, overrides=overrides, progress_bar=not args.no_progress)
    cells = list(args.cells or CELLS) + (list(DIAGNOSTICS) if args.diagnostics else [])
    if args.what == "calibrate":
        run_jobs([Job(d, "baseline", args.steps, s) for d in DATA for s in seeds], args.out, **run)
        run_jobs([Job(d, "baseline", 3 * args.steps, s) for d in GRID_DATA for s in seeds], args.out, **run)
    elif args.what == "grid":
        run_jobs(grid_jobs(args.data, cells, seeds, args.steps), args.out, **run)
    data = [args.data] if args.what == "grid" else list(dict.fromkeys((args.data,) + GRID_DATA))
    report = br.write_reports(args.out, data=data, seeds=seeds, short=args.steps)
    print(report["text"])
    return report


if __name__ == "__main__":
    main()
