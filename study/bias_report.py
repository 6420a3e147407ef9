"""Statistics, tables and plots of the study's runs (the settings: study/registry.py).

Every DropClass cell is compared with the baseline on the same seeds (same
data, initial weights and batches), so the comparison is paired:
d_s = metric(DropClass, seed s) − metric(baseline, seed s), n seeds, and the
paired t statistic T = mean(d) / (sd(d) / √n) with n − 1 degrees of freedom.

**Co-primary measures**, each tested over the m cells with Holm's step-down
procedure at family-wise level ``registry.ALPHA`` = 0.05:

* Δ rider IoU on the conflicting split (up is better);
* Δ gap, the gap being the rider's ordinary − conflicting IoU of a run
  (down is better: less bias).

Holm: sort the cells' two-sided p-values p_(1) ≤ … ≤ p_(m); reject while
p_(i) ≤ α / (m − i + 1) and stop at the first that is not. The interval
reported for the cell of rank i is the paired t interval at level
1 − α / (m − i + 1) for the rejected ranks, and at the level of the first
non-rejected rank for it and every rank after it; so an interval excludes 0
exactly when Holm rejects (step-down-consistent intervals). Verdict per
measure: **helps** / **hurts** when the Holm interval lies on the good / bad
side of 0, else **inconclusive**. A cell's overall verdict: **debiases** when
both co-primary measures help, **hurts** when either hurts and none helps,
**mixed** when one helps and the other hurts, else **inconclusive**.

Secondary (unadjusted paired 95 % t intervals): the rider on the ordinary
split, mIoU on both splits, the class overlap of the classifier's weight
(``debias_ops.class_overlap``, k = C // 4, Jaccard 0-1).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from debias_ops.recipe.loop import mean_iou
from debias_ops.recipe.plots import pyplot
from study import registry as rg
from study import synthetic_bias as sb
from study.registry import Job


def _rider(r: Dict, path: str, split: str) -> float:
    return 100 * r[path][split][sb.RARE]


def metric(r: Dict, key: str, path: str = "iou") -> float:
    """One run's measure (IoU points; overlap in Jaccard units) through evaluation path ``path``."""
    if key == "rider_conflicting":
        return _rider(r, path, "conflicting")
    if key == "rider_ordinary":
        return _rider(r, path, "ordinary")
    if key == "gap":
        return _rider(r, path, "ordinary") - _rider(r, path, "conflicting")
    if key in ("miou_conflicting", "miou_ordinary"):
        return 100 * mean_iou(r[path][key.split("_")[1]])
    if key == "overlap":
        return r["overlap"]["mean"]
    raise ValueError(f"metric key must be one of {', '.join(KEYS)}, got {key!r}")


KEYS = ("rider_conflicting", "gap", "rider_ordinary", "miou_conflicting", "miou_ordinary", "overlap")
PRIMARY = {"rider_conflicting": +1, "gap": -1}  # the good direction of each co-primary measure

# ----------------------------------------------------------------------------- statistics


def t_test(diffs: Sequence[float]) -> Dict:
    """mean, sd, n and the two-sided paired t test's p-value of per-seed differences."""
    from scipy import stats
    d = np.asarray(diffs, dtype=np.float64)
    n = len(d)
    mean = float(d.mean()) if n else float("nan")
    sd = float(d.std(ddof=1)) if n > 1 else float("nan")
    if n < 2:
        p = float("nan")
    elif sd == 0:
        p = 1.0 if mean == 0 else 0.0
    else:
        p = float(2 * stats.t.sf(abs(mean) / (sd / np.sqrt(n)), n - 1))
    return {"mean": mean, "sd": sd, "n": n, "p": p}


def paired_interval(diffs: Sequence[float], level: float = 0.95, good: int = +1) -> Dict:
    """mean, the paired t interval (lo, hi) at ``level``, the p-value and the verdict (``good``: +1 / -1)."""
    from scipy import stats
    res = t_test(diffs)
    if res["n"] < 2:
        lo = hi = float("nan")
    else:
        half = float(stats.t.ppf(0.5 + level / 2, res["n"] - 1) * res["sd"] / np.sqrt(res["n"]))
        lo, hi = res["mean"] - half, res["mean"] + half
    return res | {"lo": lo, "hi": hi, "level": level, "verdict": verdict(lo, hi, good)}


def verdict(lo: float, hi: float, good: int = +1) -> str:
    if np.isfinite(lo) and lo > 0:
        return "helps" if good > 0 else "hurts"
    if np.isfinite(hi) and hi < 0:
        return "hurts" if good > 0 else "helps"
    return "inconclusive"


def holm(diffs: Dict[str, Sequence[float]], alpha: float = rg.ALPHA, good: int = +1) -> Dict[str, Dict]:
    """Holm's step-down test over the cells and its consistent intervals (module docstring)."""
    tests = {c: t_test(d) for c, d in diffs.items()}
    order = sorted(tests, key=lambda c: (np.nan_to_num(tests[c]["p"], nan=2.0), c))
    m = len(order)
    out, stop, p_adj = {}, None, 0.0
    for i, c in enumerate(order):
        a = alpha / (m - i)
        if stop is None and not tests[c]["p"] <= a:
            stop = a
        p_adj = max(p_adj, min(1.0, (m - i) * np.nan_to_num(tests[c]["p"], nan=1.0)))
        out[c] = paired_interval(diffs[c], 1 - (a if stop is None else stop), good) | {"p_holm": float(p_adj)}
    return out


def overall(v_rider: str, v_gap: str) -> str:
    vs = {v_rider, v_gap}
    if vs == {"helps"}:
        return "debiases"
    if vs == {"helps", "hurts"}:
        return "mixed"
    return "hurts" if "hurts" in vs else "inconclusive"


def _fmt(iv: Dict, digits: int = 1) -> str:
    f = f"{{:+.{digits}f}}"
    return f"{f.format(iv['mean'])} [{f.format(iv['lo'])}, {f.format(iv['hi'])}]"


# ----------------------------------------------------------------------------- loading

def load_runs(out: Path, jobs: Sequence[Job], overrides: Optional[Dict] = None, device: str = "cpu"
              ) -> Optional[List[Dict]]:
    """The runs of `jobs`, or None if any is missing."""
    paths = [rg.run_path(out, j, overrides, device) for j in jobs]
    if not all(p.exists() for p in paths):
        return None
    return [json.loads(p.read_text()) for p in paths]


def _cpu(run: Dict) -> float:
    """A run's CPU time; its wall time where no CPU time was recorded (an upper bound on a shared machine)."""
    return run.get("cpu_s", run["total_s"])


def _versions(runs: List[Dict]) -> Dict:
    return runs[0].get("versions", {}) | {"device": runs[0].get("device")}


# ----------------------------------------------------------------------------- calibration

def calibration_row(out: Path, data: str, L: int, seeds: Sequence[int], overrides: Optional[Dict] = None,
                    device: str = "cpu") -> Optional[Dict]:
    """The rule's numbers for candidate (data, L) (registry docstring), or None if a run is missing."""
    runs = {n: load_runs(out, [Job(data, "baseline", n, s) for s in seeds], overrides, device) for n in (L, 2 * L)}
    if any(r is None for r in runs.values()):
        return None
    row = {"data": data, "L": L, "seeds": list(seeds), "config": runs[L][0]["config"]}
    for n, tag in ((L, "at_L"), (2 * L, "at_2L")):
        row[tag] = {k: float(np.mean([metric(r, k) for r in runs[n]])) for k in KEYS}
        row[tag]["gap_interval"] = paired_interval([metric(r, "gap") for r in runs[n]])
        row[tag]["cpu_s"] = float(sum(_cpu(r) for r in runs[n]))
        row[tag]["wall_s"] = float(sum(r["total_s"] for r in runs[n]))
    row["plateau_change"] = paired_interval([metric(b, "rider_ordinary") - metric(a, "rider_ordinary")
                                             for a, b in zip(runs[L], runs[2 * L])])
    checks = {f"ordinary rider IoU at L >= {rg.MIN_ORDINARY:g}": row["at_L"]["rider_ordinary"] >= rg.MIN_ORDINARY,
              f"abs(change 2L - L) < {rg.PLATEAU:g}": abs(row["plateau_change"]["mean"]) < rg.PLATEAU,
              f"gap at L >= {rg.MIN_GAP:g}": row["at_L"]["gap"] >= rg.MIN_GAP,
              f"gap at 2L >= {rg.MIN_GAP:g}": row["at_2L"]["gap"] >= rg.MIN_GAP}
    row["checks"] = checks
    row["qualifies"] = all(checks.values())
    row["why"] = "all checks pass" if row["qualifies"] else "fails: " + "; ".join(k for k, v in checks.items() if not v)
    row["versions"] = _versions(runs[L])
    return row


def calibration(out: Path, seeds: Sequence[int], candidates: Sequence[tuple], chosen: Optional[tuple],
                overrides: Optional[Dict] = None, device: str = "cpu") -> Optional[Dict]:
    rows = [r for r in (calibration_row(out, d, L, seeds, overrides, device) for d, L in candidates) if r is not None]
    if not rows:
        return None
    first = next(((r["data"], r["L"]) for r in rows if r["qualifies"]), None)
    lines = [f"# Calibration: the baseline alone (plain CE), seeds {list(seeds)}", "",
             f"Rule (study/registry.py, fixed before the first run): a candidate (data, L) qualifies when, means over "
             f"the seeds, the rider's ordinary IoU at L is ≥ {rg.MIN_ORDINARY:g}, it changes by less than "
             f"{rg.PLATEAU:g} points from L to 2L steps (plateau), and the gap (ordinary − conflicting rider IoU) is "
             f"≥ {rg.MIN_GAP:g} points at L and at 2L. The grid uses the first qualifying candidate in the registry's "
             "order; the calibration stops there.", "",
             "| data | L | rider ord. L | rider conf. L | gap L [95% CI] | rider ord. 2L | rider conf. 2L "
             "| gap 2L [95% CI] | change ord. 2L − L [95% CI] | mIoU ord. L | qualifies |",
             "|---|---:|---:|---:|---|---:|---:|---|---|---:|---|"]
    for r in rows:
        a, b = r["at_L"], r["at_2L"]
        lines.append(f"| {r['data']} | {r['L']} | {a['rider_ordinary']:.1f} | {a['rider_conflicting']:.1f} | "
                     f"{_fmt(a['gap_interval'])} | {b['rider_ordinary']:.1f} | {b['rider_conflicting']:.1f} | "
                     f"{_fmt(b['gap_interval'])} | {_fmt(r['plateau_change'])} | {a['miou_ordinary']:.1f} | "
                     f"{'yes' if r['qualifies'] else 'no: ' + r['why'][len('fails: '):]} |")
    lines += ["", f"First qualifying candidate: **{first}**; the grid runs on `registry.CHOSEN = {chosen!r}`."]
    if first is not None and chosen is not None and tuple(chosen) != first:
        lines.append(f"WARNING: the grid's data {chosen} is not the rule's pick {first}.")
    cpu = sum(r["at_L"]["cpu_s"] + r["at_2L"]["cpu_s"] for r in rows)
    v = rows[0]["versions"]
    lines.append(f"\nCPU time of these runs (one thread each; a run that recorded none counts its wall time): "
                 f"{cpu / 60:.1f} min. "
                 f"device {v.get('device')}, torch {v.get('torch')}, Triton {v.get('triton')}")
    return {"rows": rows, "first_qualifying": first, "chosen": chosen, "cpu_s": cpu, "text": "\n".join(lines)}


# ----------------------------------------------------------------------------- grid

def grid(out: Path, chosen: tuple, seeds: Sequence[int], overrides: Optional[Dict] = None, device: str = "cpu"
         ) -> Optional[Dict]:
    data, steps = chosen
    base = load_runs(out, [Job(data, "baseline", steps, s) for s in seeds], overrides, device)
    if base is None:
        return None
    runs = {c: load_runs(out, [Job(data, m, steps, s) for s in seeds], overrides, device)
            for c, (m, _) in rg.CELLS.items()}
    cells = {c: r for c, r in runs.items() if r is not None}
    if not cells:
        return None
    diffs = {key: {c: [metric(d, key, rg.CELLS[c][1]) - metric(b, key) for d, b in zip(r, base)]
                   for c, r in cells.items()} for key in KEYS}
    adjusted = {key: holm(diffs[key], rg.ALPHA, good) for key, good in PRIMARY.items()}
    rows = []
    for c, r in cells.items():
        path = rg.CELLS[c][1]
        row = {"cell": c, "method": r[0]["method"], "eval_path": path, "steps": steps}
        for key in KEYS:
            iv = adjusted[key][c] if key in PRIMARY else paired_interval(diffs[key][c], 0.95, -1 if key == "overlap"
                                                                         else +1)
            row[key] = iv | {"baseline": float(np.mean([metric(b, key) for b in base])),
                             "dropclass": float(np.mean([metric(d, key, path) for d in r]))}
        row["verdict"] = overall(row["rider_conflicting"]["verdict"], row["gap"]["verdict"])
        row["plain_minus_eval_rider_conflicting"] = paired_interval(
            [_rider(d, "iou_plain", "conflicting") - _rider(d, path, "conflicting") for d in r])
        row["recal_minus_own_rider_conflicting"] = paired_interval(
            [_rider(d, "iou_recal", "conflicting") - _rider(d, "iou", "conflicting") for d in r])
        row["sup_curve"] = np.mean([d["curves"]["sup"] for d in r], axis=0).tolist()
        row["versions"] = _versions(r)
        rows.append(row)
    cpu = sum(_cpu(x) for x in base) + sum(
        _cpu(x) for m in {rg.CELLS[c][0]: r for c, r in cells.items()}.values() for x in m)
    wall = sum(x["total_s"] for x in base) + sum(
        x["total_s"] for m in {rg.CELLS[c][0]: r for c, r in cells.items()}.values() for x in m)
    b0 = rows[0]
    lines = [f"# DropClass vs the baseline on data {data!r}, L = {steps} steps, seeds {list(seeds)}", "",
             "Δ = DropClass − baseline, paired over seeds, mean [interval], IoU points. Co-primary measures "
             f"(rider IoU on the conflicting split; gap = rider ordinary − conflicting): Holm-consistent intervals over "
             f"{len(rows)} cells at family-wise level {rg.ALPHA:g} (study/bias_report.py). Secondary: unadjusted 95% "
             "paired t intervals; overlap Δ in Jaccard units.", "",
             "| cell | Δ rider, conflicting [Holm] | verdict | Δ gap [Holm] | verdict | overall | Δ rider, ordinary "
             "| Δ mIoU, conflicting | Δ mIoU, ordinary | Δ overlap |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['cell']} | {_fmt(r['rider_conflicting'])} | {r['rider_conflicting']['verdict']} | "
                     f"{_fmt(r['gap'])} | {r['gap']['verdict']} | **{r['verdict']}** | {_fmt(r['rider_ordinary'])} | "
                     f"{_fmt(r['miou_conflicting'])} | {_fmt(r['miou_ordinary'])} | {_fmt(r['overlap'], 3)} |")
    lines += ["", f"Baseline means: rider IoU conflicting {b0['rider_conflicting']['baseline']:.1f}, ordinary "
              f"{b0['rider_ordinary']['baseline']:.1f}, gap {b0['gap']['baseline']:.1f}; mIoU conflicting "
              f"{b0['miou_conflicting']['baseline']:.1f}, ordinary {b0['miou_ordinary']['baseline']:.1f}; overlap "
              f"{b0['overlap']['baseline']:.3f} (chance {base[0]['overlap']['chance']:.3f}).",
              "", "Holm details (co-primary): " + "; ".join(
                  f"{r['cell']}: p = {r['rider_conflicting']['p']:.3g} / {r['gap']['p']:.3g}, Holm-adjusted "
                  f"{r['rider_conflicting']['p_holm']:.3g} / {r['gap']['p_holm']:.3g}" for r in rows),
              "", "Diagnostics per cell (unadjusted 95%): rider IoU (conflicting) through the plain path "
              "classifier(feats) minus the cell's path; the recalibrated-BN path minus the model's own path; the "
              "suppression term at the start / middle / end of training:", ""]
    for r in rows:
        sup = r["sup_curve"]
        lines.append(f"- {r['cell']}: plain − cell {_fmt(r['plain_minus_eval_rider_conflicting'])}; recalibrated − "
                     f"own {_fmt(r['recal_minus_own_rider_conflicting'])}; sup {sup[0]:.3f} / "
                     f"{sup[len(sup) // 2]:.3f} / {sup[-1]:.3f}")
    v = rows[0]["versions"]
    lines.append(f"\nCPU time of these runs (one thread each): {cpu / 60:.1f} min (their wall times add up to "
                 f"{wall / 60:.1f} min). device {v.get('device')}, torch {v.get('torch')}, Triton {v.get('triton')}")
    return {"data": data, "steps": steps, "seeds": list(seeds), "cells": rows, "cpu_s": cpu, "wall_s": wall,
            "text": "\n".join(lines)}


# ----------------------------------------------------------------------------- plots

def plot_deltas(report: Dict, path: Path) -> None:
    """Δ rider IoU (conflicting) and Δ gap per cell with their Holm intervals."""
    plt = pyplot()
    cells = report["cells"]
    y = np.arange(len(cells))
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.5 * len(cells) + 1.6), sharey=True)
    for ax, key, colour, label in ((axes[0], "rider_conflicting", "tab:red", "Δ rider IoU, conflicting (up: better)"),
                                   (axes[1], "gap", "tab:purple", "Δ gap, ordinary − conflicting (down: better)")):
        m = np.array([c[key]["mean"] for c in cells])
        err = np.array([[c[key]["mean"] - c[key]["lo"], c[key]["hi"] - c[key]["mean"]] for c in cells]).T
        ax.errorbar(m, y, xerr=np.nan_to_num(err), fmt="o", color=colour, capsize=3)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_xlabel(label + "\n(points; mean, Holm interval)", fontsize=8)
    axes[0].set_yticks(y)
    axes[0].set_yticklabels([c["cell"] for c in cells])
    axes[0].invert_yaxis()
    fig.suptitle(f"DropClass − baseline, data {report['data']}, L = {report['steps']}, {len(report['seeds'])} seeds",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_overlap(out: Path, chosen: tuple, path: Path, seed: int, overrides: Optional[Dict] = None,
                 device: str = "cpu", cell: str = "paper") -> bool:
    """The K×K class overlap of the baseline and of one DropClass cell, one seed."""
    data, steps = chosen
    runs = [load_runs(out, [Job(data, m, steps, seed)], overrides, device) for m in ("baseline", rg.CELLS[cell][0])]
    if any(r is None for r in runs):
        return False
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8.8, 4.0))
    for ax, (title, rr) in zip(axes, (("baseline", runs[0][0]), (f"DropClass ({cell})", runs[1][0]))):
        im = ax.imshow(np.array(rr["overlap"]["matrix"]), vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(sb.K))
        ax.set_yticks(range(sb.K))
        ax.set_xticklabels(sb.CLASSES, rotation=45, ha="right", fontsize=8)
        ax.set_yticklabels(sb.CLASSES if ax is axes[0] else [], fontsize=8)
        ax.set_title(f"{title}: mean {rr['overlap']['mean']:.3f}", fontsize=9)
    fig.colorbar(im, ax=axes, shrink=0.8, label="Jaccard overlap of top-k channels")
    fig.suptitle(f"class overlap of the classifier weight, seed {seed}, {steps} steps", fontsize=10)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- all of it

def write_reports(out: Path, *, cal_seeds: Sequence[int], candidates: Sequence[tuple], chosen: Optional[tuple],
                  grid_seeds: Sequence[int], overrides: Optional[Dict] = None, device: str = "cpu") -> Dict:
    """calibration.{md,json} and, when the grid's runs exist, grid.{md,json}, grid_delta.png, grid_overlap_seed*.png."""
    out = Path(out)
    texts, result = [], {}
    cal = calibration(out, cal_seeds, candidates, chosen, overrides, device)
    if cal is not None:
        (out / "calibration.md").write_text(cal["text"] + "\n")
        (out / "calibration.json").write_text(json.dumps({k: v for k, v in cal.items() if k != "text"}, indent=1))
        texts.append(cal["text"])
        result["calibration"] = cal
    rep = grid(out, chosen, grid_seeds, overrides, device) if chosen is not None else None
    if rep is not None:
        (out / "grid.md").write_text(rep["text"] + "\n")
        (out / "grid.json").write_text(json.dumps({k: v for k, v in rep.items() if k != "text"}, indent=1))
        plot_deltas(rep, out / "grid_delta.png")
        plot_overlap(out, chosen, out / f"grid_overlap_seed{grid_seeds[0]}.png", grid_seeds[0], overrides, device)
        texts.append(rep["text"])
        result["grid"] = rep
    result["text"] = "\n\n".join(texts) if texts else f"no runs in {out}"
    return result
