"""Reference implementation: design §2–§4 in plain PyTorch.

This file is the specification in code. It runs on any device, is
differentiable by autograd, and every Triton kernel is tested against it.
It computes in float32 (float64 when any input is float64, for gradcheck),
whatever the input dtype, and casts the output back to ``feats.dtype``.

The small device-side steps that both the reference and the fused path need
(ridge solve of §2, top-k selection and the gate g of §3) are defined here
once -- :func:`importance_from_moments`, :func:`topk_mask`,
:func:`channel_gate` -- and the fused path calls these same functions on the
statistics its kernels produce.

Notation (design §1): A = feats (B, C, H, W), N = H·W; L = class_logits
(B, K, H, W); W = class_weight (K, C); keep = ~dropped, (B, K).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from .sampling import drop_mask


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 if any input is float64, else float32 (design §1: fp32 accumulation)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


# ----------------------------------------------------------------------------- §2 importance

def batch_moments(feats: torch.Tensor, class_logits: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Batch statistics of design §2 over all M = B·H·W positions.

    Returns (Ā (C,), L̄ (K,), G (C, C), X (K, C)) in the compute dtype, with
        G[c, c'] = mean_(b,n) (A[b,c,n] − Ā[c]) (A[b,c',n] − Ā[c'])
        X[j, c]  = mean_(b,n) (L[b,j,n] − L̄[j]) (A[b,c,n] − Ā[c]).
    With no position (B = 0) every statistic is zero. No gradient.
    """
    B, C = feats.shape[:2]
    K = class_logits.shape[1]
    dt = compute_dtype(feats, class_logits)
    M = feats.numel() // max(C, 1)
    A = feats.detach().to(dt).transpose(0, 1).reshape(C, M)
    L = class_logits.detach().to(dt).transpose(0, 1).reshape(K, M)
    if M == 0:
        z = feats.new_zeros
        return z(C, dtype=dt), z(K, dtype=dt), z(C, C, dtype=dt), z(K, C, dtype=dt)
    a_mean = A.mean(dim=1)
    l_mean = L.mean(dim=1)
    Ac = A - a_mean[:, None]
    Lc = L - l_mean[:, None]
    G = (Ac @ Ac.T) / M
    X = (Lc @ Ac.T) / M
    return a_mean, l_mean, G, X


def importance_from_moments(G: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """S = max(0, X (G + ρI)⁻¹), ρ = 1e-3·mean(diag G) + 1e-6 (design §2).

    Solved on the device without a host sync: G + ρI is symmetric positive
    definite, so a Cholesky factorisation (``cholesky_ex`` never raises or
    syncs) and ``cholesky_solve`` give W_fitᵀ = (G + ρI)⁻¹ Xᵀ.
    """
    C = G.shape[0]
    rho = 1e-3 * G.diagonal().mean() + 1e-6
    G_reg = G + rho * torch.eye(C, dtype=G.dtype, device=G.device)
    chol, _ = torch.linalg.cholesky_ex(G_reg)
    w_fit = torch.cholesky_solve(X.T, chol).T
    return torch.relu(w_fit)


def class_importance(feats: torch.Tensor, class_logits: torch.Tensor) -> torch.Tensor:
    """S (K, C): channel importance of every class from dense logits (design §2).

    A batch statistic, treated as a constant: no gradient.
    """
    with torch.no_grad():
        _, _, G, X = batch_moments(feats, class_logits)
        return importance_from_moments(G, X)


def weight_importance(class_weight: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """S = max(0, W) (K, C) from a 1×1 classifier's weight (K, C[, 1, 1]); differentiable.

    d/dW max(0, W) is taken as 0 at W = 0 (``torch.relu``'s convention, design §3).
    """
    K, C = class_weight.shape[:2]
    return torch.relu(class_weight.reshape(K, C).to(dtype or compute_dtype(class_weight)))


# ----------------------------------------------------------------------------- §3 selection

def topk_mask(S: torch.Tensor, k: Optional[int]) -> torch.Tensor:
    """(K, C) bool: c is among the k largest of S[j, :] (all True for k None or k ≥ C).

    Ties are broken by ``torch.topk``; membership carries no gradient.
    """
    K, C = S.shape
    if k is None or k >= C:
        return torch.ones(K, C, dtype=torch.bool, device=S.device)
    idx = torch.topk(S.detach(), k, dim=1).indices
    return torch.zeros(K, C, dtype=torch.bool, device=S.device).scatter_(1, idx, True)


def channel_gate(S: torch.Tensor, k: Optional[int], dropped: torch.Tensor) -> torch.Tensor:
    """g (B, C) = Σ_j keep[b, j] · T[j, c] / max(1, Σ_j keep[b, j]) (design §3).

    T = S on each class's top-k channels, 0 elsewhere. Differentiable in S.
    """
    T = S * topk_mask(S, k).to(S.dtype)
    keep = (~dropped).to(S.dtype)
    return (keep @ T) / keep.sum(dim=1, keepdim=True).clamp_min(1.0)


def apply_gate(feats: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """out[b, c, n] = A[b, c, n] · g[b, c] in the compute dtype, cast to feats.dtype.

    The output keeps feats' memory format (NCHW or channels_last).
    """
    fmt = torch.channels_last if (feats.dim() == 4 and feats.is_contiguous(memory_format=torch.channels_last)
                                  and not feats.is_contiguous()) else torch.contiguous_format
    out = feats.to(g.dtype) * g[:, :, None, None]
    return out.to(feats.dtype).contiguous(memory_format=fmt)


def suppress(feats: torch.Tensor, class_logits: torch.Tensor, k: Optional[int], *, drop=None) -> torch.Tensor:
    """design §2 (from logits) + §3. Differentiable in feats only (dA = dOut·g)."""
    B, C = feats.shape[:2]
    K = class_logits.shape[1]
    S = class_importance(feats, class_logits)
    g = channel_gate(S, k, drop_mask(drop, B, K, feats.device))
    return apply_gate(feats, g)


def class_drop(feats: torch.Tensor, class_weight: torch.Tensor, k: Optional[int] = None, *, drop=None) -> torch.Tensor:
    """design §2 (from weights, the paper's method) + §3. Differentiable in feats and class_weight."""
    B = feats.shape[0]
    K = class_weight.shape[0]
    S = weight_importance(class_weight, compute_dtype(feats, class_weight))
    g = channel_gate(S, k, drop_mask(drop, B, K, feats.device))
    return apply_gate(feats, g)


# ----------------------------------------------------------------------------- §4 loss

class DropClassLoss(NamedTuple):
    """Result of ``dropclass_loss``: the total (differentiable) and its three
    components (detached, for logging)."""
    loss: torch.Tensor
    ce: torch.Tensor
    ce_drop: torch.Tensor
    sup: torch.Tensor


def upsample(logits: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinear, align_corners=False, in the compute dtype; identity at the same size."""
    x = logits.to(compute_dtype(logits))
    if tuple(logits.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def weighted_ce(x: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], ignore_index: int) -> torch.Tensor:
    """Σ_p w[y_p]·(−log softmax(x)[y_p, p]) / Σ_p w[y_p] over non-ignored pixels.

    PyTorch's weighted-mean cross-entropy, except that it is 0 with zero
    gradient when no pixel counts (F.cross_entropy gives NaN there).
    """
    valid = target != ignore_index
    y = torch.where(valid, target, torch.zeros_like(target)).long()
    nll = -torch.log_softmax(x, dim=1).gather(1, y[:, None]).squeeze(1)
    w = valid.to(x.dtype)
    if weight is not None:
        w = w * weight.to(x.dtype)[y]
    num = (w * nll).sum()
    den = w.sum()
    return num / torch.where(den > 0, den, torch.ones_like(den))


def drop_labels(target: torch.Tensor, dropped: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """y_drop: every pixel of a class dropped for its sample set to ignore_index."""
    B, K = dropped.shape
    valid = target != ignore_index
    y = torch.where(valid, target, torch.zeros_like(target)).long().clamp(0, K - 1)
    hit = dropped.gather(1, y.flatten(1)).reshape(target.shape) & valid  # flatten: B = 0 works
    return torch.where(hit, torch.full_like(target, ignore_index), target)


def suppression_term(logits_drop: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """sup: mean over dropped (b, j) of the mean low-resolution softmax(logits_drop)[b, j]; 0 if none."""
    p = torch.softmax(logits_drop.to(compute_dtype(logits_drop)), dim=1).mean(dim=(2, 3))
    d = dropped.to(p.dtype)
    n = d.sum()
    return (p * d).sum() / torch.where(n > 0, n, torch.ones_like(n))


def dropclass_loss(
    logits: torch.Tensor,
    logits_drop: torch.Tensor,
    target: torch.Tensor,
    drop,
    *,
    lam: float,
    alpha: float = 10.0,
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = 255,
) -> DropClassLoss:
    """loss = lam·CE(up(logits), y) + (1 − lam)·CE(up(logits_drop), y_drop) + alpha·sup (design §4)."""
    B, K = logits.shape[:2]
    size = tuple(target.shape[1:])
    dropped = drop_mask(drop, B, K, logits.device)
    ce = weighted_ce(upsample(logits, size), target, weight, ignore_index)
    ce_drop = weighted_ce(upsample(logits_drop, size), drop_labels(target, dropped, ignore_index), weight, ignore_index)
    sup = suppression_term(logits_drop, dropped)
    loss = lam * ce + (1.0 - lam) * ce_drop + alpha * sup
    return DropClassLoss(loss, ce.detach(), ce_drop.detach(), sup.detach())
