"""pytest configuration of the benchmark suite (``pytest benchmarks/ --benchmark-only``).

Not collected by ``pytest`` / ``pytest tests`` (pytest.ini's testpaths is ``tests``).
The suite must run serially: timings of concurrent workers sharing one GPU are meaningless.
"""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

try:
    import pytest_benchmark  # noqa: F401
except ImportError:  # keep the suite collectable; every benchmark skips
    @pytest.fixture
    def benchmark():
        pytest.skip("pytest-benchmark not installed (pip install pytest-benchmark)")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")
    workers = getattr(config.option, "numprocesses", None)
    if workers not in (None, 0, "0"):
        raise pytest.UsageError("the benchmark suite runs serially: drop -n/--numprocesses (pytest-xdist)")
