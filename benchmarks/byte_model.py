"""Byte and flop model of every benchmarked op: the single source of the
roofline columns, used by the CLI (``python -m benchmarks``) and the
pytest-benchmark suite (``benchmarks/test_bench.py``).

Every number is the *minimal* DRAM traffic an ideal fused implementation must
move (design §8): each tensor the math needs is read once, each result written
once, nothing else. "byte floor" = minimal bytes / device copy bandwidth; an
implementation's GB/s is minimal bytes / its measured time, so "% of copy
bandwidth" says how close it gets to that floor (100 % = at the floor). Real
implementations move more (re-reads, fp32 intermediates); that shows up as a
lower GB/s, never as more bytes here.

Notation (design §1): |A| = B·C·N·sizeof(feats) with N = H·W; |L| = B·K·N·sizeof(class_logits);
``fwd`` is the training forward, ``fwd+bwd`` forward then backward.

suppress (design §2 + §3; gradient to feats only)
    fwd      3·|A| + |L|     the gate g depends on statistics of the *whole*
                             batch (Gram G, cross-moment X), so A is read twice:
                             once for the moments (with L), once to apply g;
                             then ``out`` is written.
    fwd+bwd  5·|A| + |L|     + read dOut, write dA = dOut·g (one pass).
    flops    2·B·N·C² (the Gram G, tensor-core work) + 2·B·N·C·K (the cross-moment X);
             the backward adds no matrix product. TFLOP/s is reported for it.
    design §8's byte floor for suppress is 5·|A| (it leaves out |L|, 2.6 % at W48).

class_drop (design §2 weights + §3; gradients to feats and class_weight)
    fwd      2·|A| + |W|     read A, write out (g from the K×C weight: negligible).
    fwd+bwd  5·|A| + 2·|W|   + read dOut, write dA, and read A again for
                             dg[b,c] = Σ_n dOut·A (the weight gradient); write dW.

dropclass_loss (design §4; logits at (h, w), labels at (H, W))
    fwd      2·|l| + |y|     read logits and logits_drop (low resolution, their
                             dtype), read the labels (B·H·W·sizeof(target)); the
                             upsampled logits are never materialised.
    fwd+bwd  4·|l| + |y|     + write both logits' gradients (low resolution).
    (|drop| = B·K bytes and the optional class weight are included as small terms.)

head (a DropClass head step: classifier + class_drop + selector + loss)
    No byte floor: the 1×1 convolutions make it compute-bound. Flops counted:
    classifier on feats 2·B·N·C·K, selector 1×1 conv 2·B·N·C², classifier on the
    selected features 2·B·N·C·K; the backward doubles each (input and weight
    gradients): fwd+bwd = 3× fwd. GB/s and % copy bandwidth are left empty.

train_step (optional, DeepLabV3-ResNet50 step): no model here; time only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from .shapes import Shape

MODES = ("fwd", "fwd+bwd")
OPS = ("suppress", "class_drop", "loss", "head", "train_step")


@dataclass
class Traffic:
    """Minimal bytes and flops of one op at one shape, dtype and mode."""
    bytes: Optional[int]
    flops: Optional[int] = None
    terms: Dict[str, int] = field(default_factory=dict)

    def gbps(self, ms: Optional[float]) -> Optional[float]:
        """GB/s (1e9 bytes per second) of moving the minimal bytes in ``ms``."""
        if self.bytes is None or not ms:
            return None
        return self.bytes / (ms * 1e-3) / 1e9

    def tflops(self, ms: Optional[float]) -> Optional[float]:
        if self.flops is None or not ms:
            return None
        return self.flops / (ms * 1e-3) / 1e12

    def floor_ms(self, copy_gbps: Optional[float]) -> Optional[float]:
        """The byte floor: minimal bytes at the device's copy bandwidth."""
        if self.bytes is None or not copy_gbps:
            return None
        return self.bytes / (copy_gbps * 1e9) * 1e3


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _make(terms: Dict[str, int], flops: Optional[int] = None) -> Traffic:
    return Traffic(bytes=sum(terms.values()), flops=flops, terms=dict(terms))


def suppress(shape: Shape, dtype: torch.dtype, mode: str, logits_dtype: Optional[torch.dtype] = None) -> Traffic:
    _check_mode(mode)
    B, C, N, K = shape.B, shape.C, shape.N, shape.K
    A = B * C * N * _size(dtype)
    L = B * K * N * _size(logits_dtype or dtype)
    terms = {"read A (moments)": A, "read L (moments)": L, "read A (apply g)": A, "write out": A}
    if mode == "fwd+bwd":
        terms.update({"read dOut": A, "write dA": A})
    flops = 2 * B * N * C * C + 2 * B * N * C * K
    return _make(terms, flops)


def class_drop(shape: Shape, dtype: torch.dtype, mode: str, weight_dtype: Optional[torch.dtype] = None) -> Traffic:
    _check_mode(mode)
    B, C, N, K = shape.B, shape.C, shape.N, shape.K
    A = B * C * N * _size(dtype)
    Wb = K * C * _size(weight_dtype or dtype)
    terms = {"read A": A, "read W": Wb, "write out": A}
    if mode == "fwd+bwd":
        terms.update({"read dOut": A, "read A (dg)": A, "write dA": A, "write dW": Wb})
    return _make(terms)


def loss(shape: Shape, dtype: torch.dtype, mode: str, target_dtype: torch.dtype = torch.int64,
         weighted: bool = False) -> Traffic:
    _check_mode(mode)
    B, K, N = shape.B, shape.K, shape.N
    Hl, Wl = shape.label_hw
    lo = B * K * N * _size(dtype)
    terms = {"read logits": lo, "read logits_drop": lo, "read target": B * Hl * Wl * _size(target_dtype),
             "read drop": B * K}
    if weighted:
        terms["read weight"] = K * 4
    if mode == "fwd+bwd":
        terms.update({"write d logits": lo, "write d logits_drop": lo})
    return _make(terms)


def head(shape: Shape, dtype: torch.dtype, mode: str) -> Traffic:
    _check_mode(mode)
    B, C, N, K = shape.B, shape.C, shape.N, shape.K
    fwd = 2 * B * N * C * K + 2 * B * N * C * C + 2 * B * N * C * K
    return Traffic(bytes=None, flops=fwd if mode == "fwd" else 3 * fwd)


def traffic(op: str, shape: Shape, dtype: torch.dtype, mode: str) -> Traffic:
    """The byte/flop model of ``op`` (one of OPS) at ``shape``, ``dtype``, ``mode``."""
    if op == "suppress":
        return suppress(shape, dtype, mode)
    if op == "class_drop":
        return class_drop(shape, dtype, mode)
    if op == "loss":
        return loss(shape, dtype, mode)
    if op == "head":
        return head(shape, dtype, mode)
    if op == "train_step":
        _check_mode(mode)
        return Traffic(bytes=None)
    raise ValueError(f"unknown op {op!r}; expected one of {OPS}")


def sweep_elements(op: str, shape: Shape) -> int:
    """x of the scaling fit: elements the op streams per call.

    suppress: B·C·N (the feature map; its Gram is B·N·C² flops, so the C sweep
    is expected to bend upward once the Gram dominates -- R² says how much);
    loss: B·K·H·W at the label resolution (the upsampled logits it evaluates
    without materialising).
    """
    if op == "suppress":
        return shape.B * shape.C * shape.N
    if op == "loss":
        Hl, Wl = shape.label_hw
        return shape.B * shape.K * Hl * Wl
    raise ValueError(f"no sweep for {op!r}")
