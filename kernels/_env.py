"""Facts of the environment that the kernels and the API both read.

Standard library only: ``debias_ops`` imports this without Triton installed
(``kernels/__init__.py`` imports nothing either).
"""
from __future__ import annotations

import os


def interpreting() -> bool:
    """True when Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")
