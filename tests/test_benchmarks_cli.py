"""CI check of the benchmark CLI: the CPU mode at the tiniest size runs, says
it is the CPU mode, and writes a results.json that follows the documented
schema (benchmarks/results/README.md), plus table.md and the plots.

torch.compile is left out (--no-compile): a cold Inductor compile takes
20–40 s per op on a shared 2-core CI machine; the CLI's own CPU mode runs it.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_cpu_tiny_mode_writes_valid_json(tmp_path):
    pytest.importorskip("torch")
    from benchmarks import schema

    out = tmp_path / "res"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DEBIAS_OPS_BACKEND")}
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "benchmarks", "--quick", "--cpu-tiny", "--no-compile", "--no-progress",
           "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=150)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    result = json.loads((out / "results.json").read_text())
    schema.validate(result)

    meta = result["meta"]
    assert meta["mode"] == "cpu-tiny" and meta["device_kind"] == "cpu"
    assert "CPU" in meta["device"]            # never labelled as a GPU
    assert meta["copy_bandwidth_gbps"] > 0
    rows = result["rows"]
    assert rows[0]["kind"] == "copy"
    ops = [r for r in rows if r["kind"] == "op" and r["device_kind"] == "cpu"]
    for op in ("suppress", "class_drop", "loss"):
        eager = [r for r in ops if r["op"] == op and r["impl"] == "eager"]
        assert eager and all(r["status"] == "ok" for r in eager), eager
        assert all(r["gbps"] and r["gbps"] > 0 and r["pct_copy_bw"] > 0 for r in eager)
    assert not [r for r in rows if r["status"] in ("wrong", "error")], \
        [(r["op"], r["impl"], r["reason"]) for r in rows if r["status"] in ("wrong", "error")]
    # the fused path ran under the Triton interpreter, in its own process, checked against the reference
    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    else:
        interp = [r for r in rows if r["device_kind"] == "cpu-interpreter" and r["impl"] == "fused"]
        assert {r["op"] for r in interp if r["status"] == "ok"} >= {"suppress", "class_drop", "loss"}, interp
        assert all(r["check"]["ok"] for r in interp if r["status"] == "ok")
    # sweeps and their fits
    assert {(f["op"], f["param"]) for f in result["fits"]} >= {("suppress", p) for p in "NCB"} | {("loss", p) for p in "NCB"}
    assert (out / "table.md").exists()
    pytest.importorskip("matplotlib")
    assert (out / "bars.png").stat().st_size > 0 and (out / "scaling.png").stat().st_size > 0
    assert "No CUDA GPU" in proc.stdout or "--cpu" in " ".join(cmd)
    print(f"CPU tiny mode: {elapsed:.1f} s")


def test_pytest_suite_not_collected_by_tests():
    """`pytest` / `pytest tests` must not pick up the GPU benchmark suite."""
    ini = (ROOT / "pytest.ini").read_text()
    assert "testpaths = tests" in ini
    assert not list((ROOT / "tests").glob("*bench*suite*"))
    assert (ROOT / "benchmarks" / "test_bench.py").exists()


@pytest.mark.gpu
def test_gpu_quick_smoke(tmp_path):
    """On a GPU: the GPU mode runs end to end at one shape (no compile, no sweep)
    and the fused rows pass their check against the reference."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from benchmarks import schema

    out = tmp_path / "res"
    cmd = [sys.executable, "-m", "benchmarks", "--quick", "--shapes", "W18s", "--ops", "suppress,class_drop,loss",
           "--no-sweep", "--no-compile", "--no-progress", "--no-plots", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DEBIAS_OPS_BACKEND")}
    proc = subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    schema.validate(result)
    assert result["meta"]["device_kind"] == "cuda" and result["meta"]["copy_bandwidth_gbps"] > 100
    fused = [r for r in result["rows"] if r["kind"] == "op" and r["impl"] == "fused"]
    assert fused and all(r["status"] == "ok" and r["check"]["ok"] for r in fused), fused
    assert all(r["peak_extra_mib"] is not None and r["pct_copy_bw"] > 0 for r in fused)
    assert "goals" in result
