"""pytest plugin of the GPU check's pytest stages (``-p benchmarks.gpu_check_plugin``),
and the reader of what it writes.

What a stage that is stopped at its time limit keeps:

* the tests run in ``PRIORITY`` order: each fused op's parity tests first, then
  the other kernel tests, the GPU feature tests (compile, CUDA graphs, opcheck,
  determinism), the heavy ones last (with pytest-xdist: the order of dispatch);
* one JSON line per finished test in the file ``$DEBIAS_OPS_GPU_CHECK_RESULTS``
  names, written and flushed as each test ends (pytest writes its junit XML only
  at the end); a first line gives the number of tests collected;
* SIGTERM (``timeout``'s signal) becomes KeyboardInterrupt, so pytest still
  writes its junit XML and its summary of what finished.

Inactive unless that variable is set; in pytest-xdist workers it only orders
(the controller receives every worker's reports). Imports neither torch nor
pytest: ``benchmarks/gpu_check.py`` reads the results with ``read_results``.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Optional

RESULTS_ENV = "DEBIAS_OPS_GPU_CHECK_RESULTS"

PARITY = ("test_class_drop_shapes_dtypes_layouts", "test_suppress_gate_level", "test_class_importance",
          "test_parity_ratios", "test_moments_shapes_dtypes", "test_half_dtypes", "test_gpu_spec_shape_parity",
          "test_gpu_cityscapes_parity", "test_gpu_matches_cpu_reference")
HEAVY = ("test_moments_gpu_full_size", "test_gpu_more_than_2_31_elements", "test_moments_gpu_int64_offsets",
         "test_gpu_peak_memory_w48", "test_study_smoke_gpu")
PRIORITY = ("parity", "kernel", "gpu", "heavy")


def priority(name: str, markers) -> int:
    """Rank of a test (its function name, its marker names) in ``PRIORITY``."""
    if name in PARITY:
        return 0
    if name in HEAVY:
        return 3
    return 1 if "kernel" in markers else 2


# ----------------------------------------------------------------------------- the plugin

def _path() -> Optional[str]:
    return os.environ.get(RESULTS_ENV)


def _write(record: dict) -> None:
    with open(_path(), "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def _worker() -> bool:
    return "PYTEST_XDIST_WORKER" in os.environ


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}: the stage's time limit")


def pytest_configure(config):
    if _path() and not _worker():
        signal.signal(signal.SIGTERM, _interrupt)


def pytest_collection_modifyitems(session, config, items):
    if _path():  # a stable sort: the collection order within a rank
        items.sort(key=lambda item: priority(getattr(item, "originalname", None) or item.name,
                                             {m.name for m in item.iter_markers()}))


def pytest_collection_finish(session):
    # without xdist the controller collects; with it, the first worker speaks for all
    if _path() and os.environ.get("PYTEST_XDIST_WORKER", "gw0") == "gw0":
        _write({"collected": len(session.items)})


def pytest_runtest_logreport(report):
    if not _path() or _worker():
        return
    if report.when != "call" and report.outcome == "passed":  # setup/teardown: only when they fail or skip
        return
    message = ""
    if report.outcome != "passed" and report.longrepr is not None:
        if isinstance(report.longrepr, tuple):  # a skip: (file, line, reason)
            message = str(report.longrepr[2])
        else:
            crash = getattr(report.longrepr, "reprcrash", None)
            message = crash.message if crash is not None else str(report.longrepr)
    first = message.strip().splitlines()[0][:200] if message.strip() else ""
    _write({"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
            "seconds": round(report.duration, 2), "message": first})


# ----------------------------------------------------------------------------- the reader

def empty_result(source: str) -> dict:
    return {"source": source, "collected": None, "passed": 0, "failed": 0, "skipped": 0, "failures": [], "skips": []}


def read_results(path: Path) -> Optional[dict]:
    """Counts, failures and skip reasons from the JSON lines; a test's outcome is
    that of its worst phase (failed > skipped > passed). None: nothing written."""
    res, final = empty_result("results log"), {}
    rank = {"passed": 0, "skipped": 1, "failed": 2}
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut short by SIGKILL
            continue
        if "collected" in rec:
            res["collected"] = rec["collected"]
        elif rank.get(rec.get("outcome"), -1) >= rank.get(final.get(rec.get("nodeid"), {}).get("outcome"), -1):
            final[rec["nodeid"]] = rec
    if not final and res["collected"] is None:
        return None
    for node, rec in final.items():
        res[rec["outcome"]] += 1
        if rec["outcome"] == "failed":
            res["failures"].append(f"{node}: {rec.get('message', '')}")
        elif rec["outcome"] == "skipped":
            res["skips"].append(f"{node}: {rec.get('message', '')}")
    return res
