"""Backend selection (design §5).

``DEBIAS_OPS_BACKEND`` (read at every call, never at import) picks the
implementation of every op:

* ``auto`` (default): Triton kernels for CUDA tensors, the reference path for
  anything else;
* ``triton``: Triton kernels even for CPU tensors, which then needs
  ``TRITON_INTERPRET=1`` (set before the process starts; it is how CI checks
  the kernels on a CPU-only machine);
* ``reference``: the plain-PyTorch reference of ``debias_ops.reference``.

float64 inputs always run the reference path (the kernels compute in float32;
float64 is there for gradcheck-grade checks).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch

from .kernels._env import interpreting  # no triton import (kernels/_env.py)

BACKENDS = ("auto", "triton", "reference")
ENV_VAR = "DEBIAS_OPS_BACKEND"


def backend() -> str:
    """The backend named by ``DEBIAS_OPS_BACKEND`` (default ``auto``)."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r}: expected one of {', '.join(BACKENDS)}")
    return value


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether an op on ``tensors`` runs the Triton kernels.

    Raises ``RuntimeError`` when the triton backend is forced but cannot run.
    """
    choice = backend()
    if choice == "reference":
        return False
    if any(t.dtype == torch.float64 for t in tensors):
        return False
    if choice == "auto":
        return all(t.is_cuda for t in tensors) and triton_available()
    # choice == "triton"
    if not triton_available():
        raise RuntimeError(
            f"{ENV_VAR}=triton but triton is not installed; `pip install triton` "
            f"or use {ENV_VAR}=reference"
        )
    if any(t.device.type == "cpu" for t in tensors) and not interpreting():
        raise RuntimeError(
            f"{ENV_VAR}=triton with CPU tensors needs TRITON_INTERPRET=1 set before "
            "the process starts (the Triton interpreter); or move the tensors to CUDA"
        )
    return True
