"""Unit tests of the benchmark byte/flop model (benchmarks/byte_model.py):
design §8's byte floors and Gram time, linear scaling, and the check/fit helpers."""
import math

import pytest
import torch

from benchmarks import byte_model as bm
from benchmarks.cases import compare
from benchmarks.report import fit_line
from benchmarks.shapes import GPU_SHAPES, Shape

W48, W18s = GPU_SHAPES["W48"], GPU_SHAPES["W18s"]
H100_COPY_GBPS = 3020.0  # design §8


def _A(shape, dtype):
    return shape.B * shape.C * shape.N * torch.empty((), dtype=dtype).element_size()


@pytest.mark.parametrize("shape", [W48, W18s], ids=lambda s: s.name)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_selection_floors_match_spec_formula(shape, dtype):
    A = _A(shape, dtype)
    L = shape.B * shape.K * shape.N * torch.empty((), dtype=dtype).element_size()
    Wb = shape.K * shape.C * torch.empty((), dtype=dtype).element_size()
    assert bm.suppress(shape, dtype, "fwd").bytes == 3 * A + L
    assert bm.suppress(shape, dtype, "fwd+bwd").bytes == 5 * A + L
    assert bm.class_drop(shape, dtype, "fwd").bytes == 2 * A + Wb
    assert bm.class_drop(shape, dtype, "fwd+bwd").bytes == 5 * A + 2 * Wb


def test_spec_table_floors():
    # design §8: class_drop W48 fwd+bwd byte floor 0.625 ms (bf16) / 1.25 ms (fp32) at 3.02 TB/s;
    # the model adds only the K×C weight terms (< 0.01 %)
    for dtype, floor in ((torch.bfloat16, 0.625), (torch.float32, 1.25)):
        got = bm.class_drop(W48, dtype, "fwd+bwd").floor_ms(H100_COPY_GBPS)
        assert got == pytest.approx(floor, rel=5e-3)
        # suppress: the design's 5·|A| plus the logits read |L| = |A|·K/C (+0.5 % at W48)
        sup = bm.suppress(W48, dtype, "fwd+bwd")
        assert sup.floor_ms(H100_COPY_GBPS) == pytest.approx(floor * (1 + W48.K / (5 * W48.C)), rel=5e-3)
    # design §8: suppress W18s bf16 floor 0.35 ms (5·|A|)
    a = _A(W18s, torch.bfloat16)
    assert 5 * a / (H100_COPY_GBPS * 1e9) * 1e3 == pytest.approx(0.35, rel=0.02)
    # design §8: loss fp32 B8 K19 128×256 -> 512×1024: ~0.04 ms
    assert bm.loss(W48, torch.float32, "fwd+bwd").floor_ms(H100_COPY_GBPS) == pytest.approx(0.04, rel=0.1)


def test_loss_terms():
    t = bm.loss(W48, torch.float32, "fwd+bwd")
    lo = 8 * 19 * 128 * 256 * 4
    assert t.terms["read logits"] == t.terms["write d logits"] == lo
    assert t.terms["read target"] == 8 * 512 * 1024 * 8  # int64 labels at full resolution
    assert t.bytes == sum(t.terms.values())
    assert bm.loss(W48, torch.float32, "fwd").bytes == t.bytes - 2 * lo


def test_gram_flops_and_time():
    # design §8: the Gram 2·B·N·C² is 0.34 ms at W48 in bf16 on tensor cores (~790 TFLOP/s)
    t = bm.suppress(W48, torch.bfloat16, "fwd+bwd")
    gram = 2 * 8 * 128 * 256 * 720 ** 2
    assert t.flops == gram + 2 * 8 * 128 * 256 * 720 * 19
    assert gram / 790e12 * 1e3 == pytest.approx(0.34, rel=0.02)
    assert t.tflops(1.0) == pytest.approx(t.flops / 1e9)


SMALL_TERMS = {"read W", "write dW", "read drop", "read weight"}  # K×C / B×K / K: independent of B·N


@pytest.mark.parametrize("op", ["suppress", "class_drop", "loss"])
def test_linear_in_batch_and_positions(op):
    base = Shape("s", B=2, C=32, H=16, W=16, K=7)
    for mode in bm.MODES:
        t1 = bm.traffic(op, base, torch.float16, mode)
        for bigger in (base.with_(B=4), base.with_(H=32)):
            t2 = bm.traffic(op, bigger, torch.float16, mode)
            assert t2.terms.keys() == t1.terms.keys()
            for name, v in t1.terms.items():
                if name == "read drop" and bigger.B != base.B:
                    assert t2.terms[name] == 2 * v        # B×K
                elif name in SMALL_TERMS:
                    assert t2.terms[name] == v
                else:
                    assert t2.terms[name] == 2 * v, name   # every B·N-sized term doubles
    assert bm.traffic(op, base, torch.float32, "fwd").bytes < bm.traffic(op, base, torch.float32, "fwd+bwd").bytes
    # bf16 halves the feature/logit traffic of fp32 (labels stay int64)
    if op != "loss":
        assert 2 * bm.traffic(op, base, torch.bfloat16, "fwd+bwd").bytes == bm.traffic(op, base, torch.float32, "fwd+bwd").bytes


def test_rates_and_errors():
    t = bm.Traffic(bytes=3_000_000_000)
    assert t.gbps(1.0) == pytest.approx(3000.0)
    assert t.floor_ms(3000.0) == pytest.approx(1.0)
    assert t.gbps(None) is None and t.floor_ms(None) is None
    assert bm.head(W48, torch.bfloat16, "fwd+bwd").bytes is None
    assert bm.head(W48, torch.bfloat16, "fwd+bwd").flops == 3 * bm.head(W48, torch.bfloat16, "fwd").flops
    with pytest.raises(ValueError, match="mode"):
        bm.suppress(W48, torch.float32, "bwd")
    with pytest.raises(ValueError, match="unknown op"):
        bm.traffic("nope", W48, torch.float32, "fwd")
    assert bm.sweep_elements("suppress", W48) == 8 * 720 * 128 * 256
    assert bm.sweep_elements("loss", W48) == 8 * 19 * 512 * 1024


def test_fit_line_and_compare():
    f = fit_line([1, 2, 3, 4], [3, 5, 7, 9])
    assert f["slope"] == pytest.approx(2) and f["intercept"] == pytest.approx(1) and f["r2"] == pytest.approx(1)
    assert fit_line([1, 2, 3], [1, 3, 2])["r2"] < 0.5
    ref = [("out", torch.linspace(-1, 1, 101))]
    assert compare([("out", ref[0][1] * (1 + 5e-5))], ref, torch.float32)["ok"]
    bad = compare([("out", ref[0][1] * 1.01)], ref, torch.float32)
    assert not bad["ok"] and bad["worst"] == "out" and bad["max_err_over_tol"] > 1
    nan = ref[0][1].clone()
    nan[3] = float("nan")
    assert not compare([("out", nan)], ref, torch.float32)["ok"]
    assert not compare([("out", ref[0][1][:-1])], ref, torch.float32)["ok"]
    assert not compare([], ref, torch.float32)["ok"]
    assert math.isinf(compare([], ref, torch.float32)["max_err_over_tol"])


def test_goals_read_gpu_rows_only():
    from benchmarks import goals

    def row(**kw):
        base = dict(kind="op", device_kind="cuda", op="suppress", shape="W48", dtype="bf16", impl="fused",
                    mode="fwd+bwd", status="ok", median_ms=1.0, speedup_vs_compile=8.0, peak_extra_mib=700.0,
                    floor_ms=0.625)
        base.update(kw)
        return base

    res = {g["goal"]: g for g in goals.check([row(), row(op="class_drop", median_ms=0.8),
                                             row(op="class_drop", shape="W18s", device_kind="cpu")])}
    assert res["suppress W48 bf16 fwd+bwd time"]["status"] == "met"
    assert res["suppress W48 bf16 fwd+bwd × vs torch.compile"]["status"] == "met"
    assert res["class_drop W48 bf16 fwd+bwd / byte floor"]["status"] == "missed"   # 0.8 / 0.625 = 1.28 > 1.15
    assert res["class_drop W18s bf16 fwd+bwd / byte floor"]["status"] == "not measured"  # a CPU row never counts
    assert res["suppress W48 bf16 peak extra memory"]["value"] == pytest.approx(700.0 / (8 * 720 * 32768 * 2 / 2**20))
    assert "[         met]" in goals.format_goals(goals.check([row()]))
