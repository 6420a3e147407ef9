"""Triton kernels of debias_ops (installed as ``debias_ops.kernels``).

Kernels and their launch helpers only: no autograd, no validation. The
autograd Functions that call them live in ``debias_ops``.
"""
