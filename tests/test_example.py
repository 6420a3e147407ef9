"""Smoke run of examples/synthetic_bias.py (a few steps) and checks of its data."""
from __future__ import annotations

import json

import pytest
import torch

sb = pytest.importorskip("examples.synthetic_bias")


def _touching_road(labels: torch.Tensor, cls: int) -> torch.Tensor:
    """Per image holding `cls`: does any `cls` pixel sit directly above a road pixel?"""
    has = (labels == cls).flatten(1).any(1)
    above_road = torch.zeros_like(labels, dtype=torch.bool)
    above_road[:, :-1] = (labels[:, :-1] == cls) & (labels[:, 1:] == sb.FREQ)
    return above_road.flatten(1).any(1)[has]


def test_data_is_deterministic_and_biased():
    cfg = sb.Config(bias=0.95)
    a = sb.make_split(200, 7, cfg, "train")
    b = sb.make_split(200, 7, cfg, "train")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    x, y = a
    assert x.shape == (200, 3, cfg.size, cfg.size) and y.shape == (200, cfg.size, cfg.size)
    assert y.min() >= 0 and y.max() < sb.K
    freq = torch.bincount(y.flatten(), minlength=sb.K).double() / y.numel()
    assert freq[sb.RARE] < 0.02 < 0.15 < freq[sb.FREQ], f"class frequencies {freq.tolist()}"
    # training: the rare class nearly always sits on the road (when there is a road)
    assert _touching_road(y, sb.RARE).double().mean() > 0.8
    assert _touching_road(y, 3).double().mean() < 0.1
    # conflicting test split: the pairing is broken
    _, yc = sb.make_split(200, 8, cfg, "conflicting")
    assert _touching_road(yc, sb.RARE).double().mean() == 0.0
    assert _touching_road(yc, 3).double().mean() > 0.7


def test_example_smoke(tmp_path):
    res = sb.main(["--quick", "--steps", "4", "--seeds", "2", "--n-train", "64", "--n-test", "16",
                   "--device", "cpu", "--out", str(tmp_path), "--name", "smoke", "--no-progress"])
    for head in ("baseline", "dropclass"):
        for split in ("ordinary", "conflicting"):
            iou = torch.tensor(res[head][split])
            assert iou.shape == (2, sb.K) and (iou >= 0).all() and (iou <= 1).all()
    text = (tmp_path / "smoke.txt").read_text()
    assert "rider (rare)" in text and "DropClass" in text and "±" in text
    saved = json.loads((tmp_path / "smoke.json").read_text())
    assert saved["config"]["steps"] == 4 and saved["results"]["baseline"] == res["baseline"]
    assert (tmp_path / "smoke.png").stat().st_size > 1000


@pytest.mark.gpu
def test_example_smoke_gpu(tmp_path):
    """The fused path (CUDA tensors dispatch to the Triton kernels) runs the example."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    res = sb.main(["--quick", "--steps", "4", "--seeds", "1", "--n-train", "64", "--n-test", "16",
                   "--device", "cuda", "--out", str(tmp_path), "--name", "smoke", "--no-progress"])
    assert torch.tensor(res["dropclass"]["conflicting"]).shape == (1, sb.K)
    assert "triton" in (tmp_path / "smoke.txt").read_text()


def test_sweep_grid(tmp_path, monkeypatch):
    """--sweep runs alpha {1, 10} x steps {S, 4S} x bias {0.8, 0.98}, the baseline once per (steps, bias)."""
    calls = []

    def fake_cell(cfg, seeds, device, progress_bar=True):
        calls.append(("both", cfg.alpha, cfg.steps, cfg.bias))
        iou = [[0.5] * sb.K for _ in seeds]
        return {h: {s: iou for s in ("ordinary", "conflicting")} for h in ("baseline", "dropclass")}

    def fake_drop_only(cfg, seeds, device, baseline, progress_bar):
        calls.append(("dropclass", cfg.alpha, cfg.steps, cfg.bias))
        iou = [[0.6] * sb.K for _ in seeds]
        return {"baseline": baseline, "dropclass": {s: iou for s in ("ordinary", "conflicting")}}

    monkeypatch.setattr(sb, "run_cell", fake_cell)
    monkeypatch.setattr(sb, "_run_dropclass_only", fake_drop_only)
    out = sb.main(["--sweep", "--steps", "5", "--seeds", "3", "--device", "cpu", "--out", str(tmp_path), "--no-progress"])
    cells = {(c["config"]["alpha"], c["config"]["steps"], c["config"]["bias"]) for c in out["cells"]}
    assert cells == {(a, s, b) for a in (1.0, 10.0) for s in (5, 20) for b in (0.8, 0.98)}
    assert sum(c[0] == "both" for c in calls) == 4  # one baseline per (steps, bias)
    text = (tmp_path / "sweep.txt").read_text()
    assert text.count("helps") == 8  # +10 IoU points with zero seed spread
