"""design §8's goals for the fused path, checked against a run's rows.

Each goal reads rows of the same run (fused vs its peers, measured together)
and says ``met``, ``missed`` or ``not measured``. Printed under the table and
stored as ``goals`` in results.json. Only GPU rows (``device_kind == "cuda"``)
count: CPU and interpreter numbers say nothing about these goals.
"""
from __future__ import annotations

from typing import List, Optional

from .shapes import GPU_SHAPES


def _row(rows, op, shape, dtype, impl, mode="fwd+bwd") -> Optional[dict]:
    for r in rows:
        if (r.get("kind") == "op" and r.get("device_kind") == "cuda" and r["op"] == op and r["shape"] == shape
                and r["dtype"] == dtype and r["impl"] == impl and r["mode"] == mode and r["status"] == "ok"):
            return r
    return None


def _A_mib(shape: str, dtype: str) -> float:
    s = GPU_SHAPES[shape]
    size = {"bf16": 2, "fp16": 2, "fp32": 4}[dtype]
    return s.B * s.C * s.N * size / 2**20


def _goal(name: str, value: Optional[float], limit: float, unit: str, le: bool = True) -> dict:
    d = {"goal": name, "value": value, "limit": limit, "unit": unit, "direction": "<=" if le else ">="}
    if value is None:
        return dict(d, status="not measured")
    ok = value <= limit if le else value >= limit
    return dict(d, status="met" if ok else "missed")


def check(rows: List[dict]) -> List[dict]:
    out = []
    g = lambda *a, **k: _row(rows, *a, **k)
    ms = lambda r: r["median_ms"] if r else None
    # suppress
    for shape, dtype, limit in (("W48", "bf16", 1.2), ("W48", "fp32", 3.0), ("W18s", "bf16", 0.6)):
        out.append(_goal(f"suppress {shape} {dtype} fwd+bwd time", ms(g("suppress", shape, dtype, "fused")), limit, "ms"))
    r = g("suppress", "W48", "bf16", "fused")
    out.append(_goal("suppress W48 bf16 fwd+bwd × vs torch.compile", r and r["speedup_vs_compile"], 6.0, "×", le=False))
    for shape in ("W48", "W18s"):
        for dtype in ("bf16", "fp32"):
            r = g("suppress", shape, dtype, "fused")
            v = r["peak_extra_mib"] / _A_mib(shape, dtype) if r and r["peak_extra_mib"] is not None else None
            out.append(_goal(f"suppress {shape} {dtype} peak extra memory", v, 2.2, "× |A|"))
    # class_drop: ≤ 1.15 × its byte floor
    for shape in ("W48", "W18s"):
        for dtype in ("bf16", "fp32"):
            r = g("class_drop", shape, dtype, "fused")
            v = r["median_ms"] / r["floor_ms"] if r and r.get("floor_ms") else None
            out.append(_goal(f"class_drop {shape} {dtype} fwd+bwd / byte floor", v, 1.15, "×"))
    # loss: ≥ 10× torch.compile, peak ≤ 5 % of the eager reference's
    for shape in ("W48", "W18s"):
        for dtype in ("fp32", "bf16"):
            r = g("loss", shape, dtype, "fused")
            out.append(_goal(f"loss {shape} {dtype} fwd+bwd × vs torch.compile", r and r["speedup_vs_compile"], 10.0,
                             "×", le=False))
            e = g("loss", shape, dtype, "eager")
            v = (r["peak_extra_mib"] / e["peak_extra_mib"] if r and e and r["peak_extra_mib"] is not None
                 and e["peak_extra_mib"] else None)
            out.append(_goal(f"loss {shape} {dtype} peak memory / eager's", v, 0.05, "×"))
    # whole training step
    ts = [r for r in rows if r.get("kind") == "train_step" and r["status"] == "ok" and r.get("overhead_pct") is not None]
    out.append(_goal("DeepLabV3-R50 step: DropClass overhead", ts[0]["overhead_pct"] if ts else None, 2.0, "%"))
    return out


def format_goals(goals: List[dict]) -> str:
    lines = []
    for x in goals:
        v = "—" if x["value"] is None else f"{x['value']:.3g}"
        op = "≤" if x["direction"] == "<=" else "≥"
        lines.append(f"  [{x['status']:>12}] {x['goal']}: {v} {x['unit']} (goal {op} {x['limit']} {x['unit']})")
    return "\n".join(lines)
