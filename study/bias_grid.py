"""Does DropClass debias? The runner of the calibration and the registered grid (study/README.md).

    python -m study.bias_grid calibrate --jobs 2   # baseline only, seeds 100-102: pick the data and L
    python -m study.bias_grid grid --jobs 2        # the registered grid on the pick, seeds 0-14
    python -m study.bias_grid report               # tables and plots from the runs on disk
    python -m study.bias_grid grid --device cuda --out /tmp/gpu   # the same grid through the fused kernels

The settings (the calibration rule, the candidates, the cells, the seeds) are in
``study/registry.py``; the statistics in ``study/bias_report.py``. Runs are
written one JSON file each (``registry.run_path``; the file name hashes every
setting that changes the run): a file already there is not run again (the
commands resume), and a baseline shared by several cells is run once.
``--jobs N`` runs N trainings in parallel processes (one thread each).

The committed results folder (``study/results``, the default ``--out``) is
written only by the commands that reproduce it: the registered seeds, lengths,
data sizes and the CPU. Any other setting needs an ``--out`` of its own.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from study import bias_report as br
from study import registry as rg
from study import synthetic_bias as sb
from study.registry import Job

# ----------------------------------------------------------------------------- running


def _worker_init() -> None:
    import torch
    torch.set_num_threads(1)


def _run_job(job: Job, out: str, device: str, overrides: Dict) -> str:
    """Train one run and write its JSON atomically (a half-written file never counts as done)."""
    res = sb.train_run(rg.config_of(job.data, overrides), rg.METHODS[job.method], job.seed, job.steps, device=device)
    res.update(data=job.data, method_name=job.method, key=rg.run_key(job, overrides, device))
    path = rg.run_path(Path(out), job, overrides, device)
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
    jobs = list(dict.fromkeys(jobs))
    todo = [j for j in jobs if not rg.run_path(out, j, overrides, device).exists()]
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="runs", unit="run", disable=not progress_bar,
               file=sys.stderr, dynamic_ncols=True, mininterval=5.0)
    if n_jobs <= 1 or device != "cpu":
        for job in todo:
            bar.set_postfix_str(f"{job.method}@{job.steps} seed {job.seed}", refresh=False)
            _run_job(job, str(out), device, overrides)
            bar.update(1)
    else:
        import multiprocessing as mp
        with ProcessPoolExecutor(n_jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init) as ex:
            futures = {ex.submit(_run_job, job, str(out), device, overrides): job for job in todo}
            for fut in as_completed(futures):
                fut.result()  # a failed run stops the command with its error
                job = futures[fut]
                bar.set_postfix_str(f"{job.method}@{job.steps} seed {job.seed}", refresh=False)
                bar.update(1)
    bar.close()
    return todo


def grid_jobs(data: str, cells: Sequence[str], seeds: Sequence[int], steps: int) -> List[Job]:
    """The DropClass runs of `cells` and the baseline they compare with, deduplicated (cells may share runs).

    Seed by seed (every method of seed 0, then of seed 1, ...): a grid stopped part-way holds complete pairs.
    """
    methods = ["baseline"] + [rg.CELLS[c][0] for c in cells]
    return list(dict.fromkeys(Job(data, m, steps, s) for s in seeds for m in methods))


def calibrate(out: Path, seeds: Sequence[int], candidates: Sequence[tuple], run: Dict) -> Optional[tuple]:
    """Train the baseline on the candidates in order, stopping at the first that qualifies; returns it."""
    for data, L in candidates:
        run_jobs([Job(data, "baseline", n, s) for n in (L, 2 * L) for s in seeds], out, **run)
        row = br.calibration_row(out, data, L, seeds, run["overrides"], run["device"])
        print(f"calibration: {data} L={L}: qualifies={row['qualifies']} ({row['why']})", flush=True)
        if row["qualifies"]:
            return data, L
    return None


# ----------------------------------------------------------------------------- CLI

def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m study.bias_grid", description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=("calibrate", "grid", "report"))
    ap.add_argument("--seeds", type=int, default=None,
                    help=f"seeds per cell (grid: 0..N-1, default {len(rg.GRID_SEEDS)}; calibration: "
                         f"{rg.CAL_SEEDS[0]}.., default {len(rg.CAL_SEEDS)})")
    ap.add_argument("--steps", type=int, default=None,
                    help="the length L (grid: default the calibration's pick; calibrate: replaces the candidates' L)")
    ap.add_argument("--data", default=None, help=f"data setting of the grid (default: the calibration's pick): "
                                                 f"{', '.join(rg.DATA)}")
    ap.add_argument("--cells", nargs="+", default=None, help="grid cells to run (default: all of registry.CELLS)")
    ap.add_argument("--jobs", type=int, default=1, help="parallel runs (CPU; one thread each)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (the fused kernels; runs one at a time)")
    ap.add_argument("--n-train", type=int, default=None, help="override the training-set size (smoke runs)")
    ap.add_argument("--n-test", type=int, default=None, help="override the test-split size (smoke runs)")
    ap.add_argument("--out", type=Path, default=rg.RESULTS, help="where runs and reports go (default study/results)")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: Optional[List[str]] = None) -> Dict:
    args = parser().parse_args(argv)
    unknown = [c for c in args.cells or () if c not in rg.CELLS]
    if unknown:
        raise SystemExit(f"unknown cells {unknown}; the grid's cells: {', '.join(rg.CELLS)}")
    if args.data is not None and args.data not in rg.DATA:
        raise SystemExit(f"--data must be one of {', '.join(rg.DATA)}, got {args.data!r}")
    overrides = {k: v for k, v in (("n_train", args.n_train), ("n_test", args.n_test)) if v is not None}
    registered = (not overrides and args.seeds is None and args.steps is None and args.data is None
                  and args.device == "cpu")
    if Path(args.out).resolve() == rg.RESULTS.resolve() and not registered:
        raise SystemExit("study/results holds the registered runs only: with --seeds, --steps, --data, --n-train, "
                         "--n-test or --device, pass an --out of your own")
    run = dict(n_jobs=args.jobs, device=args.device, overrides=overrides, progress_bar=not args.no_progress)
    cal_seeds = rg.CAL_SEEDS if args.seeds is None else tuple(range(rg.CAL_SEEDS[0], rg.CAL_SEEDS[0] + args.seeds))
    grid_seeds = rg.GRID_SEEDS if args.seeds is None else tuple(range(args.seeds))
    candidates = rg.CANDIDATES if args.steps is None else tuple(dict.fromkeys((d, args.steps) for d, _ in
                                                                              rg.CANDIDATES))
    t0 = time.perf_counter()
    if args.what == "calibrate":
        calibrate(args.out, cal_seeds, candidates, run)
    chosen = rg.CHOSEN
    if args.data is not None or args.steps is not None:  # a grid of the caller's choice (its own --out)
        base = chosen or candidates[0]
        chosen = None if args.what == "calibrate" else (args.data or base[0], args.steps or base[1])
    if args.what == "grid":
        if chosen is None:
            raise SystemExit("the grid's data is not registered yet (registry.CHOSEN): run the calibration first, "
                             "or pass --data and --steps (with an --out of your own)")
        run_jobs(grid_jobs(chosen[0], list(args.cells or rg.CELLS), grid_seeds, chosen[1]), args.out, **run)
    wall = time.perf_counter() - t0
    report = br.write_reports(args.out, cal_seeds=cal_seeds, candidates=candidates, chosen=chosen,
                              grid_seeds=grid_seeds, overrides=overrides, device=args.device)
    print(report["text"])
    if args.what != "report":
        print(f"\n{args.what}: {wall / 60:.1f} min wall", flush=True)
    return report


if __name__ == "__main__":
    main()
