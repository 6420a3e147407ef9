import sys
from pathlib import Path

import pytest

# Tests run against the source tree (the repository root first on sys.path);
# `debias_ops/kernels` is a link to `kernels/`, so `debias_ops.kernels` imports here as
# it does installed (setup.py maps `kernels/` to that name).
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_configure(config):
    config.addinivalue_line("markers", "kernel: compares Triton kernels with the reference (GPU or interpreter)")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")
    config.addinivalue_line("markers", "slow: long-running")
    # pytest-timeout's marker, registered here too so a run without the plugin does not warn
    config.addinivalue_line("markers", "timeout(seconds): fail a test that runs longer (pytest-timeout)")
    config.addinivalue_line("markers", "aot: offline compile checks per target GPU, no GPU needed (tests/test_aot_targets.py)")


@pytest.fixture
def one_thread():
    """Torch on one CPU thread for the test (restored after): small models on a shared
    machine run faster without threads that only spin. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    import torch
    torch.manual_seed(0)
    yield
    if torch.cuda.is_initialized():  # hand cached blocks back: pytest-xdist workers share one GPU
        torch.cuda.empty_cache()
