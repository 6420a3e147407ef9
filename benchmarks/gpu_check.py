"""The GPU check in one command: the stage plan behind ``scripts/gpu_check.sh``.

The whole check is one command that ends within 8 minutes (``BUDGET_S``) and
brings its results back in a few files under ``$OUT``. It composes what exists, nothing new:

* ``preflight``: driver (nvidia-smi), torch import, CUDA start-up, Triton,
  compute-sanitizer, optional modules, each step timed in ``device.json`` as it
  ends; a cold sandboxed machine may take a minute to get there, hence its
  ``PREFLIGHT_S``. Without a CUDA device (or past its limit) the run stops
  (exit 2) and the summary still says which step was reached;
* ``tests``: the GPU parity subset of ``tests/`` (``-m "kernel or gpu"`` on
  CUDA tensors: every fused op vs the reference at odd and design §8 shapes,
  fp32/fp16/bf16, NCHW and channels_last, gradients; torch.compile fullgraph,
  CUDA graphs, opcheck, > 2^31 elements, peak memory, determinism), in
  ``PRIORITY`` order, each result written as it ends
  (``benchmarks/gpu_check_plugin.py``): a stage stopped at its limit keeps
  what finished;
* ``sanitizer``: ``compute-sanitizer --tool memcheck`` on one small launch of
  each kernel (``tests/test_kernels_gpu.py``), beside ``tests`` (same group);
* ``bench_warm``: beside the tests, the same benchmark once more, its times
  discarded, so that the timed run finds the torch.compile and Triton caches
  on disk filled;
* ``bench``: ``python -m benchmarks`` at design §8's shapes, fused vs eager vs
  torch.compile in the same run, with a ``--budget-s`` inside its limit;
* ``train_step``: the same CLI's DeepLabV3-ResNet50 training-step row alone;
* ``summary``: one screen (``summary.md``) and ``results.json`` under ``$OUT``.

Stages of one ``group`` run side by side, groups one after the other, each
stage under its own ``timeout`` (a hang or crash in one still returns the
others). A group starts at the latest at the sum of the earlier groups'
longest limits (``group_starts``); time an earlier group left unused is added
to its stages' limits, so the script ends within ``BUDGET_S`` plus one
``KILL_GRACE_S`` whatever each stage takes. The shell script reads the plan from ``python -m benchmarks.gpu_check
plan --tsv``; ``tests/test_gpu_check.py`` checks it on a CPU. Nothing here
imports torch at module level (the plan is printed in well under a second).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import shlex
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .gpu_check_plugin import RESULTS_ENV, empty_result, read_results

BUDGET_S = 480          # the whole script (a caller's outer time limit: 560 s leaves a margin)
MAX_FILES = 8           # at most this many files under $OUT (few, so that they are easy to copy back)
# what comes back under $OUT (logs.tar.gz is written by the shell script itself)
FILES = ("summary.md", "results.json", "table.md", "bars.png", "scaling.png", "logs.tar.gz")
PREFLIGHT_S = 120       # import torch + nvidia-smi + CUDA start-up on a cold, sandboxed machine
KILL_GRACE_S = 10       # timeout -k: SIGTERM at the limit, SIGKILL this much later
BENCH_BUDGET_S = 95     # python -m benchmarks --budget-s: no new row after this; the stage limit adds a margin
PYTEST_TIMEOUT_S = 90   # per test (pytest-timeout, where installed)
SANITIZER_TIMEOUT_S = 120  # the memcheck subprocess (tests/test_kernels_gpu.py reads this)
WARM_BUDGET_S = 100     # the untimed warm-up run of the same benchmark, beside the tests
XDIST_WORKERS = 12

# the GPU parity subset: every kernel and GPU test, less the slow random property
# tests (their targeted counterparts run), the benchmark/example smoke runs (the
# bench stage runs the CLI itself) and the sanitizer (its own stage)
TEST_MARKERS = "kernel or gpu"
TEST_DESELECT = "not test_properties and not gpu_quick_smoke and not example_smoke_gpu and not sanitizer"

@dataclass(frozen=True)
class Stage:
    name: str
    group: int
    limit_s: int
    argv: Tuple[str, ...]
    composes: str
    env: Dict[str, str] = field(default_factory=dict)

    def shell(self) -> str:
        prefix = ["env"] + [f"{k}={v}" for k, v in self.env.items()] if self.env else []
        return shlex.join(prefix + list(self.argv))


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def pytest_args(work: str, name: str) -> List[str]:
    """Options common to the pytest stages: verbose lines in the log, a junit XML,
    skip reasons, and the plugin that orders the tests and writes each result as
    it ends (to ``<name>.jsonl``: what a stage stopped at its limit keeps). No -x:
    a failure does not stop the others."""
    return ["-v", "-rfEs", "--durations=15", f"--junitxml={work}/{name}.xml", "-p", "benchmarks.gpu_check_plugin"]


def _results_env(work: str, name: str) -> Dict[str, str]:
    return {RESULTS_ENV: f"{work}/{name}.jsonl"}


def plan(py: str = "python3", work: str = "/tmp/gpu_check", out: str = "gpu_out") -> List[Stage]:
    m = [py, "-m"]
    tests = m + ["pytest", "tests", "-m", TEST_MARKERS, "-k", TEST_DESELECT] + pytest_args(work, "tests")
    if _has("xdist"):  # compiles dominate: spread them over the CPU cores
        tests += ["-n", str(XDIST_WORKERS)]
    if _has("pytest_timeout"):  # thread: ends a stuck worker (xdist starts another); signal: fails the one test
        tests += [f"--timeout={PYTEST_TIMEOUT_S}", f"--timeout-method={'thread' if _has('xdist') else 'signal'}"]
    sanitizer = m + ["pytest", "tests/test_kernels_gpu.py", "-k", "sanitizer"] + pytest_args(work, "sanitizer")
    bench = m + ["benchmarks", "--quick", "--dtypes", "bf16,fp32", "--modes", "fwd+bwd",
                 "--ops", "suppress,class_drop,loss", "--no-progress"]
    train = m + ["benchmarks", "--quick", "--ops", "train_step", "--no-sweep", "--no-plots", "--no-progress",
                 "--out", f"{work}/train_step"]
    return [
        Stage("preflight", 0, PREFLIGHT_S, tuple(m + ["benchmarks.gpu_check", "preflight", "--work", work]),
              "nvidia-smi, import torch, CUDA start-up, Triton, compute-sanitizer, optional modules (each timed); "
              "no CUDA device or past the limit: stop (exit 2), the summary still written"),
        Stage("tests", 1, 150, tuple(tests),
              f'pytest tests -m "{TEST_MARKERS}" -k "{TEST_DESELECT}" on CUDA tensors, parity first',
              env={"TORCHINDUCTOR_COMPILE_THREADS": "1",  # no compile pool per xdist worker
                   **_results_env(work, "tests")}),
        Stage("sanitizer", 1, 150, tuple(sanitizer),
              "compute-sanitizer memcheck on one small launch of each kernel (tests/test_kernels_gpu.py)",
              env=_results_env(work, "sanitizer")),
        Stage("bench_warm", 1, 150, tuple(bench + ["--no-sweep", "--no-plots", "--budget-s", str(WARM_BUDGET_S),
                                                    "--out", f"{work}/bench_warm"]),
              "beside the tests, the same benchmark (no sweeps): fills the torch.compile and Triton caches on disk "
              "so that the timed run compiles little; its times (GPU shared with the tests) are not reported"),
        Stage("bench", 2, 140, tuple(bench + ["--budget-s", str(BENCH_BUDGET_S), "--out", f"{work}/bench"]),
              f"python -m benchmarks: design §8 shapes, fwd+bwd, fused vs eager vs torch.compile, "
              f"N/C/B sweeps, budget {BENCH_BUDGET_S} s"),
        Stage("train_step", 3, 55, tuple(train),
              "python -m benchmarks --ops train_step: DeepLabV3-R50 B8 512x1024 bf16, with/without DropClass"),
        Stage("summary", 4, 15, tuple(m + ["benchmarks.gpu_check", "summary", "--work", work, "--out", out]),
              "design §8 goals (benchmarks/goals.py) + stage results -> summary.md, results.json"),
    ]


def group_budgets(stages: List[Stage]) -> Dict[int, int]:
    """Each group's budget: the longest limit among its stages."""
    groups: Dict[int, int] = {}
    for s in stages:
        groups[s.group] = max(groups.get(s.group, 0), s.limit_s)
    return groups


def critical_path_s(stages: List[Stage]) -> int:
    """Wall-clock bound of the plan: the group budgets, summed."""
    return sum(group_budgets(stages).values())


def group_starts(stages: List[Stage]) -> Dict[int, int]:
    """Seconds after the start by which each group starts (the earlier budgets, summed).
    The script gives a stage its limit plus what the earlier groups left unused
    (this start minus the time already spent, negative after an overrun)."""
    starts, t = {}, 0
    for g, budget in sorted(group_budgets(stages).items()):
        starts[g], t = t, t + budget
    return starts


def format_plan(stages: List[Stage]) -> str:
    starts = group_starts(stages)
    lines = [f"{'group':>5}  {'stage':<10}  {'limit':>6}  {'start':>6}  composes / command"]
    for s in stages:
        lines += [f"{s.group:>5}  {s.name:<10}  {s.limit_s:>5}s  {starts[s.group]:>5}s  {s.composes}",
                  f"{'':>35}$ {s.shell()}"]
    budgets = group_budgets(stages)
    terms = " + ".join(f"{'/'.join(s.name for s in stages if s.group == g)} {b}" for g, b in sorted(budgets.items()))
    lines += [f"budget per group (the longest limit of its stages; groups one after the other, a group's stages "
              f"side by side): {terms} = {critical_path_s(stages)} s of {BUDGET_S} s",
              f"a stage gets its limit plus what earlier groups left unused; worst case {critical_path_s(stages)} s "
              f"+ {KILL_GRACE_S} s kill grace + packing the logs",
              f"files back under $OUT ({len(FILES)} of {MAX_FILES}): {', '.join(FILES)}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- preflight

def find_sanitizer() -> Optional[str]:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for pattern in ("/usr/local/cuda*/bin/compute-sanitizer", "/opt/nvidia/*/compute-sanitizer",
                    "/usr/local/cuda*/compute-sanitizer/compute-sanitizer"):
        hits = sorted(Path("/").glob(pattern.lstrip("/")))
        if hits:
            return str(hits[-1])
    return None


NVIDIA_SMI_TIMEOUT_S = 45  # its first call on a cold machine starts the driver
# optional modules the stages use when present (the script needs none of them)
OPTIONAL = ("pytest", "xdist", "pytest_timeout", "torchvision", "segmentation_models_pytorch", "matplotlib")


def _nvidia_smi() -> Optional[Dict[str, str]]:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        res = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": f"{type(e).__name__}: {e}"[:200]}
    parts = [p.strip() for p in res.stdout.strip().splitlines()[0].split(",")] if res.stdout.strip() else []
    if len(parts) != 3:
        return {"error": f"exit {res.returncode}: {(res.stderr or res.stdout).strip()[:200]}"}
    return dict(zip(("name", "driver", "memory"), parts))


def preflight(work: Path) -> int:
    """Writes device.json after every step (``steps``: seconds each took; ``reached``:
    the step under way), so that a preflight stopped at its limit still tells where
    it was; exit 2 with one clear line when there is no CUDA device."""
    work.mkdir(parents=True, exist_ok=True)
    info = {"python": platform.python_version(), "kernel": platform.release(), "steps": {}, "reached": None}

    def save():
        (work / "device.json").write_text(json.dumps(info, indent=1))

    def step(name, fn):
        info["reached"] = name
        save()
        t = time.perf_counter()
        try:
            return fn()
        finally:
            info["steps"][name] = round(time.perf_counter() - t, 1)
            save()

    info["nvidia_smi"] = step("nvidia-smi", _nvidia_smi)
    info["modules"] = step("optional modules", lambda: {m: _has(m) for m in OPTIONAL})
    try:
        torch = step("import torch", lambda: importlib.import_module("torch"))
    except Exception as e:  # ImportError, or OSError from a CUDA library
        print(f"gpu_check: {sys.executable} cannot import torch ({e}; PYTHON=... names another python)",
              file=sys.stderr)
        return 2
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda)
    try:
        info["triton"] = step("import triton", lambda: importlib.import_module("triton").__version__)
    except Exception:
        info["triton"] = None
    if not step("CUDA available", torch.cuda.is_available):
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}: torch.cuda.is_available() is False). "
              "scripts/gpu_check.sh runs on a machine with an NVIDIA GPU (benchmarks/README.md); "
              "without a GPU use `make test` and `make bench`.", file=sys.stderr)
        return 2

    def start_cuda():  # a context and one kernel: what every later stage waits for first
        torch.ones(1, device="cuda").add_(1)
        torch.cuda.synchronize()
        return torch.cuda.get_device_properties(0)

    props = step("CUDA start-up", start_cuda)
    info.update(device=props.name, capability=f"sm_{props.major}{props.minor}", sms=props.multi_processor_count,
                memory_gib=round(props.total_memory / 2**30, 1), device_count=torch.cuda.device_count())
    info["compute_sanitizer"] = step("compute-sanitizer", find_sanitizer)
    info["reached"] = "done"
    save()
    print(json.dumps(info, indent=1))
    if info["triton"] is None:
        print("gpu_check: triton is not installed: the fused kernels cannot run", file=sys.stderr)
        return 2
    return 0


# ----------------------------------------------------------------------------- summary

def _stages_run(work: Path) -> Dict[str, dict]:
    """stages.tsv (written by the shell script): name, exit code, seconds, the limit given."""
    out = {}
    path = work / "stages.tsv"
    for line in path.read_text().splitlines() if path.exists() else []:
        name, rc, secs, *given = line.split("\t")
        rc = int(rc)
        state = "ok" if rc == 0 else ("timed out" if rc in (124, 137) else f"failed (exit {rc})")
        out[name] = {"rc": rc, "seconds": int(secs), "state": state}
        if given:
            out[name]["limit_given_s"] = int(given[0])
    return out


def junit(work: Path, name: str) -> Optional[dict]:
    """Counts, failures and skip reasons of a pytest stage: from the results log
    the plugin writes as each test ends (complete up to where a stage was
    stopped), else from the junit XML, else from the log's -v lines."""
    if (work / f"{name}.jsonl").exists():
        res = read_results(work / f"{name}.jsonl")
        if res is not None:
            return res
    xml = work / f"{name}.xml"
    try:
        cases = list(ET.parse(xml).getroot().iter("testcase")) if xml.exists() else None
    except ET.ParseError:
        cases = None
    if cases is not None:
        res = empty_result("junit")
        for case in cases:
            test = f"{case.get('classname', '')}::{case.get('name', '')}"
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            skip = case.find("skipped")
            if bad is not None:
                res["failed"] += 1
                msg = (bad.get("message") or "").strip().splitlines()
                res["failures"].append(f"{test}: {msg[0][:200] if msg else ''}")
            elif skip is not None:
                res["skipped"] += 1
                res["skips"].append(f"{test}: {(skip.get('message') or '')[:200]}")
            else:
                res["passed"] += 1
        return res
    log = work / f"{name}.log"
    if not log.exists():
        return None
    res = empty_result("log (no results log, no junit XML)")
    for line in log.read_text(errors="replace").splitlines():
        for word, key in (("PASSED", "passed"), ("FAILED", "failed"), ("ERROR", "failed"), ("SKIPPED", "skipped")):
            if f" {word}" in line and "::" in line:
                res[key] += 1
                if key == "failed":
                    res["failures"].append(line.strip()[:200])
                break
    return res


def _load(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _rows_note(res: Optional[dict]) -> str:
    """Row counts by status (op and sweep rows), the first reason of each non-ok
    status; the training step's times."""
    if res is None:
        return "no results.json"
    ts = [r for r in res["rows"] if r["kind"] == "train_step"]
    if ts and all(r["status"] == "ok" for r in ts):
        return ", ".join(f"{r['impl']} {r['median_ms']:.1f} ms" for r in ts) + f": +{ts[-1]['overhead_pct']:.1f} %"
    rows = [r for r in res["rows"] if r["kind"] in ("op", "sweep", "train_step")]
    counts: Dict[str, int] = {}
    reasons: Dict[str, str] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
        if r["status"] != "ok" and r.get("reason"):
            reasons.setdefault(r["status"], r["reason"][:80])
    return ", ".join(f"{n} {st}" + (f" ({reasons[st]})" if st in reasons else "") for st, n in sorted(counts.items()))


def _preflight_note(device: dict) -> str:
    """The steps' seconds; where a preflight that did not finish was."""
    steps = ", ".join(f"{k} {v:g} s" for k, v in (device.get("steps") or {}).items())
    reached = device.get("reached")
    return (steps or "no step timed") + ("" if reached in (None, "done") else f"; stopped in: {reached}")


def _stage_note(name: str, work: Path, bench: Optional[dict], train: Optional[dict]) -> str:
    if name == "preflight":
        return _preflight_note(_load(work / "device.json") or {})
    if name in ("tests", "sanitizer"):
        r = junit(work, name)
        if r is None:
            return "no result"
        done = r["passed"] + r["failed"] + r["skipped"]
        note = (f"{done} of {r['collected']} finished: " if r.get("collected") else "") + \
            f"{r['passed']} passed, {r['failed']} failed, {r['skipped']} skipped"
        if name == "sanitizer" and r["skips"]:
            note += f" ({r['skips'][0].split(': ', 1)[-1]})"
        return note
    if name in ("bench", "train_step"):
        return _rows_note(bench if name == "bench" else train)
    if name == "bench_warm":
        return _rows_note(_load(work / name / "results.json")) + " (caches filled; times not reported)"
    return ""


def _bad_rows(res: Optional[dict]) -> List[str]:
    return [f"{r['op']} {r.get('shape', '')} {r.get('dtype', '')} {r.get('impl', '')}: {r['status']}: {r['reason']}"[:200]
            for r in (res or {}).get("rows", []) if r["status"] in ("wrong", "error")]


def summary(work: Path, out: Path) -> int:
    from . import goals
    device = _load(work / "device.json") or {}
    bench = _load(work / "bench" / "results.json")
    train = _load(work / "train_step" / "results.json")
    stages = _stages_run(work)
    rows = (bench or {}).get("rows", []) + [r for r in (train or {}).get("rows", []) if r["kind"] == "train_step"]
    goal_list = goals.check(rows)
    tests = {name: junit(work, name) for name in ("tests", "sanitizer")}
    smi = device.get("nvidia_smi") or {}
    meta = (bench or train or {}).get("meta", {})
    head = [f"# debias_ops GPU check: {device.get('device', '?')} ({device.get('capability', '?')}, "
            f"{device.get('memory_gib', '?')} GiB), driver {smi.get('driver', '?')}, CUDA {device.get('torch_cuda')}",
            f"torch {device.get('torch')}, Triton {device.get('triton')}, Python {device.get('python')}, "
            f"kernel {device.get('kernel')}, commit {(meta.get('git_commit') or '?')[:10]}, {meta.get('timestamp', '')}",
            ""]
    table = [f"{'stage':<11}{'limit':>6}{'took':>6}  result"]
    for s in plan():
        run = stages.get(s.name)
        if s.name == "summary":
            continue
        if run is None:
            table.append(f"{s.name:<11}{s.limit_s:>5}s{'—':>6}  not run")
            continue
        note = _stage_note(s.name, work, bench, train)
        limit = run.get("limit_given_s", s.limit_s)
        table.append(f"{s.name:<11}{limit:>5}s{run['seconds']:>5}s  {run['state']}" + (f": {note}" if note else ""))
    if meta.get("copy_bandwidth_gbps"):
        table.append(f"device copy bandwidth {meta['copy_bandwidth_gbps']:.0f} GB/s (design §8: H200 ≈ 4300)")
    pre = stages.get("preflight")
    if pre is not None and pre["rc"] != 0:  # nothing else ran: say why, from the preflight's own words
        log = work / "preflight.log"
        tail = log.read_text(errors="replace").strip().splitlines()[-6:] if log.exists() else []
        table += ["", f"preflight {pre['state']} after {pre['seconds']} s: no other stage ran. "
                      f"Last lines of preflight.log:"] + [f"  {line[:200]}" for line in tail]
    modules = device.get("modules") or {}
    if modules:
        table.append("optional modules: " + ", ".join(f"{m} {'yes' if ok else 'no'}" for m, ok in modules.items()))
    n = {k: sum(g["status"] == k for g in goal_list) for k in ("met", "missed", "not measured")}
    body = ["", f"design §8 goals (fused path, this run): {n['met']} met, {n['missed']} missed, "
                f"{n['not measured']} not measured"] + ([goals.format_goals(goal_list)] if rows else [])
    failures = [f for r in tests.values() if r for f in r["failures"]] + _bad_rows(bench) + _bad_rows(train)
    if failures:
        body += ["", f"failed tests and benchmark rows ({len(failures)}; first 8, all in logs.tar.gz):"] + [f"  {f}" for f in failures[:8]]
    body += ["", f"files: {', '.join(FILES)}"]
    text = "\n".join(head + table + body) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(text)
    result = {"schema": "debias_ops.gpu_check/1", "device": device, "stages": stages,
              "plan": [{"name": s.name, "group": s.group, "limit_s": s.limit_s, "command": s.shell()} for s in plan()],
              "tests": tests, "goals": goal_list, "bench": bench, "train_step": train}
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    for name in ("table.md", "bars.png", "scaling.png"):
        if (work / "bench" / name).exists():
            shutil.copy(work / "bench" / name, out / name)
    print(text)
    return 0


# ----------------------------------------------------------------------------- CLI

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pl = sub.add_parser("plan", help="print the stage plan (scripts/gpu_check.sh --dry-run)")
    pl.add_argument("--tsv", action="store_true",
                    help="group, name, limit, group start, command per line (read by the script)")
    pl.add_argument("--json", action="store_true", help="the plan as JSON")
    pl.add_argument("--py", default="python3", help="the python the stages run")
    pl.add_argument("--work", default="$WORK", help="the stages' scratch folder")
    pl.add_argument("--out", default="$OUT", help="where the files that come back go")
    pf = sub.add_parser("preflight", help="device facts; exit 2 without a CUDA device")
    pf.add_argument("--work", required=True, type=Path)
    sm = sub.add_parser("summary", help="summary.md and results.json under --out")
    sm.add_argument("--work", required=True, type=Path)
    sm.add_argument("--out", required=True, type=Path)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.cmd == "plan":
        stages = plan(args.py, args.work, args.out)
        if args.tsv:
            starts = group_starts(stages)
            print("\n".join(f"{s.group}\t{s.name}\t{s.limit_s}\t{starts[s.group]}\t{s.shell()}" for s in stages))
        elif args.json:
            print(json.dumps({"budget_s": BUDGET_S, "critical_path_s": critical_path_s(stages), "files": list(FILES),
                              "kill_grace_s": KILL_GRACE_S, "group_starts": group_starts(stages),
                              "max_files": MAX_FILES,
                              "stages": [dict(name=s.name, group=s.group, limit_s=s.limit_s, argv=list(s.argv),
                                              env=s.env, composes=s.composes) for s in stages]}, indent=1))
        else:
            print(format_plan(stages))
        return 0
    if args.cmd == "preflight":
        return preflight(args.work)
    return summary(args.work, args.out)


if __name__ == "__main__":
    sys.exit(main())
