"""The synthetic debiasing benchmark (study/synthetic_bias.py, bias_grid.py, bias_report.py):
its data, its statistics, and a tiny grid that runs, resumes and writes its files (seconds).
Nothing here asserts that DropClass helps."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

sb = pytest.importorskip("study.synthetic_bias")
bg = pytest.importorskip("study.bias_grid")
br = pytest.importorskip("study.bias_report")
pytest.importorskip("scipy")

TINY = ["--steps", "3", "--seeds", "2", "--n-train", "64", "--n-test", "16", "--no-progress"]


def _on_context(labels: torch.Tensor, cls: int, context: int) -> torch.Tensor:
    """Per image holding `cls`: does any `cls` pixel sit directly above a `context` pixel?"""
    has = (labels == cls).flatten(1).any(1)
    above = torch.zeros_like(labels, dtype=torch.bool)
    above[:, :-1] = (labels[:, :-1] == cls) & (labels[:, 1:] == context)
    return above.flatten(1).any(1)[has]


@pytest.mark.parametrize("context,ctx_class", [("road", sb.FREQ), ("bicycle", sb.BICYCLE)])
def test_data_is_deterministic_and_biased(context, ctx_class):
    cfg = sb.Config(bias=0.98, context=context)
    a = sb.make_split(300, 7, cfg, "train")
    b = sb.make_split(300, 7, cfg, "train")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    x, y = a
    assert x.shape == (300, 3, cfg.size, cfg.size) and y.shape == (300, cfg.size, cfg.size)
    assert y.min() >= 0 and y.max() < sb.K
    freq = torch.bincount(y.flatten(), minlength=sb.K).double() / y.numel()
    assert freq[sb.RARE] < 0.03 < 0.15 < freq[sb.FREQ], f"class frequencies {freq.tolist()}"
    # training: the rare class nearly always sits on its context, the sign nearly never
    assert _on_context(y, sb.RARE, ctx_class).double().mean() > 0.8
    assert _on_context(y, sb.SIGN, ctx_class).double().mean() < 0.1
    # conflicting split: the pairing is broken
    _, yc = sb.make_split(300, 8, cfg, "conflicting")
    assert _on_context(yc, sb.RARE, ctx_class).double().mean() == 0.0
    assert _on_context(yc, sb.SIGN, ctx_class).double().mean() > 0.7


def test_bad_data_arguments():
    with pytest.raises(ValueError, match="mode"):
        sb.make_split(2, 0, sb.Config(), "val")
    with pytest.raises(ValueError, match="context"):
        sb.make_split(2, 0, sb.Config(context="sky"), "train")


def test_paired_interval_and_verdicts():
    iv = br.paired_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t_{0.975, 2} = 4.3027
    assert iv["mean"] == pytest.approx(2.0)
    assert iv["hi"] - iv["mean"] == pytest.approx(4.302653 / 3 ** 0.5, rel=1e-5)
    assert iv["verdict"] == "inconclusive"
    assert br.paired_interval([5.0, 6.0, 7.0])["verdict"] == "helps"
    assert br.paired_interval([-5.0, -6.0, -7.0])["verdict"] == "hurts"
    assert br.paired_interval([3.0])["verdict"] == "inconclusive"  # one seed: no interval


def test_grid_shares_baselines_and_is_written_down():
    jobs = bg.grid_jobs(bg.CHOSEN, ["central", "3S", "alpha=10", "alpha=10, 3S"], [0, 1], 10)
    base = [j for j in jobs if j.cell == "baseline"]
    assert sorted({(j.steps, j.seed) for j in base}) == [(10, 0), (10, 1), (30, 0), (30, 1)] and len(base) == 4
    assert len(jobs) == 4 + 4 * 2
    assert all(d in bg.DATA for d in bg.GRID_DATA)
    # pre-registered: every cell is named in the module docstring's grid and in the study's README
    readme = (Path(__file__).resolve().parents[1] / "study" / "README.md").read_text()
    for cell in list(bg.CELLS) + list(bg.DIAGNOSTICS):
        assert f"`{cell}`" in readme, f"cell {cell!r} is not listed in the README"


def test_pretrained_cells_have_their_own_baseline():
    assert bg.baseline_of("central") == "baseline"
    name = bg.baseline_of("diag: pretrained")
    assert name == f"baseline-pretrain{bg.S}" and bg.method_of(name) == sb.Method(baseline=True, pretrain=bg.S)
    assert bg.method_of("baseline") == sb.BASELINE
    jobs = bg.grid_jobs(bg.CHOSEN, ["central", "diag: pretrained"], [0], 10)
    assert {j.cell for j in jobs} == {"baseline", name, "central", "diag: pretrained"}


def test_pretrain_backbone_keeps_the_backbone_and_resets_the_classifier():
    cfg = sb.Config(n_train=32)
    torch.manual_seed(0)
    net = sb.Net(cfg.width)
    before = [p.detach().clone() for p in net.backbone.parameters()]
    sb.pretrain_backbone(net, cfg, seed=0, steps=2, device="cpu")
    assert any(not torch.equal(a, b) for a, b in zip(before, net.backbone.parameters()))
    torch.manual_seed(0 + 11)
    fresh = torch.nn.Conv2d(cfg.width, sb.K, 1)
    assert torch.equal(net.classifier.weight, fresh.weight) and torch.equal(net.classifier.bias, fresh.bias)


def test_tiny_grid_runs_resumes_and_writes(tmp_path, monkeypatch):
    rep = bg.main(["grid", "--cells", "central", "--out", str(tmp_path)] + TINY)
    runs = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "runs").rglob("*.json"))
    d = bg.CHOSEN
    assert runs == [f"runs/{d}/baseline@3/seed0.json", f"runs/{d}/baseline@3/seed1.json",
                    f"runs/{d}/central@3/seed0.json", f"runs/{d}/central@3/seed1.json"]
    run = json.loads((tmp_path / runs[2]).read_text())
    assert len(run["iou"]["conflicting"]) == sb.K and "iou_plain" in run and run["versions"]["torch"]
    assert run["method"]["alpha"] == 1.0 and run["config"]["n_train"] == 64
    cell = rep["grids"][d]["cells"][0]
    assert cell["cell"] == "central" and cell["rider_conflicting"]["n"] == 2
    assert cell["rider_conflicting"]["verdict"] in ("helps", "hurts", "inconclusive")
    for name in (f"grid_{d}.md", f"grid_{d}.json", f"grid_{d}_delta_rider.png", f"grid_{d}_overlap_seed0.png"):
        assert (tmp_path / name).stat().st_size > 100, name
    assert "| central | 3 |" in (tmp_path / f"grid_{d}.md").read_text()

    # resume: nothing is trained again, one more cell trains only its own runs
    trained = []
    real = sb.train_run

    def counting(cfg, method, seed, steps, **kw):
        trained.append((method, seed))
        return real(cfg, method, seed, steps, **kw)

    monkeypatch.setattr(sb, "train_run", counting)
    bg.main(["grid", "--cells", "central", "--out", str(tmp_path)] + TINY)
    assert trained == []
    bg.main(["grid", "--cells", "central", "alpha=10", "--out", str(tmp_path)] + TINY)
    assert [(m.alpha, s) for m, s in trained] == [(10.0, 0), (10.0, 1)]
    assert len(json.loads((tmp_path / f"grid_{d}.json").read_text())["cells"]) == 2
    # the second bias type: a grid of its own, files of its own
    bg.main(["grid", "--cells", "central", "--data", bg.SECOND, "--out", str(tmp_path)] + TINY)
    assert (tmp_path / f"grid_{bg.SECOND}.md").exists() and (tmp_path / f"grid_{d}.md").exists()


def test_calibration_report_and_bad_cells(tmp_path):
    rep = bg.main(["calibrate", "--out", str(tmp_path), "--seeds", "2", "--steps", "2", "--n-train", "32",
                   "--n-test", "8", "--no-progress"])
    rows = rep["calibration"]["rows"]
    assert {r["data"] for r in rows} == set(bg.DATA) and all("gap" in r for r in rows)
    text = (tmp_path / "calibration.md").read_text()
    assert all(f"| {d} | 6 |" in text for d in bg.GRID_DATA)  # the grid's data at 3S too
    with pytest.raises(SystemExit, match="unknown cells"):
        bg.main(["grid", "--cells", "nope", "--out", str(tmp_path)])


@pytest.mark.gpu
def test_example_smoke_gpu(tmp_path):
    """The fused path (CUDA tensors dispatch to the Triton kernels) runs the benchmark."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    rep = bg.main(["grid", "--cells", "central", "--device", "cuda", "--out", str(tmp_path)] + TINY)
    assert rep["grids"][bg.CHOSEN]["cells"][0]["versions"]["device"].startswith("cuda")
