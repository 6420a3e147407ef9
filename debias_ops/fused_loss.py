"""Autograd wiring of the fused DropClass loss (design §4, §5).

Inputs arrive validated (``debias_ops.api``), with ``dropped`` a (B, K) bool
mask on the device.

One ``torch.library`` operator, ``debias_ops::dropclass_loss_fwd``, computes
in a single fused forward (``kernels/loss.py``: a label pass for the
denominators, the main pass, a one-program total)::

    stats (4,) fp32 = (loss, CE, CE', sup),   ∂loss/∂logits,   ∂loss/∂logits_drop

never materialising the upsampled logits. The loss is terminal, so its
gradients are computed in the forward and kept; the registered backward
(``register_autograd``) only multiplies them by the incoming gradient.
A gradient nobody asked for (input without ``requires_grad``, or grad mode
off) is not computed: the op gets two flags and returns an empty tensor there.

Memory: in eager mode the backward scales the stored gradient *in place* and
hands that buffer to autograd (dropping its own reference so AccumulateGrad can
take it without a copy): peak extra memory is one low-resolution gradient per
input, not two. The price: a second backward through the same graph
(``retain_graph=True``) raises a RuntimeError. Under torch.compile / tracing,
or with ``create_graph=True``, the backward is the out-of-place product.
No second derivative: the stored gradient is a constant for double backward.

Registration: ``torch.library.triton_op`` + ``wrap_triton`` (torch >= 2.6),
else ``custom_op`` + ``register_fake``. The op body sends CPU tensors to the
reference math (analytic gradient with aten ops) when the Triton interpreter
is off (design §9) and launches the kernels otherwise. Nothing reads a tensor
value on the host: the normalisations stay on the device.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import _library
from . import reference as _ref
from ._library import use_reference as _use_reference


def _grad_buffer(x: torch.Tensor, need: bool) -> torch.Tensor:
    """The gradient of x: x's dtype and memory format (dense layouts), else NCHW-contiguous."""
    if not need:
        return x.new_empty(0)
    return torch.empty_like(x, memory_format=torch.preserve_format)


def _interp_matrix(n_in: int, n_out: int, dtype, device) -> torch.Tensor:
    """(n_out, n_in) matrix R of 1-D linear interpolation, align_corners=False (F.interpolate's
    index math in fp32): up = R_H · x · R_Wᵀ. Built from aten ops only (traceable)."""
    dst = torch.arange(n_out, device=device, dtype=torch.float32)
    src = ((dst + 0.5) * (n_in / n_out) - 0.5).clamp_min(0.0)
    i0 = src.floor().long().clamp_max(n_in - 1)
    i1 = (i0 + 1).clamp_max(n_in - 1)
    lam = (src - i0.to(torch.float32)).clamp(0.0, 1.0)
    cols = torch.arange(n_in, device=device)
    r = (cols[None, :] == i0[:, None]) * (1.0 - lam)[:, None] + (cols[None, :] == i1[:, None]) * lam[:, None]
    return r.to(dtype)


# ----------------------------------------------------------------------------- reference body (CPU, no interpreter)

def _reference_fwd(logits, logits_drop, target, dropped, weight, lam, alpha, ignore_index, need_gx, need_gxd):
    """design §4 values from ``reference``; gradients in closed form with aten ops (traceable)."""
    B, K, h, w = logits.shape
    size = tuple(target.shape[1:])
    dt = _ref.compute_dtype(logits, logits_drop)
    y_drop = _ref.drop_labels(target, dropped, ignore_index)
    out = []
    for x, y in ((logits, target), (logits_drop, y_drop)):
        up = _ref.upsample(x.detach(), size)
        ce = _ref.weighted_ce(up, y, weight, ignore_index)
        valid = y != ignore_index
        yc = torch.where(valid, y, torch.zeros_like(y)).long()
        wp = valid.to(dt)
        if weight is not None:
            wp = wp * weight.to(dt)[yc]
        den = wp.sum()
        den = torch.where(den > 0, den, torch.ones_like(den))
        g = (torch.softmax(up, dim=1) - F.one_hot(yc, K).permute(0, 3, 1, 2).to(dt)) * (wp / den)[:, None]
        out.append((ce, g))
    (ce, g_up), (ce_d, gd_up) = out
    sup = _ref.suppression_term(logits_drop.detach(), dropped)
    loss = lam * ce + (1.0 - lam) * ce_d + alpha * sup
    stats = torch.stack([loss, ce, ce_d, sup]).to(torch.float32)

    def down(g):  # adjoint of the upsampling: Ryᵀ · g · Rx
        if tuple(g.shape[2:]) == (h, w):
            return g
        ry = _interp_matrix(h, size[0], g.dtype, g.device)
        rx = _interp_matrix(w, size[1], g.dtype, g.device)
        return torch.einsum("Yi,bkYX,Xj->bkij", ry, g, rx)

    gx = _grad_buffer(logits, need_gx)
    if need_gx:
        gx.copy_(down(g_up) * lam)
    gxd = _grad_buffer(logits_drop, need_gxd)
    if need_gxd:
        p = torch.softmax(logits_drop.detach().to(dt), dim=1)
        d = dropped.to(dt)[:, :, None, None]
        nd = dropped.sum().to(dt).clamp_min(1.0)
        g_sup = p * (d - (p * d).sum(dim=1, keepdim=True)) * (alpha / (h * w)) / nd
        gxd.copy_(down(gd_up) * (1.0 - lam) + g_sup)
    return stats, gx, gxd


# ----------------------------------------------------------------------------- the operator

def _fwd_impl(logits: torch.Tensor, logits_drop: torch.Tensor, target: torch.Tensor, dropped: torch.Tensor,
              weight: Optional[torch.Tensor], lam: float, alpha: float, ignore_index: int,
              need_gx: bool, need_gxd: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _use_reference(logits):
        return _reference_fwd(logits, logits_drop, target, dropped, weight, lam, alpha, ignore_index,
                              need_gx, need_gxd)
    gx = _grad_buffer(logits, need_gx)
    gxd = _grad_buffer(logits_drop, need_gxd)
    from debias_ops.kernels import loss  # imports triton: only when a kernel runs
    stats = loss.launch(
        logits, logits_drop, target, dropped, weight, lam, alpha, ignore_index,
        need_gx, need_gxd, gx, gxd, wrap=_library.wrap())
    return stats, gx, gxd


def _fwd_fake(logits, logits_drop, target, dropped, weight, lam, alpha, ignore_index, need_gx, need_gxd):
    return (logits.new_empty(4, dtype=torch.float32), _grad_buffer(logits, need_gx),
            _grad_buffer(logits_drop, need_gxd))


dropclass_loss_fwd = _library.define("dropclass_loss_fwd", _fwd_impl, _fwd_fake)
_QUALNAME = f"{_library.NAMESPACE}::dropclass_loss_fwd"


def _setup_context(ctx, inputs, output):
    _stats, gx, gxd = output
    ctx.grads = [gx.detach(), gxd.detach()]
    ctx.need = (inputs[8], inputs[9])


def _scale(ctx, i: int, g: torch.Tensor) -> Optional[torch.Tensor]:
    if not ctx.need[i]:
        return None
    buf = ctx.grads[i]
    if buf is None:
        raise RuntimeError(
            "debias_ops.dropclass_loss: backward through the same loss twice is not supported "
            "(its stored gradients are consumed by the first backward; recompute the loss)")
    eager = not torch.compiler.is_compiling() and type(buf) is torch.Tensor and type(g) is torch.Tensor
    # create_graph=True (grad mode on in the backward): out of place, the buffer stays usable;
    # the stored gradient is a constant there (no second derivative through the loss)
    if eager and not torch.is_grad_enabled():
        ctx.grads[i] = None
        return buf.mul_(g)  # buf is ours (the op's output), never a user's tensor
    return buf * g


def _backward(ctx, grad_stats, _grad_gx, _grad_gxd):
    g = grad_stats[0]
    return (_scale(ctx, 0, g), _scale(ctx, 1, g), None, None, None, None, None, None, None, None)


torch.library.register_autograd(_QUALNAME, _backward, setup_context=_setup_context)


def dropclass_loss(logits, logits_drop, target, dropped: torch.Tensor, lam: float, alpha: float,
                   weight: Optional[torch.Tensor], ignore_index: int) -> _ref.DropClassLoss:
    grad_on = torch.is_grad_enabled()
    need_gx = grad_on and logits.requires_grad
    need_gxd = grad_on and logits_drop.requires_grad
    stats, _gx, _gxd = dropclass_loss_fwd(logits, logits_drop, target, dropped, weight, float(lam), float(alpha),
                                          int(ignore_index), need_gx, need_gxd)
    loss = stats[0]
    if not (need_gx or need_gxd):
        loss = loss.detach()
    s = stats.detach()
    return _ref.DropClassLoss(loss, s[1], s[2], s[3])
