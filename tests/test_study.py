"""The debiasing study (study/): its data, its statistics, and a tiny grid that runs, resumes and
writes its files (seconds). Nothing here asserts that DropClass helps."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

sb = pytest.importorskip("study.synthetic_bias")
rg = pytest.importorskip("study.registry")
bg = pytest.importorskip("study.bias_grid")
br = pytest.importorskip("study.bias_report")
pytest.importorskip("scipy")

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--steps", "3", "--seeds", "2", "--n-train", "64", "--n-test", "16", "--no-progress"]
DATA = next(iter(rg.DATA))


pytestmark = pytest.mark.usefixtures("one_thread")


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


def _stripe_axis(x: torch.Tensor, y: torch.Tensor, cls: int) -> str:
    """'vertical' if the class's red channel alternates with the column, 'horizontal' with the row."""
    n, _, s, _ = x.shape
    rows = torch.arange(s).view(1, s, 1).expand(n, s, s)
    cols = torch.arange(s).view(1, 1, s).expand(n, s, s)
    m = y == cls
    red = x[:, 0]
    by_col = (red[m & (cols % 2 == 0)].mean() - red[m & (cols % 2 == 1)].mean()).abs()
    by_row = (red[m & (rows % 2 == 0)].mean() - red[m & (rows % 2 == 1)].mean()).abs()
    return "vertical" if by_col > by_row else "horizontal"


def test_cue_flip_swaps_training_stripes_only():
    clean = sb.Config(noise=0.0)
    flipped = sb.Config(noise=0.0, cue_flip=1.0)
    x, y = sb.make_split(200, 3, clean, "train")
    assert (_stripe_axis(x, y, sb.RARE), _stripe_axis(x, y, sb.SIGN)) == ("vertical", "horizontal")
    x, y = sb.make_split(200, 3, flipped, "train")
    assert (_stripe_axis(x, y, sb.RARE), _stripe_axis(x, y, sb.SIGN)) == ("horizontal", "vertical")
    for mode in sb.SPLITS:  # the test splits keep the true cue
        x, y = sb.make_split(200, 4, flipped, mode)
        assert _stripe_axis(x, y, sb.RARE) == "vertical", mode
    # the labels (placement) do not depend on the cue noise
    assert torch.equal(sb.make_split(50, 5, sb.Config(cue_flip=0.3), "ordinary")[1],
                       sb.make_split(50, 5, sb.Config(), "ordinary")[1])


def test_bad_data_arguments():
    with pytest.raises(ValueError, match="mode"):
        sb.make_split(2, 0, sb.Config(), "val")
    with pytest.raises(ValueError, match="context"):
        sb.make_split(2, 0, sb.Config(context="sky"), "train")
    with pytest.raises(ValueError, match="cue_flip"):
        sb.make_split(2, 0, sb.Config(cue_flip=1.5), "train")


def test_selector_bn_momentum_and_recalibration():
    cfg = sb.Config(n_train=8)
    torch.manual_seed(0)
    model = sb.build(cfg, sb.Method(alpha=10.0, per_sample=False), "cpu")
    bn = model.selector[1]
    assert bn.momentum == 0.01  # the authors' value
    x = sb.make_split(16, 0, cfg, "train")[0]
    params = [p.detach().clone() for p in model.parameters()]
    sb.recalibrate_selector_bn(model, x, "cpu", chunk=16)
    assert bn.momentum == 0.01 and model.training
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    model.eval()
    with torch.no_grad():  # the statistics of the selector conv's output on all-kept features
        feats, _ = model.features(x)
        h = model.selector[0](model.suppression(feats, None))
    assert torch.allclose(bn.running_mean, h.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, h.var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-6)


def test_paired_interval_and_holm():
    iv = br.paired_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t_{0.975, 2} = 4.3027
    assert iv["mean"] == pytest.approx(2.0)
    assert iv["hi"] - iv["mean"] == pytest.approx(4.302653 / 3 ** 0.5, rel=1e-5)
    assert iv["verdict"] == "inconclusive"
    assert br.paired_interval([5.0, 6.0, 7.0])["verdict"] == "helps"
    assert br.paired_interval([-5.0, -6.0, -7.0])["verdict"] == "hurts"
    assert br.paired_interval([-5.0, -6.0, -7.0], good=-1)["verdict"] == "helps"
    assert br.paired_interval([3.0])["verdict"] == "inconclusive"  # one seed: no interval
    diffs = {"a": [5.0, 6.1, 7.0, 5.5], "b": [0.5, 1.5, 1.0, 1.1], "c": [-1.0, 1.0, 0.5, -0.2]}
    res = br.holm(diffs, alpha=0.05)
    ps = sorted(res, key=lambda c: res[c]["p"])
    for i, c in enumerate(ps):  # the adjusted p-values are monotone and at least m-i+1 times the raw ones
        assert res[c]["p_holm"] >= min(1.0, (3 - i) * res[c]["p"]) - 1e-12
    for c, r in res.items():  # step-down-consistent: the interval excludes 0 exactly when Holm rejects
        assert (r["lo"] > 0 or r["hi"] < 0) == (r["p_holm"] <= 0.05), c
        assert r["level"] >= 0.95
    assert res["a"]["verdict"] == "helps" and res["c"]["verdict"] == "inconclusive"
    assert br.overall("helps", "helps") == "debiases" and br.overall("hurts", "inconclusive") == "hurts"
    assert br.overall("helps", "hurts") == "mixed" and br.overall("inconclusive", "inconclusive") == "inconclusive"


def test_registry_is_written_down_and_the_report_never_imports_the_runner():
    assert set(rg.GRID_SEEDS).isdisjoint(rg.CAL_SEEDS) and len(rg.GRID_SEEDS) >= 15
    assert all(m in rg.METHODS for m, _ in rg.CELLS.values())
    paper = rg.METHODS[rg.CELLS["paper"][0]]
    assert (paper.alpha, paper.per_sample, paper.schedule, paper.importance) == (10.0, False, "paper", "weight")
    readme = (ROOT / "study" / "README.md").read_text()
    for cell in rg.CELLS:
        assert f"`{cell}`" in readme, f"cell {cell!r} is not in study/README.md"
    if rg.CHOSEN is not None:
        assert rg.CHOSEN in rg.CANDIDATES
    for name in ("bias_report", "registry", "synthetic_bias"):
        tree = ast.parse((ROOT / "study" / f"{name}.py").read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
        mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "bias_grid" not in names and "study.bias_grid" not in mods, name


def test_cache_key_holds_every_setting():
    job = rg.Job(DATA, "baseline", 10, 0)
    keys = {rg.run_key(job), rg.run_key(job, {"n_train": 64}), rg.run_key(job, {"n_test": 16}),
            rg.run_key(job._replace(steps=11)), rg.run_key(job._replace(seed=1)), rg.run_key(job, device="cuda"),
            rg.run_key(job._replace(method="a10-batch"))}
    assert len(keys) == 7
    assert rg.run_key(job) == rg.run_key(rg.Job(DATA, "baseline", 10, 0))


def test_committed_results_need_the_registered_settings():
    with pytest.raises(SystemExit, match="--out"):
        bg.main(["grid"] + TINY)  # a smoke run must not write study/results
    with pytest.raises(SystemExit, match="unknown cells"):
        bg.main(["grid", "--cells", "nope", "--out", "/nonexistent"])


def test_tiny_grid_runs_resumes_and_writes(tmp_path, monkeypatch):
    args = ["grid", "--data", DATA, "--cells", "paper", "--out", str(tmp_path)] + TINY
    rep = bg.main(args)
    runs = sorted(p.relative_to(tmp_path).parent.as_posix() + "/" + p.name.split("-")[0]
                  for p in (tmp_path / "runs").rglob("*.json"))
    assert runs == [f"runs/{DATA}/a10-batch@3/seed0", f"runs/{DATA}/a10-batch@3/seed1",
                    f"runs/{DATA}/baseline@3/seed0", f"runs/{DATA}/baseline@3/seed1"]
    run = json.loads(next((tmp_path / "runs" / DATA / "a10-batch@3").glob("seed0-*.json")).read_text())
    assert len(run["iou"]["conflicting"]) == sb.K and "iou_plain" in run and "iou_recal" in run
    assert run["method"]["alpha"] == 10.0 and run["config"]["n_train"] == 64 and run["versions"]["torch"]
    cells = {c["cell"]: c for c in rep["grid"]["cells"]}
    assert set(cells) == {"paper", "paper, BN recalibrated"}  # one trained model, two evaluation paths
    for c in cells.values():
        assert c["rider_conflicting"]["n"] == 2 and "gap" in c and "overlap" in c
        assert c["verdict"] in ("debiases", "hurts", "mixed", "inconclusive")
    for name in ("grid.md", "grid.json", "grid_delta.png", "grid_overlap_seed0.png"):
        assert (tmp_path / name).stat().st_size > 100, name
    assert "| paper |" in (tmp_path / "grid.md").read_text()

    # resume: nothing is trained again; another cell trains only its own runs; other sizes never reuse a run
    trained = []
    real = sb.train_run

    def counting(cfg, method, seed, steps, **kw):
        trained.append((method.alpha, cfg.n_train, seed))
        return real(cfg, method, seed, steps, **kw)

    monkeypatch.setattr(sb, "train_run", counting)
    bg.main(args)
    assert trained == []
    bg.main(args[:4] + ["paper", "alpha=0.1"] + args[5:])
    assert trained == [(0.1, 64, 0), (0.1, 64, 1)]
    trained.clear()
    bg.main([a if a != "64" else "48" for a in args])
    assert sorted(trained) == [(1.0, 48, 0), (1.0, 48, 1), (10.0, 48, 0), (10.0, 48, 1)]


def test_tiny_calibration_applies_the_rule(tmp_path):
    rep = bg.main(["calibrate", "--out", str(tmp_path), "--seeds", "2", "--steps", "2", "--n-train", "32",
                   "--n-test", "8", "--no-progress"])
    rows = rep["calibration"]["rows"]
    assert [r["data"] for r in rows] == list(rg.DATA)  # none qualifies after 2 steps: every candidate is read
    assert all(not r["qualifies"] and r["seeds"] == [100, 101] for r in rows)
    assert "| 2 |" in (tmp_path / "calibration.md").read_text()


@pytest.mark.gpu
def test_study_smoke_gpu(tmp_path):
    """The fused path (CUDA tensors dispatch to the Triton kernels) runs the study."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    rep = bg.main(["grid", "--data", DATA, "--cells", "paper", "--device", "cuda", "--out", str(tmp_path)] + TINY)
    assert rep["grid"]["cells"][0]["versions"]["device"].startswith("cuda")
