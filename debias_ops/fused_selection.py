"""Autograd wiring of the fused suppress / class_drop / class_importance (design §2–§3, §5).

Inputs arrive validated (``debias_ops.api``), with ``dropped`` a (B, K) bool
mask on the data's device and ``k`` None or an int in [1, C].

Structure. Two ``torch.library`` operators carry the N-sized work; the rest is
plain PyTorch on (K, C) / (B, C) tensors, shared with the reference
(``reference.importance_from_moments``, ``reference.channel_gate``,
``reference.weight_importance``)::

    suppress(A, L, k, dropped):
        Ā, L̄, G, X = debias_ops::batch_moments(A, L)    one reduction pass (kernels/moments.py)
        S = importance_from_moments(G, X)                  ridge solve, ReLU     (K, C), no grad
        g = channel_gate(S, k, dropped)                    top-k, mean over kept (B, C)
        out = debias_ops::gate_apply(A, g)                 one pass: out = A·g
    class_drop(A, W, k, dropped):
        g = channel_gate(weight_importance(W), k, dropped) (B, C), differentiable in W
        out = debias_ops::gate_apply(A, g)

``debias_ops::gate_apply`` is the autograd op (``register_autograd``): its
backward is ``debias_ops::gate_backward``, ONE pass over the data that writes
``dA = dOut·g`` and, only when g requires grad (class_drop with a trainable
weight), produces ``dg[b, c] = Σ_n dOut·A`` from deterministic per-chunk
partials in the same pass. ``dW`` then follows from autograd through
``channel_gate`` / ``weight_importance`` on the (K, C) weight, which is exactly
design §3's ``dW = [W > 0]·topk·Σ_b keep·dg / max(1, Σ keep)``. suppress's gate
is built under ``no_grad`` from batch statistics, so its backward never reads A.

Registration: ``torch.library.triton_op`` + ``wrap_triton`` (torch >= 2.6; the
kernel launch is visible to torch.compile / Inductor), else ``custom_op`` +
``register_fake`` (torch 2.4–2.5); all three ops (``batch_moments``,
``gate_apply``, ``gate_backward``) are registered the same way. Every op body sends CPU tensors to the reference math
when the Triton interpreter is off (design §9: torch.compile cannot trace
interpreted kernels; this is what lets ``torch.compile(fullgraph=True)`` run on
CPU), and launches the kernels otherwise (CUDA, or CPU under TRITON_INTERPRET=1).
No op reads a tensor value on the host: everything is CUDA-graph capturable.
"""
from typing import Optional, Tuple

import torch

from . import _library
from . import reference as _ref
from ._library import use_reference as _use_reference


def _channels_last(feats: torch.Tensor) -> bool:
    """The output / dA memory format rule of ``reference.apply_gate``."""
    return feats.is_contiguous(memory_format=torch.channels_last) and not feats.is_contiguous()


def _empty_like_format(shape, dtype, device, channels_last: bool) -> torch.Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device=device, memory_format=fmt)


# ----------------------------------------------------------------------------- batch_moments (design §2)

def _batch_moments_impl(feats: torch.Tensor, class_logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if _use_reference(feats):
        a_mean, l_mean, G, X = _ref.batch_moments(feats, class_logits)
    else:
        from debias_ops.kernels import moments  # imports triton: only when a kernel runs
        a_mean, l_mean, G, X = moments.launch(feats, class_logits, wrap=_library.wrap())
    return a_mean, l_mean, G, X


def _batch_moments_fake(feats, class_logits):
    C, K = feats.shape[1], class_logits.shape[1]
    f = torch.float32
    return feats.new_empty(C, dtype=f), feats.new_empty(K, dtype=f), feats.new_empty(C, C, dtype=f), feats.new_empty(K, C, dtype=f)


batch_moments_op = _library.define("batch_moments", _batch_moments_impl, _batch_moments_fake)


# ----------------------------------------------------------------------------- gate_apply / gate_backward (design §3)

def _gate_apply_impl(feats: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """out = A·g, output in feats' dtype and memory format (NCHW or channels_last)."""
    if _use_reference(feats):
        return _ref.apply_gate(feats, gate.float())
    out = _empty_like_format(feats.shape, feats.dtype, feats.device, _channels_last(feats))
    from debias_ops.kernels import gate as gate_kernels  # imports triton: only when a kernel runs
    gate_kernels.launch(feats, gate, out, wrap=_library.wrap())
    return out


def _gate_apply_fake(feats, gate):
    return _empty_like_format(feats.shape, feats.dtype, feats.device, _channels_last(feats))


def _gate_backward_impl(grad: torch.Tensor, gate: torch.Tensor, feats: torch.Tensor,
                        need_da: bool, need_dg: bool, channels_last: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """dA = dOut·g (if need_da, else an empty tensor) and dg = Σ_n dOut·A (if need_dg, else empty).

    ``feats`` is only read when need_dg (otherwise any tensor). One pass.
    """
    if _use_reference(grad):
        g32 = gate.float()[:, :, None, None]
        d32 = grad.float()
        dA = (d32 * g32).to(grad.dtype).contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format
        ) if need_da else grad.new_empty(0)
        dg = (d32 * feats.float()).sum(dim=(2, 3)) if need_dg else gate.new_empty(0, dtype=torch.float32)
        return dA, dg
    dA = _empty_like_format(grad.shape, grad.dtype, grad.device, channels_last) if need_da else None
    from debias_ops.kernels import gate as gate_kernels  # imports triton: only when a kernel runs
    partial = gate_kernels.launch(grad, gate, dA, feats if need_dg else None, wrap=_library.wrap())
    dg = partial.sum(dim=0) if need_dg else gate.new_empty(0, dtype=torch.float32)
    return (dA if need_da else grad.new_empty(0)), dg


def _gate_backward_fake(grad, gate, feats, need_da, need_dg, channels_last):
    B, C = grad.shape[:2]
    dA = _empty_like_format(grad.shape, grad.dtype, grad.device, channels_last) if need_da else grad.new_empty(0)
    dg = gate.new_empty((B, C), dtype=torch.float32) if need_dg else gate.new_empty(0, dtype=torch.float32)
    return dA, dg


gate_apply_op = _library.define("gate_apply", _gate_apply_impl, _gate_apply_fake)
gate_backward_op = _library.define("gate_backward", _gate_backward_impl, _gate_backward_fake)


def _gate_apply_setup_context(ctx, inputs, output):
    feats, gate = inputs
    ctx.need_da = feats.requires_grad
    ctx.need_dg = gate.requires_grad
    ctx.channels_last = _channels_last(feats)
    # feats is kept only when dg is needed (class_drop with a trainable weight):
    # suppress's backward never reads A, so it must not keep it alive.
    ctx.save_for_backward(gate, feats if ctx.need_dg else None)


def _gate_apply_backward(ctx, grad):
    gate, feats = ctx.saved_tensors
    dA, dg = gate_backward_op(grad, gate, feats if feats is not None else grad,
                              ctx.need_da, ctx.need_dg, ctx.channels_last)
    return (dA if ctx.need_da else None), (dg.to(gate.dtype) if ctx.need_dg else None)


gate_apply_op.register_autograd(_gate_apply_backward, setup_context=_gate_apply_setup_context)


def _gate_backward_setup_context(ctx, inputs, output):
    grad, gate, feats, need_da, need_dg, _channels_last = inputs
    ctx.need_da, ctx.need_dg = need_da, need_dg
    # only reached with grad mode on in the backward (create_graph=True)
    ctx.save_for_backward(grad, gate, feats if need_dg else None)


def _gate_backward_backward(ctx, g_da, g_dg):
    """Double backward (create_graph=True, e.g. a gradient penalty). The pass is
    bilinear -- dA = dOut·g, dg = Σ_n dOut·A -- so with incoming ḡA, ḡg:

        ∂/∂dOut = ḡA·g + ḡg·A,   ∂/∂g = Σ_n ḡA·dOut,   ∂/∂A = ḡg·dOut

    in plain (again differentiable) PyTorch, float32 math, each cast to its
    input's dtype. Without it a second derivative through class_drop/suppress
    raised "no autograd formula registered for gate_backward"."""
    grad, gate, feats = ctx.saved_tensors
    d_grad = d_gate = d_feats = None
    if ctx.need_da and g_da is not None:
        t = g_da.float()
        d_grad = t * gate.float()[:, :, None, None]
        d_gate = (t * grad.float()).sum(dim=(2, 3))
    if ctx.need_dg and g_dg is not None:
        u = g_dg.float()[:, :, None, None]
        d_grad = u * feats.float() if d_grad is None else d_grad + u * feats.float()
        d_feats = (u * grad.float()).to(feats.dtype)
    return ((d_grad.to(grad.dtype) if d_grad is not None else None),
            (d_gate.to(gate.dtype) if d_gate is not None else None), d_feats, None, None, None)


gate_backward_op.register_autograd(_gate_backward_backward, setup_context=_gate_backward_setup_context)


# ----------------------------------------------------------------------------- public entry points (called by api)

def class_importance(feats: torch.Tensor, class_logits: torch.Tensor) -> torch.Tensor:
    """S (K, C) float32 from the fused moments and the reference's ridge solve; no gradient."""
    with torch.no_grad():
        _, _, G, X = batch_moments_op(feats, class_logits)
        return _ref.importance_from_moments(G, X)


def suppress(feats: torch.Tensor, class_logits: torch.Tensor, k: Optional[int], dropped: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        g = _ref.channel_gate(class_importance(feats, class_logits), k, dropped)
    return gate_apply_op(feats, g)


def class_drop(feats: torch.Tensor, class_weight: torch.Tensor, k: Optional[int], dropped: torch.Tensor) -> torch.Tensor:
    S = _ref.weight_importance(class_weight, torch.float32)
    g = _ref.channel_gate(S, k, dropped)
    return gate_apply_op(feats, g)
