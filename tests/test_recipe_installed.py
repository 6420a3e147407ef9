"""The recipe as a user installs it: ``pip install "debias_ops[train]"`` then the
``debias-ops-train`` console script, from any folder (here: a temporary one, with the
checkout off the import path, so the installed copy is what runs).

The test command installs the package non-editable into its environment first
(scripts/env.sh), so these tests check the packaging itself: the recipe's modules,
the console-script entry point and the kernels' install path.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchvision")
pytest.importorskip("torchmetrics")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).parent / "debias-ops-train"


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DEBIAS_OPS_BACKEND", "TRITON_INTERPRET")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _script() -> Path:
    if not SCRIPT.is_file():
        pytest.skip(f"{SCRIPT} not found: the package is not installed in this environment (make test installs it)")
    return SCRIPT


def _run(args, cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(_script()), *args], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_installed_copy_is_what_runs_outside_the_checkout(tmp_path):
    _script()
    code = "import debias_ops.recipe.cli as c, debias_ops.kernels as k; print(c.__file__); print(k.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for line in proc.stdout.split():
        assert "site-packages" in Path(line).parts, f"not the installed copy: {line}"


def test_console_script_help(tmp_path):
    proc = _run(["--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--data", "--model", "--dropclass", "--resume", "--out", "--context-stats"):
        assert flag in proc.stdout, flag


@pytest.mark.timeout(300)
def test_console_script_two_steps_on_synthetic_data(tmp_path):
    proc = _run(["--data", "synthetic", "--model", "lraspp_mobilenet_v3_large", "--dropclass", "--n-train", "8",
                 "--n-val", "4", "--steps", "2", "--batch", "2", "--log-every", "1", "--ckpt-every", "2",
                 "--workers", "0", "--device", "cpu", "--no-progress", "--out", "run"], tmp_path, timeout=280)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert [r["step"] for r in log["train"]] == [1, 2]
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
