"""CPU checks of the one-command GPU check (scripts/gpu_check.sh, benchmarks/gpu_check.py):
the plan fits its time budget and file count, every stage command exists and parses
its arguments, the summary is written from a stage folder, and without a CUDA
device the real run stops within seconds with a clear message."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import gpu_check
from benchmarks import gpu_check_plugin as plugin

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _env(tmp_path, **extra):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out"), TMPDIR=str(tmp_path), **extra)
    for name in ("TRITON_INTERPRET", "DEBIAS_OPS_BACKEND"):
        env.pop(name, None)
    return env


def test_dry_run_prints_the_plan_within_budget(tmp_path):
    res = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=_env(tmp_path), capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    stages = gpu_check.plan(sys.executable, str(tmp_path / "work"), str(tmp_path / "out"))
    starts = gpu_check.group_starts(stages)
    print(res.stdout)  # each stage's limit and latest start, and the group budgets' sum
    for s in stages:
        assert re.search(rf"\b{s.name}\s+{s.limit_s}s\s+{starts[s.group]}s\b", res.stdout), \
            f"{s.name} missing from:\n{res.stdout}"
    budgets = gpu_check.group_budgets(stages)
    assert f"= {sum(budgets.values())} s of {gpu_check.BUDGET_S} s" in res.stdout
    assert not list(tmp_path.glob("gpu_check.*")), "a dry run creates no work folder"
    # a cold, sandboxed machine: import torch + nvidia-smi + CUDA start-up get two minutes
    assert stages[0].name == "preflight" and stages[0].limit_s == gpu_check.PREFLIGHT_S >= 120
    # the script's kill grace is the one counted; the worst case stays inside a 560 s outer limit
    assert f"timeout -k {gpu_check.KILL_GRACE_S} " in SCRIPT.read_text()
    assert gpu_check.critical_path_s(stages) + gpu_check.KILL_GRACE_S + 30 <= 560
    plan = json.loads(subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "plan", "--json"], cwd=ROOT,
                                     capture_output=True, text=True, timeout=60, check=True).stdout)
    # groups run one after the other: the wall-clock bound is the longest limit of each group, summed
    assert plan["critical_path_s"] == gpu_check.critical_path_s(stages) <= gpu_check.BUDGET_S == 480
    assert len(plan["files"]) <= plan["max_files"] == 8
    names = [s.name for s in stages]
    assert names[0] == "preflight" and names[-1] == "summary" and len(set(names)) == len(names)
    assert {"tests", "sanitizer", "bench", "train_step"} <= set(names)
    for timed in ("bench", "train_step"):  # timings share the GPU with nothing
        group = next(s.group for s in stages if s.name == timed)
        assert [s.name for s in stages if s.group == group] == [timed]
    bench = next(s for s in stages if s.name == "bench")
    budget = float(bench.argv[bench.argv.index("--budget-s") + 1])
    assert budget <= bench.limit_s - 45, "the benchmark's budget leaves no margin for its last row and its files"


# the checks the GPU stages must select: a -k / -m change that drops one fails here
REQUIRED = {
    "tests": ("test_class_drop_shapes_dtypes_layouts", "test_suppress_gate_level", "test_class_importance",
              "test_moments_shapes_dtypes", "test_moments_gpu_full_size", "test_parity_ratios", "test_half_dtypes",
              "test_gpu_cityscapes_parity", "test_gpu_spec_shape_parity", "test_gpu_compile_fullgraph_fwd_bwd",
              "test_gpu_compile_and_memory", "test_gpu_cuda_graph_capture_replay",
              "test_gpu_loss_cuda_graph_capture_replay", "test_gpu_opcheck", "test_gpu_loss_opcheck",
              "test_gpu_more_than_2_31_elements", "test_moments_gpu_int64_offsets", "test_gpu_peak_memory_w48",
              "test_gpu_bitwise_deterministic", "test_gpu_matches_cpu_reference"),
    "sanitizer": ("test_gpu_compute_sanitizer_memcheck",),
}


def _stage_ids():
    return [s.name for s in gpu_check.plan()]


@pytest.mark.parametrize("name", _stage_ids())
def test_stage_command_parses(name, tmp_path):
    """Each stage's command exists and accepts its arguments: pytest stages collect
    the same selection as on the GPU (> 0 tests, every REQUIRED check; -qq against
    the stage's -v lists node ids), the CLIs parse their argv."""
    work = tmp_path / "work"
    work.mkdir()
    stage = next(s for s in gpu_check.plan(sys.executable, str(work), str(tmp_path / "out")) if s.name == name)
    assert shlex.split(stage.shell()) == [*(["env"] + [f"{k}={v}" for k, v in stage.env.items()] if stage.env else []),
                                          *stage.argv]
    assert all(k.isidentifier() for k in stage.env)
    argv = list(stage.argv)
    assert argv[:2] == [sys.executable, "-m"]
    module, args = argv[2], argv[3:]
    if module == "pytest":
        res = subprocess.run(argv + ["--collect-only", "-qq"], cwd=ROOT, env=_env(tmp_path), capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        m = re.search(r"(\d+)(?:/\d+)? tests? collected", res.stdout)
        assert m and int(m.group(1)) > 0, res.stdout[-2000:]
        missing = [t for t in REQUIRED[name] if f"::{t}" not in res.stdout]
        assert not missing, f"stage {name} does not select {missing}"
        # with the stage's environment the plugin orders them: each op's parity first, the heavy ones last
        res = subprocess.run(argv + ["--collect-only", "-qq"], cwd=ROOT, env=_env(tmp_path, **stage.env),
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        names = [line.split("::")[-1].split("[")[0] for line in res.stdout.splitlines() if "::" in line]
        ranks = [plugin.priority(n, ()) if n in plugin.PARITY + plugin.HEAVY else None for n in names]
        known = [r for r in ranks if r is not None]
        assert known == sorted(known), "parity tests first, heavy ones last"
        if name == "tests":
            assert ranks[0] == 0 and ranks[-1] == 3, names[:3] + names[-3:]
    elif module == "benchmarks":
        from benchmarks.__main__ import parser
        ns = parser().parse_args(args)
        assert ns.budget_s is None or ns.budget_s < stage.limit_s
    elif module == "benchmarks.gpu_check":
        assert gpu_check.parser().parse_args(args).cmd in ("preflight", "summary")
    else:
        pytest.fail(f"stage {name}: unknown command {module}")


def test_summary_from_a_stage_folder(tmp_path):
    """summary.md (one screen) and results.json from what the stages leave: a junit
    XML, a log without XML (a stage stopped early), a training-step row."""
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "train_step").mkdir(parents=True)
    (work / "stages.tsv").write_text("preflight\t0\t3\ntests\t0\t120\nsanitizer\t124\t150\nbench\t1\t40\n"
                                     "train_step\t0\t30\n")
    (work / "device.json").write_text(json.dumps({"device": "Test GPU", "capability": "sm_90", "torch": "2.x",
                                                  "triton": "3.x", "nvidia_smi": {"driver": "1.2"}}))
    (work / "tests.xml").write_text(
        '<testsuites><testsuite><testcase classname="tests.a" name="test_ok"/>'
        '<testcase classname="tests.a" name="test_bad"><failure message="AssertionError: out differs"/></testcase>'
        '<testcase classname="tests.a" name="test_skip"><skipped message="needs more memory"/></testcase>'
        '</testsuite></testsuites>')
    (work / "sanitizer.log").write_text("tests/test_kernels_gpu.py::test_gpu_compute_sanitizer_memcheck PASSED\n")
    rows = [{"kind": "train_step", "status": "ok", "impl": "baseline", "median_ms": 80.0, "overhead_pct": None},
            {"kind": "train_step", "status": "ok", "impl": "dropclass", "median_ms": 81.2, "overhead_pct": 1.5}]
    (work / "train_step" / "results.json").write_text(json.dumps({"meta": {}, "rows": rows}))
    assert gpu_check.summary(work, out) == 0
    text = (out / "summary.md").read_text()
    assert set(p.name for p in out.iterdir()) <= set(gpu_check.FILES)
    assert len(text.splitlines()) <= 60, "one screen"
    assert "1 passed, 1 failed, 1 skipped" in text and "tests.a::test_bad: AssertionError: out differs" in text
    assert re.search(r"sanitizer .*timed out: 1 passed, 0 failed", text)
    assert re.search(r"bench .*failed \(exit 1\): no results.json", text)
    assert re.search(r"train_step .*ok: baseline 80.0 ms, dropclass 81.2 ms: \+1.5 %", text)
    assert re.search(r"\[\s*met\] DeepLabV3-R50 step: DropClass overhead: 1.5 %", text)
    assert "Test GPU" in text and "driver 1.2" in text
    result = json.loads((out / "results.json").read_text())
    assert result["stages"]["sanitizer"]["state"] == "timed out" and result["tests"]["tests"]["failed"] == 1


def test_real_run_without_cuda_fails_fast(tmp_path):
    env = _env(tmp_path, CUDA_VISIBLE_DEVICES="")
    t = time.perf_counter()
    res = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    took = time.perf_counter() - t
    assert res.returncode == 2, res.stdout + res.stderr
    assert "gpu_check: no CUDA device here" in res.stderr and "benchmarks/README.md" in res.stderr, res.stderr
    assert took < 60, f"took {took:.0f} s"
    assert not list(tmp_path.glob("gpu_check.*")), "the work folder is removed"
    # what comes back when the preflight fails: the summary says how far it got, the logs are packed
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"summary.md", "results.json", "logs.tar.gz"}
    text = (out / "summary.md").read_text()
    assert re.search(r"preflight .*failed \(exit 2\): .*import torch [\d.]+ s.*stopped in: CUDA available", text), text
    assert "no other stage ran" in text and "no CUDA device here" in text
    assert re.search(r"\ntests .* not run\n", text), text
    assert json.loads((out / "results.json").read_text())["device"]["reached"] == "CUDA available"


CUT_OFF = """
import time
import pytest

def test_moments_gpu_full_size():  # heavy: runs last, and is cut off
    time.sleep(60)

@pytest.mark.gpu
def test_gpu_feature():
    pass

def test_parity_ratios():  # parity: runs first
    pass
"""


def test_stage_cut_off_keeps_what_finished(tmp_path):
    """A pytest stage stopped by `timeout` (SIGTERM) keeps the tests that finished, in
    priority order: the plugin's results log (written as each ends) and pytest's junit XML."""
    (tmp_path / "test_cut.py").write_text(CUT_OFF)
    work = tmp_path / "work"
    work.mkdir()
    env = _env(tmp_path, **{plugin.RESULTS_ENV: str(work / "t.jsonl")})
    argv = ["timeout", "-k", "20", "8", sys.executable, "-m", "pytest", str(tmp_path / "test_cut.py"),
            *gpu_check.pytest_args(str(work), "t")]
    res = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 124, res.stdout[-2000:] + res.stderr[-2000:]
    lines = [json.loads(x) for x in (work / "t.jsonl").read_text().splitlines()]
    assert lines[0] == {"collected": 3}
    assert [x["nodeid"].split("::")[-1] for x in lines[1:]] == ["test_parity_ratios", "test_gpu_feature"]
    r = gpu_check.junit(work, "t")
    assert (r["collected"], r["passed"], r["failed"]) == (3, 2, 0), r
    assert (work / "t.xml").exists(), "SIGTERM became KeyboardInterrupt: pytest wrote its junit XML"
    (work / "stages.tsv").write_text("tests\t124\t8\t8\n")
    (work / "t.jsonl").rename(work / "tests.jsonl")
    assert "2 of 3 finished: 2 passed, 0 failed, 0 skipped" in gpu_check._stage_note("tests", work, None, None)
