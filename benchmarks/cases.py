"""Benchmark cases: inputs and the three implementations of every op.

Implementations (the ``impl`` column):

* ``fused``:   the public API (``debias_ops.suppress`` ...), run with
               ``DEBIAS_OPS_BACKEND=triton`` -- the Triton kernels on CUDA, or
               under the Triton interpreter on CPU (``TRITON_INTERPRET=1``);
* ``eager``:   the reference functions of ``debias_ops.reference`` called directly
               (design §2–§4 written plainly in PyTorch);
* ``compile``: ``torch.compile(reference function, dynamic=False)``.

For the head step (``op="head"``), every implementation is the same
``debias_ops.DropClassHead`` module: ``fused`` with the Triton backend,
``eager`` with ``DEBIAS_OPS_BACKEND=reference``, ``compile`` is
``torch.compile(head)`` with the reference backend.

Modes: ``fwd`` is the *training* forward (inputs require grad, so autograd
saves what the backward needs -- the forward of a training step, as
Liger-Kernel's benchmarks measure it); ``fwd+bwd`` runs a fresh forward and
then the backward with a fixed output gradient (a scalar loss for the loss and
the head), gradients reset to None before every call.

Value checks that read tensor values (``debias_ops.value_checks``) are turned
off while timing (they synchronise the host); the inputs are valid by construction.
"""
from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

import debias_ops
from debias_ops import reference as R

from .shapes import Shape

IMPLS = ("fused", "eager", "compile")
LAM, ALPHA, PROGRESS = 0.5, 10.0, 0.5
IGNORE = 255
K_TOPK: Optional[int] = None  # top-k of design §3 (None: every channel, the official code's weights_avg)

# Tolerances of the check before timing, per input dtype of the case (elementwise
# |got − ref| ≤ atol_rel·max|ref| + rtol·|ref|, on every output and gradient):
# * fp32: both sides compute in fp32 from the same inputs but reduce in another
#   order (sums over up to 4M pixels, a Cholesky solve of the C×C ridge system):
#   rtol 1e-4 (≈ 800 ulp, the order-of-summation error of 4M-term fp32 sums is
#   ~√n·eps ≈ 1e-4 worst case) and atol 1e-5 of the tensor's largest magnitude.
# * bf16 / fp16: outputs are cast to the input dtype, and a bf16 store may round
#   one ulp (2^-8 = 0.4 %) differently; the head step chains that through a conv:
#   rtol 1.6e-2 (4 bf16 ulps) / 2e-3 (2 fp16 ulps), atol 1 % / 0.1 % of the largest magnitude.
# A wrong kernel is off by O(1) relative, far outside these.
CHECK_TOL = {
    torch.float32: dict(rtol=1e-4, atol_rel=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol_rel=1e-2),
    torch.float16: dict(rtol=2e-3, atol_rel=1e-3),
}

_COMPILED: Dict[str, Callable] = {}


def _raise_recompile_limit() -> None:
    """Every (op, shape, dtype) recompiles the same function; allow that."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))


def compiled(name: str, fn: Callable) -> Callable:
    if name not in _COMPILED:
        _raise_recompile_limit()
        _COMPILED[name] = torch.compile(fn, dynamic=False)
    return _COMPILED[name]


@contextlib.contextmanager
def backend_env(value: Optional[str]) -> Iterator[None]:
    """DEBIAS_OPS_BACKEND=value inside the block (None: leave it as it is)."""
    if value is None:
        yield
        return
    old = os.environ.get("DEBIAS_OPS_BACKEND")
    os.environ["DEBIAS_OPS_BACKEND"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DEBIAS_OPS_BACKEND", None)
        else:
            os.environ["DEBIAS_OPS_BACKEND"] = old


class Skip(Exception):
    """A case or implementation that cannot run here (reason in the message)."""


@dataclass
class Case:
    op: str
    shape: Shape
    dtype: torch.dtype
    mode: str
    device: torch.device
    inputs: Dict[str, object] = field(default_factory=dict)
    leaves: List[torch.Tensor] = field(default_factory=list)   # gradients reset before each call
    leaf_names: List[str] = field(default_factory=list)
    grad_out: Optional[torch.Tensor] = None
    forwards: Dict[str, Callable[[], object]] = field(default_factory=dict)
    fused_backend: str = "triton"
    # 16-bit head step only: the same call on float32 copies of the inputs and
    # parameters (reference backend), the yardstick of :func:`compare_with_truth`.
    truth: Optional[Callable[[], List[Tuple[str, torch.Tensor]]]] = None

    def check(self, got, ref) -> Dict[str, object]:
        """The check before timing: elementwise against the reference, or, for a
        16-bit head step, against a float32 truth (see :func:`compare_with_truth`)."""
        if self.truth is not None:
            return compare_with_truth(got, ref, self.truth(), self.dtype)
        return compare(got, ref, self.dtype)

    # ------------------------------------------------------------------ running
    def backend_for(self, impl: str) -> Optional[str]:
        if impl == "fused":
            return self.fused_backend
        if self.op == "head":  # the module dispatches through the public API
            return "reference"
        return None

    def context(self, impl: str):
        stack = contextlib.ExitStack()
        stack.enter_context(backend_env(self.backend_for(impl)))
        stack.enter_context(debias_ops.value_checks(False))
        return stack

    def step(self, impl: str) -> Callable[[], object]:
        """The timed callable: the forward, plus the backward in fwd+bwd mode."""
        fwd = self.forwards[impl]
        if self.mode == "fwd":
            return fwd
        grad = self.grad_out

        def run():
            out = _primary(fwd())
            if grad is None:
                out.backward()
            else:
                out.backward(grad)
        return run

    def result(self, impl: str) -> List[Tuple[str, torch.Tensor]]:
        """Named outputs (and gradients in fwd+bwd mode) of one call, for the check."""
        for t in self.leaves:
            t.grad = None
        out = self.forwards[impl]()
        named = _named_outputs(out)
        if self.mode == "fwd+bwd":
            p = _primary(out)
            if self.grad_out is None:
                p.backward()
            else:
                p.backward(self.grad_out)
            named += [(f"grad {name}", t.grad.detach().clone()) for name, t in self._leaf_names() if t.grad is not None]
            for t in self.leaves:
                t.grad = None
        return named

    def _leaf_names(self):
        names = self.leaf_names or [f"leaf{i}" for i in range(len(self.leaves))]
        return list(zip(names, self.leaves))


def _primary(out) -> torch.Tensor:
    """The tensor the backward starts from: the op's output, or the loss."""
    if isinstance(out, torch.Tensor):
        return out
    return out[0]  # DropClassLoss / DropClassOutput: loss first


def _named_outputs(out) -> List[Tuple[str, torch.Tensor]]:
    if isinstance(out, torch.Tensor):
        return [("out", out.detach())]
    fields = getattr(out, "_fields", None) or [f"out{i}" for i in range(len(out))]
    return [(n, t.detach()) for n, t in zip(fields, out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def compare(got: Sequence[Tuple[str, torch.Tensor]], ref: Sequence[Tuple[str, torch.Tensor]],
            dtype: torch.dtype) -> Dict[str, object]:
    """Elementwise check of every named output against the reference.

    Returns {"ok", "worst" (name), "max_err_over_tol" (≤ 1 passes), "max_abs_err", "tol"}.
    """
    tol = CHECK_TOL.get(dtype, CHECK_TOL[torch.float32])
    ref_d = dict(ref)
    worst_name, worst_ratio, worst_abs = None, 0.0, 0.0
    ok = True
    missing = [n for n, _ in ref if n not in dict(got)]
    if missing:
        return {"ok": False, "worst": missing[0], "max_err_over_tol": float("inf"), "max_abs_err": None,
                "tol": tol, "note": f"missing outputs {missing}"}
    for name, a in got:
        if name not in ref_d:
            continue
        e = ref_d[name]
        if a.shape != e.shape:
            return {"ok": False, "worst": name, "max_err_over_tol": float("inf"), "max_abs_err": None,
                    "tol": tol, "note": f"shape {tuple(a.shape)} != {tuple(e.shape)}"}
        if e.numel() == 0:
            continue
        a32, e32 = a.float(), e.float()
        scale = float(e32.abs().max())
        scale = scale if scale > 0 and scale == scale else 1.0
        diff = (a32 - e32).abs()
        bound = tol["atol_rel"] * scale + tol["rtol"] * e32.abs()
        ratio = torch.nan_to_num(diff / bound, nan=float("inf"))
        r = float(ratio.max())
        if r > worst_ratio or worst_name is None:
            worst_name, worst_ratio = name, r
            worst_abs = float(torch.nan_to_num(diff, nan=float("inf")).max())
        if not r <= 1.0:
            ok = False
    return {"ok": ok, "worst": worst_name, "max_err_over_tol": worst_ratio, "max_abs_err": worst_abs, "tol": tol}


# ----------------------------------------------------------------------------- builders

def compare_with_truth(got, ref, truth, dtype: torch.dtype, floor: float = 1e-3) -> Dict[str, object]:
    """Check a 16-bit result whose rounding is amplified through a network.

    The head step chains bf16/fp16 roundings through a conv, BatchNorm and the
    loss: two correct 16-bit implementations then differ elementwise by far
    more than one output ulp (measured at the tiny CPU shape: the reference's
    and the fused gradient of feats are 2.2 % and 2.8 % (norm) from a float64
    truth, 10 % and 14 % at the worst element). So each 16-bit result is
    measured against the float32 ``truth`` of the same call: the fused error
    ‖got − truth‖/‖truth‖ must be at most twice the reference's own
    ‖ref − truth‖/‖truth‖ (+ ``floor``). A wrong kernel is off by O(1).
    """
    t_d, r_d = dict(truth), dict(ref)
    worst_name, worst_ratio = None, 0.0
    for name, a in got:
        if name not in t_d or name not in r_d:
            continue
        t = t_d[name].double()
        if t.numel() == 0:
            continue
        norm = float(t.norm()) or 1.0
        err_got = float((a.double() - t).norm()) / norm
        err_ref = float((r_d[name].double() - t).norm()) / norm
        ratio = err_got / (2.0 * err_ref + floor)
        if ratio != ratio:
            ratio = float("inf")
        if worst_name is None or ratio > worst_ratio:
            worst_name, worst_ratio = name, ratio
    return {"ok": worst_ratio <= 1.0, "worst": worst_name, "max_err_over_tol": worst_ratio, "max_abs_err": None,
            "tol": {"vs_float32_truth": f"≤ 2×reference error + {floor}"}}


def _head_truth(head, feats, target, dropped, mode: str):
    """The head step on float32 copies, reference backend: named outputs (and gradients)."""
    def run() -> List[Tuple[str, torch.Tensor]]:
        h = copy.deepcopy(head).float()
        f = feats.detach().float().requires_grad_()
        with backend_env("reference"), debias_ops.value_checks(False):
            out = h(f, target, PROGRESS, drop=dropped)
            named = _named_outputs(out)
            if mode == "fwd+bwd":
                _primary(out).backward()
                named += [("grad feats", f.grad)]
                named += [(f"grad {n}", p.grad) for n, p in h.named_parameters() if p.grad is not None]
        return named
    return run


def _dropped(B: int, K: int, device) -> torch.Tensor:
    """One dropped class per sample (per_sample=True with p = 1)."""
    cls = torch.randint(K, (B,), device=device)
    return cls[:, None] == torch.arange(K, device=device)[None, :]


def _target(shape: Shape, device) -> torch.Tensor:
    Hl, Wl = shape.label_hw
    y = torch.randint(shape.K, (shape.B, Hl, Wl), device=device)
    return torch.where(torch.rand(y.shape, device=device) < 0.05, torch.full_like(y, IGNORE), y)


def make_case(op: str, shape: Shape, dtype: torch.dtype, mode: str, device, *, seed: int = 0,
              fused_backend: str = "triton", with_compile: bool = True) -> Case:
    """Inputs and implementations of ``op`` at ``shape``/``dtype``/``mode`` on ``device``.

    Raises :class:`Skip` when the op cannot run here (e.g. no DropClassHead).
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    case = Case(op, shape, dtype, mode, device, fused_backend=fused_backend)
    B, C, H, W, K = shape.B, shape.C, shape.H, shape.W, shape.K
    k = K_TOPK
    if op in ("suppress", "class_drop"):
        feats = torch.randn(B, C, H, W, device=device, dtype=dtype).requires_grad_()
        dropped = _dropped(B, K, device)
        case.grad_out = torch.randn(B, C, H, W, device=device, dtype=dtype)
        if op == "suppress":
            # Logits from a random linear 1×1 head plus noise, so the probe of design §2 fits something.
            w = torch.randn(K, C, device=device) / C ** 0.5
            with torch.no_grad():
                logits = (torch.einsum("kc,bchw->bkhw", w, feats.float())
                          + 0.1 * torch.randn(B, K, H, W, device=device)).to(dtype)
            case.inputs = dict(feats=feats, class_logits=logits, dropped=dropped)
            case.leaves, case.leaf_names = [feats], ["feats"]
            ref = compiled("suppress", R.suppress) if with_compile else None
            case.forwards = {
                "fused": lambda: debias_ops.suppress(feats, logits, k, drop=dropped),
                "eager": lambda: R.suppress(feats, logits, k, drop=dropped),
                "compile": (lambda: ref(feats, logits, k, drop=dropped)) if ref else None,
            }
        else:
            weight = (torch.randn(K, C, device=device) / C ** 0.5).to(dtype).requires_grad_()
            case.inputs = dict(feats=feats, class_weight=weight, dropped=dropped)
            case.leaves, case.leaf_names = [feats, weight], ["feats", "class_weight"]
            ref = compiled("class_drop", R.class_drop) if with_compile else None
            case.forwards = {
                "fused": lambda: debias_ops.class_drop(feats, weight, k, drop=dropped),
                "eager": lambda: R.class_drop(feats, weight, k, drop=dropped),
                "compile": (lambda: ref(feats, weight, k, drop=dropped)) if ref else None,
            }
    elif op == "loss":
        logits = (2 * torch.randn(B, K, H, W, device=device, dtype=dtype)).requires_grad_()
        logits_drop = (2 * torch.randn(B, K, H, W, device=device, dtype=dtype)).requires_grad_()
        target = _target(shape, device)
        dropped = _dropped(B, K, device)
        case.inputs = dict(logits=logits, logits_drop=logits_drop, target=target, dropped=dropped)
        case.leaves, case.leaf_names = [logits, logits_drop], ["logits", "logits_drop"]
        ref = compiled("loss", R.dropclass_loss) if with_compile else None
        case.forwards = {
            "fused": lambda: debias_ops.dropclass_loss(logits, logits_drop, target, dropped, lam=LAM, alpha=ALPHA),
            "eager": lambda: R.dropclass_loss(logits, logits_drop, target, dropped, lam=LAM, alpha=ALPHA),
            "compile": (lambda: ref(logits, logits_drop, target, dropped, lam=LAM, alpha=ALPHA)) if ref else None,
        }
    elif op == "head":
        head = debias_ops.DropClassHead(C, K).to(device=device, dtype=dtype).train()
        feats = torch.randn(B, C, H, W, device=device, dtype=dtype).requires_grad_()
        target = _target(shape, device)
        dropped = _dropped(B, K, device)
        case.inputs = dict(feats=feats, target=target, dropped=dropped, head=head)
        params = [p for p in head.parameters() if p.requires_grad]
        case.leaves = [feats] + params
        case.leaf_names = ["feats"] + [n for n, p in head.named_parameters() if p.requires_grad]
        if with_compile:
            _raise_recompile_limit()
            chead = torch.compile(head, dynamic=False)
        case.forwards = {
            "fused": lambda: head(feats, target, PROGRESS, drop=dropped),
            "eager": lambda: head(feats, target, PROGRESS, drop=dropped),
            "compile": (lambda: chead(feats, target, PROGRESS, drop=dropped)) if with_compile else None,
        }
        if dtype != torch.float32:
            case.truth = _head_truth(head, feats, target, dropped, mode)
    elif op == "train_step":
        raise Skip("train_step is run by benchmarks.train_step, not as a case")
    else:
        raise ValueError(f"unknown op {op!r}")
    return case
