"""PNGs of a run's training curves and per-class IoU; several runs (baseline vs DropClass) side by side.

    python -m debias_ops.recipe plot --runs runs/base runs/dc [--out runs/compare]

Reads each run's log.json (written by the recipe); writes curves.png and iou.png, and with
``--context-stats`` runs context_iou.png and context_adjacency.png.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from debias_ops.context import VIEWS, ContextStatistics

from . import bias


def load_run(run_dir) -> Dict:
    path = Path(run_dir) / "log.json"
    if not path.is_file():
        raise FileNotFoundError(f"no log.json in {str(run_dir)!r}: pass a folder written by python -m debias_ops.recipe")
    from .runtime import read_log
    return read_log(path)


def run_label(log: Dict, run_dir) -> str:
    cfg = log.get("config", {})
    kind = "DropClass" if cfg.get("dropclass") else "baseline"
    return f"{kind} ({Path(run_dir).name})"


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _smooth(y: np.ndarray, n: int) -> np.ndarray:
    if n <= 1 or len(y) < n:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    head = c[1:n] / np.arange(1, n)
    return np.concatenate([head, (c[n:] - c[:-n]) / n])


def plot_curves(logs: Sequence[Dict], labels: Sequence[str], path: Path) -> None:
    """Loss, CE, suppression term, learning rate and mIoU against the step."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for log, label in zip(logs, labels):
        rows = log["train"]
        if rows:
            step = np.array([r["step"] for r in rows])
            n = max(1, len(rows) // 50)
            for ax, key in zip(axes[:2], ("loss", "sup")):
                ax.plot(step, _smooth(np.array([r[key] for r in rows], dtype=float), n), label=label)
            axes[2].plot(step, [r["lr"] for r in rows], label=label)
        ev = log["eval"]
        if ev:
            axes[3].plot([e["step"] for e in ev], [100 * e["miou"] for e in ev], "o-", label=label)
    for ax, title in zip(axes, ("training loss (smoothed)", "suppression term", "learning rate", "val mIoU (%)")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_iou(logs: Sequence[Dict], labels: Sequence[str], path: Path) -> None:
    """Per-class IoU of each run's last evaluation, grouped bars (mIoU in the legend)."""
    plt = pyplot()
    classes = logs[0]["classes"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(classes) * max(1, len(logs))), 3.8))
    x = np.arange(len(classes))
    width = 0.8 / len(logs)
    for i, (log, label) in enumerate(zip(logs, labels)):
        if not log["eval"]:
            continue
        last = log["eval"][-1]
        iou = np.array([np.nan if v is None else v for v in last["iou"]], dtype=float)
        ax.bar(x - 0.4 + width * (i + 0.5), 100 * np.nan_to_num(iou), width,
               label=f"{label}: mIoU {100 * last['miou']:.1f} (step {last['step']})")
    ax.set_xticks(x)
    ax.set_xticklabels(classes, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    if any(log["eval"] for log in logs):
        ax.legend(fontsize=8)
    else:
        ax.set_title("no evaluation (--no-val)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_runs(run_dirs: Sequence, out, labels: Optional[List[str]] = None) -> List[Path]:
    """curves.png and iou.png for one run or a comparison of several (same classes)."""
    logs = [load_run(d) for d in run_dirs]
    classes = logs[0]["classes"]
    for d, log in zip(run_dirs, logs):
        if log["classes"] != classes:
            raise ValueError(f"{str(d)!r} has other classes than {str(run_dirs[0])!r}: cannot compare them")
    labels = list(labels) if labels else [run_label(log, d) for log, d in zip(logs, run_dirs)]
    if len(labels) != len(logs):
        raise ValueError(f"{len(labels)} labels for {len(logs)} runs")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "curves.png", out / "iou.png"]
    plot_curves(logs, labels, paths[0])
    plot_iou(logs, labels, paths[1])
    return paths + plot_context(logs, labels, run_dirs, out)


# ----------------------------------------------------------------------------- context plots (--context-stats)


def _values(rows: List[Dict], key: str) -> np.ndarray:
    return np.array([np.nan if r[key] is None else r[key] for r in rows], dtype=float)


def _nanmean(x: np.ndarray) -> float:
    return float(np.mean(x[np.isfinite(x)])) if np.isfinite(x).any() else float("nan")


def plot_context(logs: Sequence[Dict], labels: Sequence[str], run_dirs: Sequence, out) -> List[Path]:
    """context_iou.png (runs with conflict views: each class's IoU on all, conflicting images and
    conflicting pixels, one panel per run, side by side) and context_adjacency.png (the first run
    with a context_stats.pt); nothing when no run has them."""
    out, paths = Path(out), []
    runs = [(label, log["eval"][-1]["conflict"]) for log, label in zip(logs, labels)
            if log.get("eval") and log["eval"][-1].get("conflict")]
    if runs:
        keep = sorted({r["class"] for _, rows in runs for r in rows if r["images_conflict_pixels"]})
        plt = pyplot()
        n = max(1, len(keep))
        fig, axes = plt.subplots(1, len(runs), figsize=(max(4.0, 1.1 * n + 1.5) * len(runs), 3.8), squeeze=False,
                                 sharey=True)
        for ax, (label, rows) in zip(axes[0], runs):
            rows = [rows[c] for c in keep]
            x = np.arange(len(rows))
            for i, (view, name) in enumerate(zip(VIEWS, ("all images", "conflicting images", "conflicting pixels"))):
                v = 100 * _values(rows, f"iou_{view}")
                bars = ax.bar(x - 0.4 + 0.8 / 3 * (i + 0.5), np.nan_to_num(v), 0.8 / 3, label=name,
                              color=("#4c72b0", "#dd8452", "#c44e52")[i])
                ax.bar_label(bars, labels=["n/a" if np.isnan(u) else f"{u:.1f}" for u in v], fontsize=6)
            gaps = [_nanmean(_values(rows, f"gap_{v}")) for v in ("images", "pixels")]
            ax.set_title(f"{label}\nmean gap: images {100 * gaps[0]:.1f}, pixels {100 * gaps[1]:.1f} points",
                         fontsize=9)
            ax.set_xticks(x)
            ax.set_xticklabels([r["name"] for r in rows], rotation=45, ha="right", fontsize=8)
            ax.set_ylim(0, 100)
            ax.grid(axis="y", alpha=0.3)
        axes[0][0].set_ylabel("IoU (%)")
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        paths.append(out / "context_iou.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    for d in run_dirs:
        cached = bias.load_stats(Path(d) / bias.STATS_FILE)
        if cached is not None:
            paths.append(plot_adjacency(cached, out / "context_adjacency.png"))
            break
    return paths


def plot_adjacency(cached: Dict, path: Path) -> Path:
    """Heatmap of boundary_share[a, b] (the fraction of a's boundary pixels that touch b), the
    context pairs of the cached rule boxed."""
    from matplotlib.patches import Rectangle

    counts, classes = cached["counts"], cached["classes"]
    stats = ContextStatistics(int(counts["num_classes"]), int(counts["ignore_index"]))
    stats.load_state_dict(counts)
    res = stats.compute(**cached.get("rule", bias.RULE))
    share = res.boundary_share.numpy()
    K = len(classes)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.42 * K + 2.5), max(4.2, 0.42 * K + 1.5)))
    im = ax.imshow(np.nan_to_num(share), cmap="viridis", vmin=0, vmax=1)
    for a, ctx in enumerate(res.context):
        for b in ctx:
            ax.add_patch(Rectangle((b - 0.5, a - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    if K <= 25:
        for a in range(K):
            for b in range(K):
                if a != b and np.isfinite(share[a, b]) and share[a, b] >= 0.05:
                    ax.text(b, a, f"{share[a, b]:.2f}", ha="center", va="center", fontsize=6,
                            color="black" if share[a, b] > 0.6 else "white")
    ax.set_xticks(range(K))
    ax.set_xticklabels(classes, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(K))
    ax.set_yticklabels(classes, fontsize=7)
    ax.set_xlabel("b (neighbour)")
    ax.set_ylabel("a")
    ax.set_title(f"share of a's boundary touching b ({res.num_images} training label maps);\n"
                 "red: b is a context of a", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> List[Path]:
    ap = argparse.ArgumentParser(prog="python -m debias_ops.recipe plot",
                                 description="Plot training curves and per-class IoU of one or more runs.")
    ap.add_argument("--runs", nargs="+", required=True, help="run folders (each with a log.json)")
    ap.add_argument("--out", default=None, help="output folder (default: the first run's folder for one run, "
                                                "else <first run>/compare)")
    ap.add_argument("--labels", nargs="+", default=None, help="legend labels, one per run")
    args = ap.parse_args(argv)
    out = args.out or (args.runs[0] if len(args.runs) == 1 else str(Path(args.runs[0]) / "compare"))
    paths = plot_runs(args.runs, out, args.labels)
    print("wrote " + ", ".join(str(p) for p in paths))
    return paths
