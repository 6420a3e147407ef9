"""torch.library registration shared by the fused ops (design §5, §9).

Every fused op is a ``torch.library`` operator in the ``debias_ops`` namespace:
``triton_op`` + ``wrap_triton`` on torch >= 2.6 (the kernel launches are
visible to torch.compile / Inductor), ``custom_op`` + ``register_fake`` on
torch 2.4–2.5. Each op body runs the reference math for CPU tensors when the
Triton interpreter is off (torch.compile cannot trace interpreted kernels,
design §9), and launches the kernels otherwise (CUDA, or CPU under
``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import torch

from . import _backend

NAMESPACE = "debias_ops"
HAS_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")


def use_reference(t: torch.Tensor) -> bool:
    """The op body runs the reference math: a non-CUDA tensor without the interpreter."""
    return t.device.type != "cuda" and not _backend.interpreting()


def wrap():
    """``wrap_triton`` inside a triton_op (a traceable launch); None (a plain launch)
    under the interpreter, which torch.compile cannot trace anyway (design §9) and
    which older torch versions' ``wrap_triton`` rejects."""
    return torch.library.wrap_triton if (HAS_TRITON_OP and not _backend.interpreting()) else None


def define(name: str, fn, fake):
    """Register ``fn`` as ``debias_ops::name``: a triton_op when available, else a custom_op with ``fake``."""
    qualname = f"{NAMESPACE}::{name}"
    if HAS_TRITON_OP:
        return torch.library.triton_op(qualname, fn, mutates_args=())
    op = torch.library.custom_op(qualname, fn, mutates_args=())
    op.register_fake(fake)
    return op
