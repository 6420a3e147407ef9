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
