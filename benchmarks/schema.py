"""The JSON schema of a benchmark result (documented in results/README.md) and its validator.

Used by the CI test of the CLI (tests/test_benchmarks_cli.py); ``python -m
benchmarks.schema FILE`` checks a results.json by hand.
"""
from __future__ import annotations

import json
import sys

SCHEMA = "debias_ops.bench/1"
STATUSES = ("ok", "wrong", "error", "skipped")
KINDS = ("copy", "op", "sweep", "train_step")
DEVICE_KINDS = ("cuda", "cpu", "cpu-interpreter")

META_KEYS = {"device": str, "device_kind": str, "torch": str, "triton": (str, type(None)), "timestamp": str,
             "python": str, "command": str, "quick": bool, "mode": str, "copy_bandwidth_gbps": (int, float),
             "elapsed_s": (int, float)}
ROW_KEYS = {"kind": str, "device": str, "device_kind": str, "torch": str, "triton": (str, type(None)),
            "timestamp": str, "status": str, "op": str}
NUM = (int, float, type(None))
OP_ROW_KEYS = {"shape": str, "dims": dict, "dtype": str, "mode": str, "impl": str, "backend": str,
               "reason": (str, type(None)), "median_ms": NUM, "bytes": (int, type(None)), "byte_terms": dict,
               "flops": (int, type(None)), "floor_ms": NUM, "gbps": NUM, "pct_copy_bw": NUM, "tflops": NUM,
               "speedup_vs_compile": NUM, "peak_extra_mib": NUM, "first_call_s": NUM, "check": (dict, type(None)),
               "sweep": (dict, type(None))}
FIT_KEYS = {"op": str, "param": str, "dtype": str, "impl": str, "device_kind": str, "points": int,
            "values": list, "slope_ns_per_element": NUM, "intercept_ms": NUM, "r2": NUM,
            "ns_per_element_min": (int, float), "ns_per_element_max": (int, float)}


def _check(obj: dict, keys: dict, where: str) -> None:
    for k, types in keys.items():
        if k not in obj:
            raise ValueError(f"{where}: missing key {k!r}")
        if not isinstance(obj[k], types) or (types is int and isinstance(obj[k], bool)):
            raise ValueError(f"{where}: {k!r} = {obj[k]!r} is not {types}")


def validate(result: dict) -> None:
    """Raise ValueError if ``result`` does not follow the schema."""
    if result.get("schema") != SCHEMA:
        raise ValueError(f"schema must be {SCHEMA!r}, got {result.get('schema')!r}")
    _check(result.get("meta", {}), META_KEYS, "meta")
    rows = result.get("rows")
    if not isinstance(rows, list) or not rows:
        raise ValueError("rows must be a non-empty list")
    for i, row in enumerate(rows):
        where = f"rows[{i}]"
        _check(row, ROW_KEYS, where)
        if row["kind"] not in KINDS:
            raise ValueError(f"{where}: kind {row['kind']!r} not in {KINDS}")
        if row["status"] not in STATUSES:
            raise ValueError(f"{where}: status {row['status']!r} not in {STATUSES}")
        if row["device_kind"] not in DEVICE_KINDS:
            raise ValueError(f"{where}: device_kind {row['device_kind']!r} not in {DEVICE_KINDS}")
        if row["kind"] in ("op", "sweep"):
            _check(row, OP_ROW_KEYS, where)
            if row["status"] == "ok" and not (isinstance(row["median_ms"], (int, float)) and row["median_ms"] > 0):
                raise ValueError(f"{where}: an ok row needs a positive median_ms")
            if row["status"] != "ok" and row["median_ms"] is not None:
                raise ValueError(f"{where}: a {row['status']} row must not carry a time")
            if row["bytes"] is not None and sum(row["byte_terms"].values()) != row["bytes"]:
                raise ValueError(f"{where}: bytes != sum of byte_terms")
            if row["kind"] == "sweep" and not {"param", "value", "elements"} <= set(row["sweep"] or {}):
                raise ValueError(f"{where}: a sweep row needs sweep.param/value/elements")
    fits = result.get("fits")
    if not isinstance(fits, list):
        raise ValueError("fits must be a list")
    for i, f in enumerate(fits):
        _check(f, FIT_KEYS, f"fits[{i}]")


if __name__ == "__main__":  # pragma: no cover
    for path in sys.argv[1:]:
        validate(json.load(open(path)))
        print(f"{path}: ok")
