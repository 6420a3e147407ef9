"""Does DropClass help a rare class under a co-occurrence bias? A synthetic test.

    python -m examples.synthetic_bias --quick     # one cell (600 steps, alpha=10), 3 seeds, CPU, ~3-4 min
    python -m examples.synthetic_bias             # one cell, longer training
    python -m examples.synthetic_bias --sweep     # GPU: alpha x training length x bias strength

Data (generated in code, deterministic by seed): 32x32 (quick) RGB-like images
with K = 5 classes,

    0 background   dark, noisy
    1 road         frequent: a large red band in ~90% of images
    2 rider        RARE: a small teal square with vertical stripes, in ~25% of
                   images; in training it sits on top of the road with
                   probability `bias` (the co-occurrence bias)
    3 sign         a small teal square with horizontal stripes (same colour as
                   the rider: the stripe direction is the only local cue),
                   in ~25% of images, away from the road with probability `bias`
    4 car          a blue blob, in ~50% of images, anywhere

Two test splits: "ordinary" (the training distribution) and "conflicting",
where the pairing is broken: every rider is away from the road and every sign
sits on the road. A network that learned "teal on the road = rider" fails on
the conflicting split.

Model: a small dilated conv net (features C=32 at half resolution, receptive
field wide enough to see the road next to an object), with either

* the baseline head: a 1x1 classifier trained with plain cross-entropy
  (``debias_ops.dropclass_loss`` with lam=1, nothing dropped), or
* ``debias_ops.DropClassHead`` (importance="weight", the paper's method),
  trained with progress t = step/steps (p = t, lam = 1 - t).

Both start from the same seed and see the same batches for the same number of
steps. Per-class IoU is measured on both test splits, over several seeds, and
printed as mean +- std over seeds. A cell's verdict for the rare class
(rider, conflicting split): "helps" if the mean IoU gain exceeds the larger of
the two seed standard deviations, "hurts" if the mean loss does, else
"within spread".

On a CUDA device the ops dispatch to the fused Triton kernels (SPEC §5).
Committed CPU results (examples/results/): quick.* (the quick cell), quick_alpha1.*
(--quick --alpha 1), quick_300steps.* (an earlier 300-step quick run),
cell_steps1000.* (the default cell), quick_per_batch.* (--quick --per-batch: one
class per batch, the paper's scheme), quick_detached.* (--quick --detach-importance).
The GPU sweep has not been run yet.
Results go to examples/results/ (``--out`` to change): <name>.txt (the table),
<name>.json (every number), <name>.png (per-class IoU).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import debias_ops as dops

CLASSES = ("background", "road", "rider", "sign", "car")
K = len(CLASSES)
RARE = 2  # rider
FREQ = 1  # road
RESULTS = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------- data

@dataclass(frozen=True)
class Config:
    size: int = 32          # image side
    n_train: int = 2000
    n_test: int = 400       # per split
    bias: float = 0.95      # P(rider on the road) = P(sign away from the road) in training
    steps: int = 300
    batch: int = 32
    lr: float = 3e-3
    alpha: float = 10.0
    width: int = 32         # feature channels C
    noise: float = 0.45     # pixel noise std
    stripe: float = 0.5     # stripe amplitude (the only local cue separating rider from sign)
    per_sample: bool = True  # DropClassHead's drop: one class per sample (True) or per batch (the paper)
    weight_grad: bool = True  # let class_drop's gradient reach classifier.weight (DropClassHead's default)


_COLOUR = {
    0: (0.0, 0.0, 0.0),
    1: (0.9, 0.1, 0.1),
    2: (0.1, 0.7, 0.7),
    3: (0.1, 0.7, 0.7),
    4: (0.1, 0.1, 0.9),
}


def _place_touching(rng, road, s, size):
    """Top-left of an s x s square sitting on the road's top edge (touching it)."""
    y0, y1, x0, x1 = road
    y = max(0, y0 - s)
    x = int(rng.integers(max(0, x0 - s // 2), max(1, min(size - s, x1 - s // 2) + 1)))
    return y, min(x, size - s)


def _place_away(rng, road, s, size, margin=3):
    """Top-left of an s x s square at least `margin` pixels from the road (if any)."""
    for _ in range(100):
        y = int(rng.integers(0, size - s + 1))
        x = int(rng.integers(0, size - s + 1))
        if road is None:
            return y, x
        y0, y1, x0, x1 = road
        if y + s + margin <= y0 or y >= y1 + margin or x + s + margin <= x0 or x >= x1 + margin:
            return y, x
    return 0, 0  # pragma: no cover - the road never covers the whole image


def make_split(n: int, seed: int, cfg: Config, mode: str) -> tuple:
    """(images float32 (n, 3, S, S), labels int64 (n, S, S)); mode in train|ordinary|conflicting."""
    rng = np.random.default_rng(seed)
    S = cfg.size
    imgs = np.zeros((n, 3, S, S), np.float32)
    labels = np.zeros((n, S, S), np.int64)
    yy, xx = np.mgrid[0:S, 0:S]
    stripes_v = np.where(xx % 2 == 0, 1.0, -1.0).astype(np.float32)
    stripes_h = np.where(yy % 2 == 0, 1.0, -1.0).astype(np.float32)
    for i in range(n):
        lab = labels[i]
        road = None
        if rng.random() < 0.9:  # road: a band in the lower part of the image
            h = int(rng.integers(S // 4, S // 2))
            w = int(rng.integers(S // 2, S + 1))
            y0 = int(rng.integers(S // 3, S - h + 1))
            x0 = int(rng.integers(0, S - w + 1))
            road = (y0, y0 + h, x0, x0 + w)
            lab[y0:y0 + h, x0:x0 + w] = 1
        if rng.random() < 0.5:  # car: a blob anywhere
            r = int(rng.integers(3, 6))
            cy, cx = int(rng.integers(r, S - r)), int(rng.integers(r, S - r))
            lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 4
        for cls, present in ((3, rng.random() < 0.25), (2, rng.random() < 0.25)):
            if not present:
                continue
            s = int(rng.integers(4, 8))
            if mode == "conflicting":
                on_road = cls == 3
            else:
                aligned = rng.random() < cfg.bias
                on_road = aligned if cls == 2 else not aligned
            if on_road and road is not None:
                y, x = _place_touching(rng, road, s, S)
            else:
                y, x = _place_away(rng, road, s, S)
            lab[y:y + s, x:x + s] = cls
        img = imgs[i]
        for c, col in _COLOUR.items():
            m = lab == c
            for ch in range(3):
                img[ch][m] = col[ch]
        img[:, lab == 2] += cfg.stripe * stripes_v[lab == 2]
        img[:, lab == 3] += cfg.stripe * stripes_h[lab == 3]
        img += cfg.noise * rng.standard_normal(img.shape).astype(np.float32)
    return torch.from_numpy(imgs), torch.from_numpy(labels)


# ----------------------------------------------------------------------------- model

class Backbone(nn.Module):
    """A small dilated conv net: (B, 3, S, S) -> features (B, width, S/2, S/2)."""

    def __init__(self, width: int = 32):
        super().__init__()

        def block(cin, cout, stride=1, dilation=1):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
                nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.body = nn.Sequential(
            block(3, width // 2), block(width // 2, width, stride=2),
            block(width, width, dilation=2), block(width, width, dilation=4), block(width, width, dilation=1))

    def forward(self, x):
        return self.body(x)


class BaselineHead(nn.Module):
    """The standard head: a 1x1 classifier, plain cross-entropy."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.classifier = nn.Conv2d(in_channels, num_classes, 1)

    def forward(self, feats, target=None, t=None):
        logits = self.classifier(feats)
        if target is None:
            return logits
        # The same (fused on GPU) loss, with lam = 1 and nothing dropped: plain CE.
        return dops.dropclass_loss(logits, logits, target, None, lam=1.0, alpha=0.0).loss


class Net(nn.Module):
    def __init__(self, head: str, cfg: Config):
        super().__init__()
        self.backbone = Backbone(cfg.width)
        if head == "baseline":
            self.head = BaselineHead(cfg.width, K)
        else:
            self.head = dops.DropClassHead(cfg.width, K, importance="weight", alpha=cfg.alpha,
                                           per_sample=cfg.per_sample, weight_grad=cfg.weight_grad)
        self.kind = head

    def forward(self, x, target=None, t=None):
        feats = self.backbone(x)
        if target is None:
            return self.head(feats)
        out = self.head(feats, target, t)
        return out if self.kind == "baseline" else out.loss


# ----------------------------------------------------------------------------- train / eval

def train(head: str, cfg: Config, seed: int, data, device, progress_bar=True) -> Net:
    torch.manual_seed(seed)
    net = Net(head, cfg).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    x_all, y_all = (d.to(device) for d in data)  # the whole (small) training set lives on the device
    g = torch.Generator().manual_seed(seed + 1)  # same batches for both heads
    drop_gen = torch.Generator(device=device).manual_seed(seed + 2)
    from tqdm.auto import tqdm
    bar = tqdm(range(cfg.steps), desc=f"{head:9s} seed {seed}", leave=False, disable=not progress_bar,
               mininterval=1.0, file=sys.stderr)
    net.train()
    # The labels are valid by construction: skip the value checks (a host sync per step on a GPU).
    with dops.value_checks(False):
        for step in bar:
            idx = torch.randint(len(x_all), (cfg.batch,), generator=g).to(device)
            x, y = x_all[idx], y_all[idx]
            t = dops.progress(step, cfg.steps)
            if head == "baseline":
                loss = net(x, y, t)
            else:
                feats = net.backbone(x)
                loss = net.head(feats, y, t, generator=drop_gen).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    bar.close()
    return net


@torch.no_grad()
def per_class_iou(net: Net, data, device, batch: int = 200) -> np.ndarray:
    net.eval()
    x_all, y_all = data
    conf = torch.zeros(K, K, dtype=torch.int64, device=device)
    for i in range(0, len(x_all), batch):
        x, y = x_all[i:i + batch].to(device), y_all[i:i + batch].to(device)
        logits = F.interpolate(net(x).float(), size=y.shape[1:], mode="bilinear", align_corners=False)
        pred = logits.argmax(1)
        conf += torch.bincount((y * K + pred).reshape(-1), minlength=K * K).reshape(K, K)
    conf = conf.cpu().double()
    tp = conf.diagonal()
    union = conf.sum(0) + conf.sum(1) - tp
    return (tp / union.clamp_min(1)).numpy()


def run_cell(cfg: Config, seeds: List[int], device, progress_bar=True) -> Dict:
    """Train both heads on every seed; return per-seed per-class IoU on both splits."""
    res = {"baseline": {"ordinary": [], "conflicting": []}, "dropclass": {"ordinary": [], "conflicting": []}}
    for seed in seeds:
        train_data = make_split(cfg.n_train, 1000 * seed + 1, cfg, "train")
        tests = {m: make_split(cfg.n_test, 1000 * seed + 2 + j, cfg, m) for j, m in enumerate(("ordinary", "conflicting"))}
        for head in ("baseline", "dropclass"):
            net = train(head, cfg, seed, train_data, device, progress_bar)
            for split, data in tests.items():
                res[head][split].append(per_class_iou(net, data, device).tolist())
    return res


# ----------------------------------------------------------------------------- report

def _ms(values) -> tuple:
    a = np.asarray(values, dtype=np.float64)
    sd = a.std(axis=0, ddof=1) if a.shape[0] > 1 else np.zeros(a.shape[1:])
    return a.mean(axis=0), sd


def verdict(res: Dict, split: str = "conflicting", cls: int = RARE) -> tuple:
    """(delta mean, spread, word) for one class on one split."""
    bm, bs = _ms(res["baseline"][split])
    dm, ds = _ms(res["dropclass"][split])
    delta = float(dm[cls] - bm[cls])
    spread = float(max(bs[cls], ds[cls]))
    word = "helps" if delta > spread else ("hurts" if delta < -spread else "within spread")
    return delta, spread, word


def table(res: Dict, cfg: Config, n_seeds: int, title: str = "") -> str:
    lines = []
    if title:
        lines.append(title)
    lines.append(f"per-class IoU (%), mean ± std over {n_seeds} seeds; bias={cfg.bias}, steps={cfg.steps}, "
                 f"alpha={cfg.alpha}, batch={cfg.batch}, {cfg.size}x{cfg.size}"
                 + ("" if cfg.per_sample else ", drop per batch (paper)")
                 + ("" if cfg.weight_grad else ", importance detached"))
    lines.append(f"{'split':12s} {'class':11s} {'baseline':>14s} {'DropClass':>14s} {'Δ':>7s}")
    for split in ("ordinary", "conflicting"):
        bm, bs = _ms(res["baseline"][split])
        dm, ds = _ms(res["dropclass"][split])
        for c in range(K):
            tag = " (rare)" if c == RARE else ""
            lines.append(f"{split:12s} {CLASSES[c] + tag:11s} {100 * bm[c]:6.1f} ± {100 * bs[c]:4.1f}  "
                         f"{100 * dm[c]:6.1f} ± {100 * ds[c]:4.1f} {100 * (dm[c] - bm[c]):+6.1f}")
        bmi = _ms(np.asarray(res["baseline"][split]).mean(1, keepdims=True))
        dmi = _ms(np.asarray(res["dropclass"][split]).mean(1, keepdims=True))
        lines.append(f"{split:12s} {'mIoU':11s} {100 * bmi[0][0]:6.1f} ± {100 * bmi[1][0]:4.1f}  "
                     f"{100 * dmi[0][0]:6.1f} ± {100 * dmi[1][0]:4.1f} {100 * (dmi[0][0] - bmi[0][0]):+6.1f}")
    delta, spread, word = verdict(res)
    lines.append(f"rare class (rider) on the conflicting split: Δ = {100 * delta:+.1f} IoU points, "
                 f"seed spread {100 * spread:.1f} -> DropClass {word}")
    return "\n".join(lines)


def plot(res: Dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    x = np.arange(K)
    for ax, split in zip(axes, ("ordinary", "conflicting")):
        for off, head, colour in ((-0.2, "baseline", "tab:gray"), (0.2, "dropclass", "tab:orange")):
            m, s = _ms(res[head][split])
            ax.bar(x + off, 100 * m, 0.4, yerr=100 * s, capsize=3, color=colour,
                   label="baseline" if head == "baseline" else "DropClass")
        ax.set_xticks(x)
        ax.set_xticklabels([c + ("*" if i == RARE else "") for i, c in enumerate(CLASSES)])
        ax.set_title(f"{split} test split")
        ax.set_ylim(0, 100)
    axes[0].set_ylabel("IoU (%)  (mean ± std over seeds)")
    axes[0].legend(loc="lower left")
    fig.suptitle(title + "   (* = rare class)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def sweep_table(cells: List[Dict]) -> str:
    lines = ["DropClass vs baseline on the rare class (rider), conflicting split; Δ IoU points, seed spread",
             f"{'alpha':>5s} {'steps':>6s} {'bias':>5s} {'baseline':>13s} {'DropClass':>13s} {'Δ':>6s} "
             f"{'spread':>6s}  verdict   | ordinary Δ"]
    for cell in cells:
        cfg, res = cell["config"], cell["results"]
        bm, bs = _ms(res["baseline"]["conflicting"])
        dm, ds = _ms(res["dropclass"]["conflicting"])
        delta, spread, word = verdict(res)
        do, so, wo = verdict(res, "ordinary")
        lines.append(f"{cfg['alpha']:5.0f} {cfg['steps']:6d} {cfg['bias']:5.2f} {100 * bm[RARE]:5.1f} ± {100 * bs[RARE]:4.1f} "
                     f"{100 * dm[RARE]:5.1f} ± {100 * ds[RARE]:4.1f} {100 * delta:+6.1f} {100 * spread:6.1f}  "
                     f"{word:13s} | {100 * do:+.1f} ({wo})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def main(argv: Optional[List[str]] = None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one small cell (CPU, a few minutes)")
    ap.add_argument("--sweep", action="store_true",
                    help="alpha in {1, 10} x steps in {S, 4S} x bias in {0.8, 0.98} (meant for a GPU)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="training steps (the sweep's short length)")
    ap.add_argument("--bias", type=float, default=None)
    ap.add_argument("--alpha", type=float, default=None)
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--n-test", type=int, default=None)
    ap.add_argument("--stripe", type=float, default=None,
                    help="stripe amplitude, the only local rider/sign cue (default 0.5; smaller = stronger shortcut)")
    ap.add_argument("--noise", type=float, default=None, help="pixel noise std (default 0.45)")
    ap.add_argument("--per-batch", action="store_true",
                    help="drop one class for the whole batch (the paper's scheme) instead of one per sample")
    ap.add_argument("--detach-importance", action="store_true",
                    help="no gradient through the importance max(0, W) (DropClassHead(weight_grad=False))")
    ap.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default=None, help="output file stem (default: quick | cell | sweep)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    cfg = Config(steps=600, n_train=2000, n_test=400) if args.quick else Config(steps=1000, n_train=4000, n_test=1000)
    overrides = {k: v for k, v in (("steps", args.steps), ("bias", args.bias), ("alpha", args.alpha),
                                   ("n_train", args.n_train), ("n_test", args.n_test),
                                   ("stripe", args.stripe), ("noise", args.noise)) if v is not None}
    if args.per_batch:
        overrides["per_sample"] = False
    if args.detach_importance:
        overrides["weight_grad"] = False
    cfg = replace(cfg, **overrides)
    seeds = list(range(args.seeds))
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    backend = "triton (fused)" if device.type == "cuda" else "reference (CPU)"
    header = f"device={device}, ops backend={backend}, torch {torch.__version__}"

    if not args.sweep:
        name = args.name or ("quick" if args.quick else "cell")
        res = run_cell(cfg, seeds, device, not args.no_progress)
        text = table(res, cfg, len(seeds), header)
        text += f"\nwall time {time.time() - t0:.0f} s"
        print(text)
        (args.out / f"{name}.txt").write_text(text + "\n")
        (args.out / f"{name}.json").write_text(json.dumps({"config": asdict(cfg), "seeds": seeds, "classes": CLASSES,
                                                           "device": str(device), "results": res}, indent=1))
        plot(res, args.out / f"{name}.png", f"bias={cfg.bias}, steps={cfg.steps}, alpha={cfg.alpha}")
        return res

    name = args.name or "sweep"
    short = cfg.steps
    cells = []
    for bias in (0.8, 0.98):
        for steps in (short, 4 * short):
            base_cfg = replace(cfg, bias=bias, steps=steps)
            # the baseline does not depend on alpha: train it once per (bias, steps)
            base = None
            for alpha in (1.0, 10.0):
                c = replace(base_cfg, alpha=alpha)
                res = run_cell(c, seeds, device, not args.no_progress) if base is None else \
                    _run_dropclass_only(c, seeds, device, base, not args.no_progress)
                base = res["baseline"]
                cells.append({"config": asdict(c), "results": res})
                print(table(res, c, len(seeds), f"--- cell alpha={alpha} steps={steps} bias={bias}"), flush=True)
    text = header + "\n" + sweep_table(cells) + f"\nwall time {time.time() - t0:.0f} s"
    print(text)
    (args.out / f"{name}.txt").write_text(text + "\n")
    (args.out / f"{name}.json").write_text(json.dumps({"seeds": seeds, "classes": CLASSES, "device": str(device),
                                                       "cells": cells}, indent=1))
    return {"cells": cells}


def _run_dropclass_only(cfg: Config, seeds, device, baseline, progress_bar) -> Dict:
    res = {"baseline": baseline, "dropclass": {"ordinary": [], "conflicting": []}}
    for seed in seeds:
        train_data = make_split(cfg.n_train, 1000 * seed + 1, cfg, "train")
        tests = {m: make_split(cfg.n_test, 1000 * seed + 2 + j, cfg, m) for j, m in enumerate(("ordinary", "conflicting"))}
        net = train("dropclass", cfg, seed, train_data, device, progress_bar)
        for split, data in tests.items():
            res["dropclass"][split].append(per_class_iou(net, data, device).tolist())
    return res


if __name__ == "__main__":
    main()
