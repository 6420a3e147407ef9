"""The benchmark run behind ``python -m benchmarks`` (see METHOD.md).

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
from typing import Dict, List, Optional

import torch

from . import byte_model, cases, goals, timing
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
        return ["fused", "eager"]          # torch.compile cannot trace interpreted kernels (SPEC §9)
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


# ----------------------------------------------------------------------------- fits

def fit_line(xs: List[float], ys: List[float]) -> dict:
    """Least squares y = a + s·x; returns slope, intercept and R² (1 = perfectly linear)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    slope = sxy / sxx if sxx > 0 else float("nan")
    icpt = my - slope * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - (icpt + slope * x)) ** 2 for x, y in zip(xs, ys))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    return {"slope": slope, "intercept": icpt, "r2": r2}


def fits(rows: List[dict]) -> List[dict]:
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        if r["kind"] == "sweep" and r["status"] == "ok":
            key = (r["op"], r["sweep"]["param"], r["dtype"], r["impl"], r["device_kind"])
            groups.setdefault(key, []).append(r)
    out = []
    for (op, param, dtype, impl, kind), rs in sorted(groups.items()):
        if len(rs) < 2:
            continue
        xs = [float(r["sweep"]["elements"]) for r in rs]
        ys = [r["median_ms"] for r in rs]
        f = fit_line(xs, ys)
        per = [y * 1e6 / x for x, y in zip(xs, ys)]
        out.append({
            "op": op, "param": param, "dtype": dtype, "impl": impl, "device_kind": kind, "points": len(rs),
            "x": "elements (byte_model.sweep_elements)", "values": [r["sweep"]["value"] for r in rs],
            "slope_ns_per_element": f["slope"] * 1e6, "intercept_ms": f["intercept"], "r2": f["r2"],
            "ns_per_element_min": min(per), "ns_per_element_max": max(per),
        })
    return out


def add_speedups(rows: List[dict]) -> None:
    """× vs torch.compile: t(compile) / t(row), within the same op/shape/dtype/mode/device."""
    comp = {}
    for r in rows:
        if r["kind"] == "op" and r["impl"] == "compile" and r["status"] == "ok":
            comp[(r["op"], r["shape"], r["dtype"], r["mode"], r["device_kind"])] = r["median_ms"]
    for r in rows:
        if r["kind"] == "op" and r["status"] == "ok":
            c = comp.get((r["op"], r["shape"], r["dtype"], r["mode"], r["device_kind"]))
            if c is None and r["device_kind"] == "cpu-interpreter":
                c = None  # no compile under the interpreter
            r["speedup_vs_compile"] = c / r["median_ms"] if c and r["median_ms"] else None


# ----------------------------------------------------------------------------- output

def _f(v, fmt):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if fmt == "adaptive":  # GB/s on a GPU (thousands) and under the interpreter (fractions) alike
        return format(v, ".0f") if abs(v) >= 100 else format(v, ".3g")
    return format(v, fmt)


def format_table(rows: List[dict], markdown: bool = False) -> str:
    head = ["op", "shape", "dtype", "mode", "impl", "median ms", "GB/s", "% copy BW", "TFLOP/s", "× compile",
            "peak extra MiB", "status"]
    body = []
    skipped: Dict[tuple, int] = {}
    for r in rows:
        if r["kind"] != "op":
            continue
        if r["status"] == "skipped":  # one line per reason under the table, not one row each
            key = (r["op"], r["reason"])
            skipped[key] = skipped.get(key, 0) + 1
            continue
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
        body.append([r["op"], r["shape"], r["dtype"], r["mode"], r["impl"] + ("*" if r["backend"] == "triton-interpreter" else ""),
                     _f(r["median_ms"], ".3f"), _f(r["gbps"], "adaptive"), _f(r["pct_copy_bw"], ".1f"),
                     _f(r["tflops"], "adaptive"), _f(r["speedup_vs_compile"], ".2f"), _f(r["peak_extra_mib"], ".0f"),
                     status])
    notes = [f"skipped: {op} ({n} row{'s' if n > 1 else ''}): {why}" for (op, why), n in skipped.items()]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else []))
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    widths[-1] = len(head[-1])
    fmt = lambda cells: "  ".join(c.ljust(w) if i in (0, 1, 2, 3, 4, 11) else c.rjust(w)
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body] + notes)


def format_fits(fit_rows: List[dict], markdown: bool = False) -> str:
    head = ["op", "sweep", "dtype", "impl", "points", "slope ns/elem", "R²", "ns/elem min..max"]
    body = [[f["op"], f["param"], f["dtype"], f["impl"], str(f["points"]), _f(f["slope_ns_per_element"], ".4g"),
             _f(f["r2"], ".4f"), f"{f['ns_per_element_min']:.3g}..{f['ns_per_element_max']:.3g}"] for f in fit_rows]
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
                         ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(cells, widths))
                     for cells in [head, ["-" * w for w in widths]] + body)


def write_plots(result: dict, out: Path) -> List[str]:
    """bars.png (median ms per implementation) and scaling.png (time vs N, C, B with the fit)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots", file=sys.stderr)
        return []
    written = []
    rows = [r for r in result["rows"] if r["kind"] == "op" and r["status"] == "ok"]
    modes = [m for m in byte_model.MODES if any(r["mode"] == m for r in rows)]
    if rows and modes:
        impls = [i for i in cases.IMPLS if any(r["impl"] == i for r in rows)]
        fig, axes = plt.subplots(len(modes), 1, figsize=(max(8, 0.9 * len(rows) / max(len(impls), 1) / len(modes) + 4),
                                                         3.8 * len(modes)), squeeze=False)
        for ax, mode in zip(axes[:, 0], modes):
            groups = []
            for r in rows:
                g = (r["op"], r["shape"], r["dtype"], r["device_kind"])
                if r["mode"] == mode and g not in groups:
                    groups.append(g)
            width = 0.8 / max(len(impls), 1)
            for i, impl in enumerate(impls):
                ys = []
                for g in groups:
                    m = [r["median_ms"] for r in rows if (r["op"], r["shape"], r["dtype"], r["device_kind"]) == g
                         and r["mode"] == mode and r["impl"] == impl]
                    ys.append(m[0] if m else 0.0)
                ax.bar([j + i * width for j in range(len(groups))], ys, width, label=impl)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
            ax.set_xticklabels([f"{o}\n{s} {d}" + ("\n(interp.)" if k == "cpu-interpreter" else "")
                                for o, s, d, k in groups], fontsize=7)
            ax.set_yscale("log")
            ax.set_ylabel("median ms (log)")
            ax.set_title(f"{mode} — {result['meta']['device']}", fontsize=9)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "bars.png", dpi=110)
        plt.close(fig)
        written.append("bars.png")
    sweeps = [r for r in result["rows"] if r["kind"] == "sweep" and r["status"] == "ok"]
    if sweeps:
        ops = sorted({r["op"] for r in sweeps})
        params = ["N", "C", "B"]
        fig, axes = plt.subplots(len(ops), 3, figsize=(12, 3.4 * len(ops)), squeeze=False)
        for i, op in enumerate(ops):
            for j, param in enumerate(params):
                ax = axes[i, j]
                pts = sorted((r["sweep"]["elements"], r["median_ms"], r["sweep"]["value"]) for r in sweeps
                             if r["op"] == op and r["sweep"]["param"] == param)
                if not pts:
                    ax.set_visible(False)
                    continue
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                ax.plot(xs, ys, "o", label="measured")
                f = [x for x in result["fits"] if x["op"] == op and x["param"] == param]
                if f:
                    s, a = f[0]["slope_ns_per_element"] * 1e-6, f[0]["intercept_ms"]
                    ax.plot([0, max(xs)], [a, a + s * max(xs)], "-", alpha=0.6,
                            label=f"fit {f[0]['slope_ns_per_element']:.3g} ns/elem, R²={f[0]['r2']:.3f}")
                label = {"N": "N = H·W", "C": "K (classes)" if op == "loss" else "C", "B": "B"}[param]
                ax.set_title(f"{op}: time vs {label}", fontsize=9)
                ax.set_xlabel("elements streamed")
                ax.set_ylabel("median ms")
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "scaling.png", dpi=110)
        plt.close(fig)
        written.append("scaling.png")
    return written


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
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 reference at fp32 accuracy (SPEC §5)
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
        print("\nSPEC §8 goals (fused path, this run):")
        print(goals.format_goals(result["goals"]))
    if not cuda:
        print("(CPU mode: the small shapes fit in the CPU caches, so % copy BW can exceed 100 %.)")
    ts = [r for r in rows if r["kind"] == "train_step"]
    if ts and all(r["status"] == "ok" for r in ts):
        print("\nTraining step (DeepLabV3-ResNet50, B8 512×1024, bf16 autocast): "
              + ", ".join(f"{r['impl']} {r['median_ms']:.2f} ms" for r in ts)
              + f"; DropClass adds {ts[-1]['overhead_pct']:.1f} % (SPEC §8 goal: ≤ 2 %)")
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
            md += ["", "SPEC §8 goals (fused path, this run):", "", "```", goals.format_goals(result["goals"]), "```"]
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
