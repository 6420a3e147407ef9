"""Statistics, tables and plots of study/bias_grid.py's runs.

Every DropClass cell is compared with the baseline of the same length on the
same seeds (same data, initial weights and batches), so the comparison is
paired: d_s = metric(DropClass, seed s) − metric(baseline, seed s), and the 95%
interval is the paired t interval mean(d) ± t_{0.975, n−1} · sd(d) / √n
(scipy's t quantile). Verdict by that interval: **helps** (entirely above 0),
**hurts** (entirely below 0), **inconclusive** (it covers 0).

Metrics (points, 0-100): the rare class's (rider) IoU and the mIoU over the K
classes, on the ordinary and the conflicting split; the class overlap of the
classifier's weight (``debias_ops.class_overlap``, k = C // 4, 0-1).
Writes <out>/calibration.{md,json} and, per grid data setting D,
<out>/grid_D.{md,json}, <out>/grid_D_delta_rider.png and <out>/grid_D_overlap_seed0.png.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from debias_ops.recipe.loop import mean_iou
from debias_ops.recipe.plots import pyplot
from study import bias_grid as bg
from study import synthetic_bias as sb

METRICS = {
    "rider_conflicting": lambda r: 100 * r["iou"]["conflicting"][sb.RARE],
    "rider_ordinary": lambda r: 100 * r["iou"]["ordinary"][sb.RARE],
    "miou_conflicting": lambda r: 100 * mean_iou(r["iou"]["conflicting"]),
    "miou_ordinary": lambda r: 100 * mean_iou(r["iou"]["ordinary"]),
    "overlap": lambda r: r["overlap"]["mean"],
}


# ----------------------------------------------------------------------------- statistics

def paired_interval(diffs: Sequence[float], level: float = 0.95) -> Dict:
    """mean, the paired t interval (lo, hi) and the verdict of per-seed differences."""
    from scipy import stats
    d = np.asarray(diffs, dtype=np.float64)
    n = len(d)
    mean = float(d.mean()) if n else float("nan")
    if n < 2:
        lo = hi = float("nan")
    else:
        half = float(stats.t.ppf(0.5 + level / 2, n - 1) * d.std(ddof=1) / np.sqrt(n))
        lo, hi = mean - half, mean + half
    return {"mean": mean, "lo": lo, "hi": hi, "n": n, "verdict": verdict(lo, hi)}


def verdict(lo: float, hi: float) -> str:
    if np.isfinite(lo) and lo > 0:
        return "helps"
    if np.isfinite(hi) and hi < 0:
        return "hurts"
    return "inconclusive"


def _fmt(iv: Dict, digits: int = 1) -> str:
    f = f"{{:+.{digits}f}}"
    return f"{f.format(iv['mean'])} [{f.format(iv['lo'])}, {f.format(iv['hi'])}]"


# ----------------------------------------------------------------------------- loading

def load_runs(out: Path, data: str, cell: str, steps: int, seeds: Sequence[int]) -> Optional[List[Dict]]:
    """The runs of one cell on `seeds`, or None if any is missing."""
    runs = []
    for s in seeds:
        path = bg.run_path(out, bg.Job(data, cell, steps, s))
        if not path.exists():
            return None
        runs.append(json.loads(path.read_text()))
    return runs


def _versions(runs: List[Dict]) -> Dict:
    return runs[0].get("versions", {}) | {"device": runs[0].get("device")}


# ----------------------------------------------------------------------------- calibration

def calibration(out: Path, seeds: Sequence[int], short: int) -> Optional[Dict]:
    rows = []
    for name in bg.DATA:
        for steps in (short, 3 * short):
            runs = load_runs(out, name, "baseline", steps, seeds)
            if runs is None:
                continue
            ordv = [METRICS["rider_ordinary"](r) for r in runs]
            conf = [METRICS["rider_conflicting"](r) for r in runs]
            gap = paired_interval(np.subtract(ordv, conf))
            rows.append({"data": name, "steps": steps, "config": runs[0]["config"],
                         "rider_ordinary": float(np.mean(ordv)), "rider_conflicting": float(np.mean(conf)),
                         "gap": gap, "miou_ordinary": float(np.mean([METRICS["miou_ordinary"](r) for r in runs])),
                         "qualifies": bool(np.mean(ordv) >= 60 and gap["mean"] >= 20), "versions": _versions(runs)})
    if not rows:
        return None
    first = {ctx: next((r["data"] for r in rows if r["steps"] == short and r["qualifies"]
                        and r["config"]["context"] == ctx), None) for ctx in ("road", "bicycle")}
    lines = [f"# Calibration: the baseline alone (plain CE), seeds {list(seeds)}",
             "",
             "Qualifies: rider IoU ≥ 60 on the ordinary split and ≥ 20 points lower on the conflicting one "
             "(means over seeds). Rule: the grid uses the first qualifying setting at S steps, in this order.",
             "",
             "| data | steps | rider, ordinary | rider, conflicting | gap [95% CI] | mIoU, ordinary | qualifies |",
             "|---|---:|---:|---:|---|---:|---|"]
    for r in rows:
        lines.append(f"| {r['data']} | {r['steps']} | {r['rider_ordinary']:.1f} | {r['rider_conflicting']:.1f} | "
                     f"{_fmt(r['gap'])} | {r['miou_ordinary']:.1f} | {'yes' if r['qualifies'] else 'no'} |")
    lines += ["", f"First qualifying setting: **{first['road']}** (road context), **{first['bicycle']}** "
              f"(bicycle context); the grid runs on `CHOSEN = {bg.CHOSEN!r}` and `SECOND = {bg.SECOND!r}`."]
    for ctx, mine in (("road", bg.CHOSEN), ("bicycle", bg.SECOND)):
        if first[ctx] is not None and first[ctx] != mine:
            lines.append(f"WARNING: {mine} is not the rule's pick for the {ctx} context ({first[ctx]}).")
    v = rows[0]["versions"]
    lines.append(f"\ndevice {v.get('device')}, torch {v.get('torch')}, Triton {v.get('triton')}")
    return {"rows": rows, "first_qualifying": first, "grid_data": list(bg.GRID_DATA), "text": "\n".join(lines)}


# ----------------------------------------------------------------------------- grid

def _compare(base: List[Dict], drop: List[Dict]) -> Dict:
    out = {}
    for key, f in METRICS.items():
        b = [f(r) for r in base]
        d = [f(r) for r in drop]
        out[key] = paired_interval(np.subtract(d, b)) | {"baseline": float(np.mean(b)), "dropclass": float(np.mean(d))}
    # diagnostic: the DropClass model's rider IoU through the plain path (no selector) minus its own inference path
    plain = [100 * r["iou_plain"]["conflicting"][sb.RARE] - METRICS["rider_conflicting"](r) for r in drop]
    out["plain_minus_selector_rider_conflicting"] = paired_interval(plain)
    out["sup_curve"] = np.mean([r["curves"]["sup"] for r in drop], axis=0).tolist()
    return out


def grid(out: Path, data: str, seeds: Sequence[int], short: int) -> Optional[Dict]:
    cells = []
    for group, table in (("grid", bg.CELLS), ("diagnostic", bg.DIAGNOSTICS)):
        for name, (_method, mult) in table.items():
            steps = mult * short
            base = load_runs(out, data, bg.baseline_of(name), steps, seeds)
            drop = load_runs(out, data, name, steps, seeds)
            if base is None or drop is None:
                continue
            cells.append({"cell": name, "group": group, "steps": steps, "method": drop[0]["method"],
                          "versions": _versions(drop), **_compare(base, drop)})
    if not cells:
        return None
    lines = [f"# DropClass vs the baseline on data {data!r}, seeds {list(seeds)}, S = {short}",
             "",
             "Δ = DropClass − baseline, paired over seeds, mean [95% t interval], IoU points; "
             "overlap Δ in Jaccard units (0-1).",
             "",
             "| cell | steps | rider, conflicting | verdict | rider, ordinary | verdict | mIoU, conflicting "
             "| mIoU, ordinary | overlap Δ |",
             "|---|---:|---|---|---|---|---|---|---|"]
    for c in cells:
        name = c["cell"] if c["group"] == "grid" else f"*{c['cell']}*"
        lines.append(f"| {name} | {c['steps']} | {_fmt(c['rider_conflicting'])} | {c['rider_conflicting']['verdict']} "
                     f"| {_fmt(c['rider_ordinary'])} | {c['rider_ordinary']['verdict']} "
                     f"| {_fmt(c['miou_conflicting'])} | {_fmt(c['miou_ordinary'])} | {_fmt(c['overlap'], 3)} |")
    lines += ["", "Baseline means (rider IoU, conflicting / ordinary; overlap): " + "; ".join(
        sorted({f"{c['steps']} steps: {c['rider_conflicting']['baseline']:.1f} / {c['rider_ordinary']['baseline']:.1f}; "
                f"{c['overlap']['baseline']:.3f}" for c in cells})),
              "",
              "Diagnostics per cell: rider IoU (conflicting) through the plain path classifier(feats) minus the "
              "inference path (selector), and the suppression term at the start / middle / end of training:",
              ""]
    for c in cells:
        sup = c["sup_curve"]
        mid = sup[len(sup) // 2] if sup else float("nan")
        lines.append(f"- {c['cell']}: plain − selector {_fmt(c['plain_minus_selector_rider_conflicting'])}; "
                     f"sup {sup[0]:.3f} / {mid:.3f} / {sup[-1]:.3f}" if sup else f"- {c['cell']}: no curve")
    v = cells[0]["versions"]
    lines.append(f"\ndevice {v.get('device')}, torch {v.get('torch')}, Triton {v.get('triton')}")
    return {"data": data, "seeds": list(seeds), "short": short, "cells": cells, "text": "\n".join(lines)}


# ----------------------------------------------------------------------------- plots

def plot_deltas(report: Dict, path: Path) -> None:
    """Δ rider IoU per cell with its 95% interval, both splits."""
    plt = pyplot()
    cells = report["cells"]
    y = np.arange(len(cells))
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(cells) + 1.4))
    for off, key, colour, label in ((-0.15, "rider_conflicting", "tab:red", "conflicting split"),
                                    (0.15, "rider_ordinary", "tab:blue", "ordinary split")):
        m = np.array([c[key]["mean"] for c in cells])
        err = np.array([[c[key]["mean"] - c[key]["lo"], c[key]["hi"] - c[key]["mean"]] for c in cells]).T
        ax.errorbar(m, y + off, xerr=np.nan_to_num(err), fmt="o", color=colour, capsize=3, label=label)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(y)
    ax.set_yticklabels([f"{c['cell']} ({c['steps']})" for c in cells])
    ax.invert_yaxis()
    ax.set_xlabel("Δ rider IoU, DropClass − baseline (points; mean, 95% paired t interval)")
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title(f"data {report['data']}, {len(report['seeds'])} seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_overlap(out: Path, data: str, short: int, path: Path, seed: int = 0, cell: str = "central") -> bool:
    """The K×K class overlap of the baseline and of one DropClass cell, one seed."""
    steps = bg.CELLS[cell][1] * short
    runs = [load_runs(out, data, c, steps, [seed]) for c in ("baseline", cell)]
    if any(r is None for r in runs):
        return False
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8.8, 4.0))
    for ax, (title, rr) in zip(axes, (("baseline", runs[0][0]), (f"DropClass ({cell})", runs[1][0]))):
        m = np.array(rr["overlap"]["matrix"])
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
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

def write_reports(out: Path, *, data: Sequence[str], seeds: Sequence[int], short: int) -> Dict:
    """The calibration report and the grid report of each data setting in `data` (where their runs exist)."""
    out = Path(out)
    texts, result = [], {"grids": {}}
    cal = calibration(out, seeds, short)
    if cal is not None:
        (out / "calibration.md").write_text(cal["text"] + "\n")
        (out / "calibration.json").write_text(json.dumps({k: v for k, v in cal.items() if k != "text"}, indent=1))
        texts.append(cal["text"])
        result["calibration"] = cal
    for d in data:
        rep = grid(out, d, seeds, short)
        if rep is None:
            continue
        stem = f"grid_{bg.slug(d)}"
        (out / f"{stem}.md").write_text(rep["text"] + "\n")
        (out / f"{stem}.json").write_text(json.dumps({k: v for k, v in rep.items() if k != "text"}, indent=1))
        plot_deltas(rep, out / f"{stem}_delta_rider.png")
        plot_overlap(out, d, short, out / f"{stem}_overlap_seed{seeds[0]}.png", seed=seeds[0])
        texts.append(rep["text"])
        result["grids"][d] = rep
    result["text"] = "\n\n".join(texts) if texts else f"no runs in {out}"
    return result
