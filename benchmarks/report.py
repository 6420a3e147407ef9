"""The benchmark run's numbers turned into output: scaling fits, × vs torch.compile,
the roofline table (text and markdown) and the plots (bars.png, scaling.png).

``benchmarks/run.py`` measures; this module only reads its rows (schema:
``benchmarks/results/README.md``).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Dict, List

from . import byte_model, cases

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
            c = comp.get((r["op"], r["shape"], r["dtype"], r["mode"], r["device_kind"]))  # None: no compile row
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
