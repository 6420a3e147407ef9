"""The benchmark run behind ``python -m benchmarks`` (see benchmarks/README.md).

GPU mode: copy bandwidth, then every (op, shape, dtype, mode, implementation)
checked against the reference and timed, then the N / C / B sweeps, then the
table, JSON and plots. CPU mode: the same at a small shape with the reference
and torch.compile on CPU, plus the fused path under the Triton interpreter at
a tiny shape, in a subprocess started with ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import datetime as _dt
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import torch

from . import byte_model, cases, goals, timing
from .report import add_speedups, fits, format_fits, format_table, write_plots
from .schema import SCHEMA
from .shapes import CPU_SHAPES, DTYPES, GPU_SHAPES, TINY_SHAPES, Shape, dtype_name, sweep_points

ROOT = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- environment

def triton_version() -> Optional[str]:
    try:
        import triton
        return triton.__version__
    except Exception:
        return None


def device_name(device: torch.device, interpreter: bool = False) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} threads visible)"
    return name + (" under the Triton interpreter" if interpreter else "")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-").replace("--", "-")[:40]


class Progress:
    """tqdm when installed, else one line per step on stderr."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.n, self.enabled = total, 0, enabled
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc=desc, unit="run", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                print(f"{desc}: {total} runs (install tqdm for a progress bar)", file=sys.stderr)

    def step(self, label: str) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(1)
        elif self.enabled:
            print(f"[{self.n}/{self.total}] {label}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- one measurement

class Runner:
    def __init__(self, args, device: torch.device, interpreter: bool = False):
        self.args = args
        self.device = device
        self.interpreter = interpreter
        self.t0 = time.perf_counter()
        self.copy_gbps: Optional[float] = None
        self.env = {
            "device": device_name(device, interpreter),
            "device_kind": "cuda" if device.type == "cuda" else ("cpu-interpreter" if interpreter else "cpu"),
            "torch": torch.__version__,
            "triton": triton_version(),
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over_budget(self) -> bool:
        return self.args.budget_s is not None and self.elapsed() > self.args.budget_s

    def base_row(self, kind: str, **kw) -> dict:
        row = {"kind": kind, **self.env, "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        row.update(kw)
        return row

    def _backend_label(self, case: cases.Case, impl: str) -> str:
        if impl == "fused":
            return "triton-interpreter" if self.interpreter else "triton"
        return "inductor" if impl == "compile" else "reference"

    def op_row(self, case: cases.Case, impl: str, sweep: Optional[dict] = None) -> dict:
        tr = byte_model.traffic(case.op, case.shape, case.dtype, case.mode)
        return self.base_row(
            "sweep" if sweep else "op", op=case.op, shape=case.shape.name, dims=case.shape.as_dict(),
            dtype=dtype_name(case.dtype), mode=case.mode, impl=impl, backend=self._backend_label(case, impl),
            status="pending", reason=None, median_ms=None, bytes=tr.bytes, byte_terms=tr.terms, flops=tr.flops,
            floor_ms=tr.floor_ms(self.copy_gbps), gbps=None, pct_copy_bw=None, tflops=None,
            speedup_vs_compile=None, peak_extra_mib=None, first_call_s=None, check=None,
            sweep=sweep,
        )

    def measure(self, case: cases.Case, impl: str, ref, sweep: Optional[dict] = None) -> dict:
        """Check ``impl`` against the reference outputs ``ref``, then time it.

        A result that differs from the reference is reported as ``wrong`` and
        never timed; an implementation without a reference to compare with is
        not timed either (``error``).
        """
        row = self.op_row(case, impl, sweep)
        if case.forwards.get(impl) is None:
            row.update(status="skipped", reason=f"{impl} not run here")
            return row
        if self.over_budget():
            row.update(status="skipped", reason=f"time budget of {self.args.budget_s:.0f} s spent")
            return row
        try:
            with case.context(impl):
                t = time.perf_counter()
                got = case.result(impl)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                row["first_call_s"] = round(time.perf_counter() - t, 3)
                if impl == "eager":
                    row["check"] = {"ok": True, "note": "the reference itself"}
                elif ref is None:
                    row.update(status="error", reason="no reference result to check against: not timed")
                    return row
                else:
                    row["check"] = case.check(got, ref)
                    if not row["check"]["ok"]:
                        row.update(status="wrong", reason=f"differs from the reference in {row['check']['worst']} "
                                                          f"({row['check']['max_err_over_tol']:.3g}× the tolerance): not timed")
                        return row
                del got
                step = case.step(impl)
                row["peak_extra_mib"] = timing.peak_extra_mib(step, self.device, case.leaves)
                if self.interpreter:
                    ms = timing.cpu_bench(step, min_time_s=0.05, max_reps=3, min_reps=1, warmup=0,
                                          grad_to_none=case.leaves)
                else:
                    ms = timing.bench(step, self.device, quick=self.args.quick, grad_to_none=case.leaves,
                                      cpu_min_time_s=0.1 if self.args.quick else 0.2)
        except Exception as err:  # report, keep going
            msg = f"{type(err).__name__}: {err}".strip().splitlines()[0][:300]
            row.update(status="error", reason=msg)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return row
        tr = byte_model.traffic(case.op, case.shape, case.dtype, case.mode)
        row.update(status="ok", median_ms=ms, gbps=tr.gbps(ms), tflops=tr.tflops(ms))
        if row["gbps"] is not None and self.copy_gbps:
            row["pct_copy_bw"] = 100.0 * row["gbps"] / self.copy_gbps
        return row

    def run_case(self, op: str, shape: Shape, dtype: torch.dtype, mode: str, impls, progress: Progress,
                 sweep: Optional[dict] = None) -> List[dict]:
        label = f"{op} {shape.name} {dtype_name(dtype)} {mode}"
        try:
            case = cases.make_case(op, shape, dtype, mode, self.device, with_compile="compile" in impls)
        except cases.Skip as why:
            rows = []
            for impl in impls:
                progress.step(f"{label} {impl}")
                c = cases.Case(op, shape, dtype, mode, self.device)
                rows.append(self.op_row(c, impl, sweep))
                rows[-1].update(status="skipped", reason=str(why))
            return rows
        except Exception as err:
            rows = []
            for impl in impls:
                progress.step(f"{label} {impl}")
                c = cases.Case(op, shape, dtype, mode, self.device)
                rows.append(self.op_row(c, impl, sweep))
                rows[-1].update(status="error", reason=f"building inputs: {type(err).__name__}: {err}"[:300])
            return rows
        rows = []
        ref = None
        # the reference first: its outputs are what every other implementation is checked against
        order = ["eager"] + [i for i in impls if i != "eager"]
        for impl in order:
            if impl == "eager" and "eager" not in impls:
                try:
                    with case.context("eager"):
                        ref = case.result("eager")
                except Exception:
                    ref = None
                continue
            progress.step(f"{label} {impl}")
            if impl == "eager":
                try:
                    with case.context("eager"):
                        ref = case.result("eager")
                except Exception:
                    ref = None
            rows.append(self.measure(case, impl, ref, sweep))
        del case, ref
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return rows


# ----------------------------------------------------------------------------- plan

def _plan(args, mode: str):
    if mode == "gpu":
        shapes = [GPU_SHAPES[s] for s in args.shapes]
        dtypes = [DTYPES[d] for d in args.dtypes]
    elif mode == "cpu":
        shapes, dtypes = list(CPU_SHAPES.values()), [torch.float32]
    else:  # tiny: the interpreter child and --cpu-tiny
        shapes = list(TINY_SHAPES.values())
        dtypes = [torch.float32] if (args.cpu_tiny or args.quick) else [torch.float32, torch.bfloat16]
    ops = [o for o in args.ops if o != "train_step"]
    return [(op, s, d, m) for op in ops for s in shapes for d in dtypes for m in args.modes]


def _impls(args, mode: str, interpreter: bool) -> List[str]:
    if interpreter:
        return ["fused", "eager"]          # torch.compile cannot trace interpreted kernels (design §9)
    impls = list(args.impls)
    if mode != "gpu":
        impls = [i for i in impls if i != "fused"]  # CPU tensors: the fused rows come from the interpreter run
    if args.no_compile:
        impls = [i for i in impls if i != "compile"]
    return impls


def _sweep_plan(args, mode: str):
    if args.no_sweep:
        return []
    pts = sweep_points("gpu" if mode == "gpu" else ("tiny" if args.cpu_tiny else "cpu"), args.quick)
    return [(op, param, value, shape) for op, lst in pts.items() if op in args.ops for (param, value, shape) in lst]


# ----------------------------------------------------------------------------- interpreter child

def run_interpreter_child(args) -> List[dict]:
    """Re-run this CLI in a subprocess with TRITON_INTERPRET=1 (it must be set
    before triton is imported) for the fused rows at the tiny shape."""
    try:
        import triton  # noqa: F401
    except ImportError:
        print("triton not installed: the fused kernels under the Triton interpreter are not run", file=sys.stderr)
        return []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "benchmarks", "--interpreter-child", "--json-out", str(path),
               "--ops", ",".join(args.ops), "--modes", ",".join(args.modes)]
        if args.cpu_tiny:
            cmd.append("--cpu-tiny")
        if args.quick:
            cmd.append("--quick")
        env = dict(os.environ, TRITON_INTERPRET="1", DEBIAS_OPS_BACKEND="triton")
        env.setdefault("OMP_NUM_THREADS", "1")
        try:
            proc = subprocess.run(cmd, env=env, cwd=str(ROOT.parent), capture_output=True, text=True,
                                  timeout=args.interpreter_timeout_s)
        except subprocess.TimeoutExpired:
            print(f"the Triton-interpreter run took over {args.interpreter_timeout_s} s: stopped", file=sys.stderr)
            return []
        if proc.returncode != 0 or not path.exists():
            print("the Triton-interpreter run failed:\n" + proc.stderr[-3000:], file=sys.stderr)
            return []
        return json.loads(path.read_text())["rows"]


# ----------------------------------------------------------------------------- main

def main(args) -> int:
    cuda = torch.cuda.is_available() and not (args.cpu or args.cpu_tiny)
    if args.interpreter_child:
        return _child(args)
    mode = "gpu" if cuda else "cpu"
    if not torch.cuda.is_available() and not (args.cpu or args.cpu_tiny):
        print("No CUDA GPU found: running the small CPU mode (reference vs torch.compile on CPU, "
              "fused kernels under the Triton interpreter at a tiny shape) -- CPU numbers, not the GPU benchmark.")
    if args.budget_s is None:
        args.budget_s = 480.0 if cuda else 100.0
    device = torch.device("cuda") if cuda else torch.device("cpu")
    runner = Runner(args, device)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 reference at fp32 accuracy (design §5)
    shape_mode = mode if not args.cpu_tiny else "tiny"
    plan = _plan(args, shape_mode)
    impls = _impls(args, mode, False)
    splan = _sweep_plan(args, mode)
    sweep_impl = "fused" if mode == "gpu" else "eager"
    total = 1 + len(plan) * len(impls) + len(splan)
    progress = Progress(total, f"debias_ops bench ({runner.env['device']})", enabled=not args.no_progress)
    rows: List[dict] = []

    # 1. the ceiling: device copy bandwidth
    nbytes = (1 << 30 if not args.quick else 256 << 20) if cuda else (64 << 20 if not args.cpu_tiny else 16 << 20)
    runner.copy_gbps = timing.copy_bandwidth_gbps(device, nbytes, quick=args.quick)
    rows.append(runner.base_row("copy", op="copy", bytes=2 * (nbytes // 4) * 4, gbps=runner.copy_gbps,
                                status="ok", note="dst.copy_(src) of fp32, read + write counted"))
    progress.step("copy bandwidth")

    # 2. the table
    for op, shape, dtype, m in plan:
        rows += runner.run_case(op, shape, dtype, m, impls, progress)

    # 3. sweeps (fwd+bwd; fused checked against the reference at every point on the GPU)
    sweep_dtype = torch.bfloat16 if cuda else torch.float32
    for op, param, value, shape in splan:
        shape = shape.with_(name=f"sweep-{param}={value}")
        sw = {"param": param, "value": value, "elements": byte_model.sweep_elements(op, shape)}
        label = f"sweep {op} {param}={value}"
        if runner.over_budget():
            progress.step(label)
            c = cases.Case(op, shape, sweep_dtype, "fwd+bwd", device)
            r = runner.op_row(c, sweep_impl, sw)
            r.update(status="skipped", reason="time budget spent")
            rows.append(r)
            continue
        # on the GPU the reference runs untimed, only for the check
        rows += runner.run_case(op, shape, sweep_dtype, "fwd+bwd", [sweep_impl], Progress(0, "", enabled=False),
                                sweep=sw)
        progress.step(label)
    progress.close()

    # 4. the fused kernels under the Triton interpreter (CPU mode)
    if not cuda and not args.no_interpreter:
        t = time.perf_counter()
        child_rows = run_interpreter_child(args)
        rows += child_rows
        if child_rows:
            print(f"Triton-interpreter run: {len(child_rows)} rows in {time.perf_counter() - t:.1f} s", file=sys.stderr)

    # 5. the optional DeepLabV3-ResNet50 training-step row
    if "train_step" in args.ops:
        from . import train_step
        if runner.over_budget():
            rows += train_step._rows(runner, "skipped", "time budget spent")
        else:
            rows += train_step.run(runner, quick=args.quick)

    add_speedups(rows)
    result = {
        "schema": SCHEMA,
        "meta": {
            **runner.env,
            "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(),
            "command": " ".join([os.path.basename(sys.executable), "-m", "benchmarks"] + sys.argv[1:]),
            "quick": bool(args.quick),
            "mode": "gpu" if cuda else ("cpu-tiny" if args.cpu_tiny else "cpu"),
            "copy_bandwidth_gbps": runner.copy_gbps,
            "elapsed_s": None,
            "k": cases.K_TOPK,
            "git_commit": _git_commit(),
        },
        "rows": rows,
        "fits": fits(rows),
    }
    if cuda:
        result["goals"] = goals.check(rows)
    result["meta"]["elapsed_s"] = round(runner.elapsed(), 1)

    bw_note = f"copy bandwidth {runner.copy_gbps:.0f} GB/s (the ceiling for GB/s and % copy BW)"
    print(f"\n{result['meta']['device']} — torch {runner.env['torch']}, triton {runner.env['triton']} — {bw_note}")
    print(format_table(rows))
    if any(r.get("backend") == "triton-interpreter" for r in rows):
        print("* fused under the Triton interpreter (CPU, tiny shape): checks correctness; its time is not a speed")
    if result["fits"]:
        print("\nScaling (fwd+bwd, time = a + slope·elements):")
        print(format_fits(result["fits"]))
    if result.get("goals"):
        print("\ndesign §8 goals (fused path, this run):")
        print(goals.format_goals(result["goals"]))
    if not cuda:
        print("(CPU mode: the small shapes fit in the CPU caches, so % copy BW can exceed 100 %.)")
    ts = [r for r in rows if r["kind"] == "train_step"]
    if ts and all(r["status"] == "ok" for r in ts):
        print("\nTraining step (DeepLabV3-ResNet50, B8 512×1024, bf16 autocast): "
              + ", ".join(f"{r['impl']} {r['median_ms']:.2f} ms" for r in ts)
              + f"; DropClass adds {ts[-1]['overhead_pct']:.1f} % (design §8 goal: ≤ 2 %)")
    elif ts:
        print(f"\nTraining step row: {ts[-1]['status']}: {ts[-1]['reason']}")
    bad = [r for r in rows if r["status"] in ("wrong", "error")]

    if args.json_out:
        Path(args.json_out).write_text(_dumps(result))
    if not args.no_write:
        out = Path(args.out) if args.out else ROOT / "results" / (
            f"{_slug(result['meta']['device'] if cuda else 'cpu')}-{_dt.datetime.now(_dt.timezone.utc):%Y%m%d-%H%M%S}")
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(_dumps(result))
        md = [f"# debias_ops benchmark — {result['meta']['device']}", "",
              f"torch {runner.env['torch']}, triton {runner.env['triton']}, {result['meta']['timestamp']}, "
              f"`{result['meta']['command']}`; {bw_note}.", "", format_table(rows, markdown=True)]
        if result["fits"]:
            md += ["", "Scaling (fwd+bwd, time = a + slope·elements):", "", format_fits(result["fits"], markdown=True)]
        if result.get("goals"):
            md += ["", "design §8 goals (fused path, this run):", "", "```", goals.format_goals(result["goals"]), "```"]
        (out / "table.md").write_text("\n".join(md) + "\n")
        written = ["results.json", "table.md"]
        if not args.no_plots:
            written += write_plots(result, out)
        print(f"\nwrote {', '.join(written)} to {out}  ({result['meta']['elapsed_s']} s)")
    if bad:
        print(f"{len(bad)} measurement(s) wrong or failed: see the status column", file=sys.stderr)
    # exit 1 when the library's own (fused) result is wrong; a wrong torch.compile of the
    # reference is reported in the table but is not this library's failure
    return 1 if any(r["status"] == "wrong" and r.get("impl") == "fused" for r in rows) else 0


def _child(args) -> int:
    """The interpreter part: fused vs reference at the tiny shape, TRITON_INTERPRET=1 already set."""
    device = torch.device("cpu")
    runner = Runner(args, device, interpreter=True)
    plan = _plan(args, "tiny")
    impls = ["fused", "eager"]
    progress = Progress(len(plan) * len(impls), "Triton interpreter", enabled=False)
    rows: List[dict] = []
    for op, shape, dtype, m in plan:
        rows += runner.run_case(op, shape, dtype, m, impls, progress)
    Path(args.json_out).write_text(_dumps({"rows": rows}))
    return 0


def _clean(obj):
    """JSON-safe: non-finite floats (an infinite error ratio, a NaN fit) become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _dumps(result: dict) -> str:
    return json.dumps(_clean(result), indent=1, allow_nan=False)


def _git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=str(ROOT), capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except Exception:
        return None
