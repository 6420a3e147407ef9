"""Input validation shared by every op and every backend (design §5).

Shape, dtype and device checks read only metadata and always run. Checks that
read tensor *values* (label range, drop indices) synchronise the host with the
device, so they can be switched off -- for CUDA-graph capture or a tight
training loop:

* ``debias_ops.set_value_checks(False)`` (process-wide), or
* ``with debias_ops.value_checks(False): ...`` (scoped), or
* the environment variable ``DEBIAS_OPS_VALUE_CHECKS=0``.

They are also skipped automatically while a CUDA graph is being captured and
while ``torch.compile`` traces (where reading a value would break the graph).
With value checks off, out-of-range values give undefined results.
Every error names the offending argument as spelled in design §5.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator, Optional

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_value_checks: Optional[bool] = None  # None: follow DEBIAS_OPS_VALUE_CHECKS (default on)


def set_value_checks(enabled: bool) -> None:
    """Turn the checks that read tensor values on or off, process-wide."""
    global _value_checks
    _value_checks = bool(enabled)


@contextlib.contextmanager
def value_checks(enabled: bool) -> Iterator[None]:
    """Context manager: value checks on/off inside the block."""
    global _value_checks
    previous = _value_checks
    _value_checks = bool(enabled)
    try:
        yield
    finally:
        _value_checks = previous


def value_checks_enabled(*tensors: torch.Tensor) -> bool:
    if _value_checks is not None:
        enabled = _value_checks
    else:
        enabled = os.environ.get("DEBIAS_OPS_VALUE_CHECKS", "1").strip().lower() not in ("0", "false", "no", "off")
    if not enabled:
        return False
    if torch.compiler.is_compiling():
        return False
    if any(t.is_cuda for t in tensors) and torch.cuda.is_current_stream_capturing():
        return False
    return True


# ----------------------------------------------------------------------------- helpers

def check_tensor(x, name: str, ndim=None, floating: bool = True) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if ndim is not None and x.dim() not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")


def check_same_device(ref: torch.Tensor, ref_name: str, x: torch.Tensor, name: str) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}: mixed devices")


def check_int(value, name: str, low=None, high=None) -> int:
    """An int (not bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np  # numpy integers are fine
            if isinstance(value, np.integer):
                value = int(value)
            else:
                raise TypeError
        except (ImportError, TypeError):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name}={value} is out of range [{low}, {high}]")
    return value


def check_unit_float(value, name: str) -> float:
    """A real number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(value).__name__}")
    value = float(value)
    if not 0.0 <= value <= 1.0:  # NaN fails this too
        raise ValueError(f"{name}={value} is outside [0, 1]")
    return value


def check_float(value, name: str, low=None, high=None, *, low_open: bool = False) -> float:
    """A finite real number (not bool) in [low, high] (``low_open``: (low, high])."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            import numpy as np  # numpy scalars are fine
            if not isinstance(value, (np.integer, np.floating)) or isinstance(value, np.bool_):
                raise TypeError
        except (ImportError, TypeError):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}") from None
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name}={value} must be {'>' if low_open else '>='} {low}")
    if high is not None and value > high:
        raise ValueError(f"{name}={value} must be <= {high}")
    return value


def check_bool(value, name: str) -> bool:
    """A real bool (numpy's included): ``per_sample="no"`` is an error, not True."""
    if isinstance(value, bool):
        return value
    try:
        import numpy as np
        if isinstance(value, np.bool_):
            return bool(value)
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"{name} must be True or False, got {value!r}")


def check_class_weight_values(weight: torch.Tensor, name: str = "weight") -> None:
    """Cross-entropy class weights: finite, >= 0, not all zero (reads the values: one host sync)."""
    w = weight.detach()
    if bool(torch.isfinite(w).all() & (w >= 0).all() & ((w > 0).any() | (w.numel() == 0))):
        return  # one host sync when the weights are fine; the messages below read them again
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name} must hold finite class weights, got {w.tolist()[:10]}")
    if bool((w < 0).any()):
        raise ValueError(f"{name} must hold non-negative class weights, got {w.tolist()[:10]}")
    if w.numel() and not bool((w > 0).any()):
        raise ValueError(f"{name} must hold a positive class weight (all are 0: the loss would be 0/0)")


def check_k(k, C: int) -> Optional[int]:
    """None (keep every channel) or an int in [1, C]."""
    if k is None:
        return None
    return check_int(k, "k", 1, C)


# ----------------------------------------------------------------------------- per op

def check_feats(feats) -> None:
    check_tensor(feats, "feats", ndim=4)
    if feats.shape[1] < 1:  # C = 0 crashed deep inside the moments with a reshape error
        raise ValueError(f"feats must have C >= 1 channels, got shape {tuple(feats.shape)}")


def check_class_logits(feats, class_logits) -> int:
    check_feats(feats)
    check_tensor(class_logits, "class_logits", ndim=4)
    check_same_device(feats, "feats", class_logits, "class_logits")
    B, _, H, W = feats.shape
    if class_logits.shape[0] != B or class_logits.shape[2:] != (H, W):
        raise ValueError(
            f"class_logits must have shape (B, K, H, W) = ({B}, K, {H}, {W}) to match feats, "
            f"got {tuple(class_logits.shape)}"
        )
    K = class_logits.shape[1]
    if K < 2:
        raise ValueError(f"class_logits must have K >= 2 classes, got K={K}")
    return K


def check_class_weight(feats, class_weight) -> int:
    check_feats(feats)
    check_tensor(class_weight, "class_weight", ndim=(2, 4))
    check_same_device(feats, "feats", class_weight, "class_weight")
    C = feats.shape[1]
    shape = tuple(class_weight.shape)
    if class_weight.dim() == 4 and shape[2:] != (1, 1):
        raise ValueError(f"class_weight must be (K, C) or (K, C, 1, 1), got {shape}")
    if shape[1] != C:
        raise ValueError(f"class_weight must have C={C} input channels to match feats, got {shape}")
    K = shape[0]
    if K < 2:
        raise ValueError(f"class_weight must have K >= 2 classes, got K={K}")
    return K


def check_drop(drop, B: int, K: int, device: torch.device) -> None:
    """drop: None, an int class index (-1: none), an integer tensor (B,) with -1
    for "none", or a bool tensor (B, K) with True = dropped."""
    if drop is None:
        return
    if isinstance(drop, torch.Tensor):
        check_same_device_drop(drop, device)
        if drop.dtype == torch.bool:
            if tuple(drop.shape) != (B, K):
                raise ValueError(f"drop as a bool mask must have shape (B, K) = ({B}, {K}), got {tuple(drop.shape)}")
            return
        if drop.is_floating_point() or drop.is_complex():
            raise TypeError(f"drop must be an int, an integer tensor (B,) or a bool tensor (B, K), got {drop.dtype}")
        if drop.dim() == 0:
            drop = drop.reshape(1).expand(B)
        if tuple(drop.shape) != (B,):
            raise ValueError(f"drop as class indices must have shape (B,) = ({B},), got {tuple(drop.shape)}")
        if drop.numel() and value_checks_enabled(drop):
            bad = (drop < -1) | (drop >= K)
            if bool(bad.any()):
                raise ValueError(f"drop holds class indices outside [-1, {K}): {drop[bad][:5].tolist()}")
        return
    check_int(drop, "drop", -1, K - 1)


def check_same_device_drop(drop: torch.Tensor, device: torch.device) -> None:
    if drop.device != device:
        raise ValueError(f"drop is on {drop.device} but the data is on {device}: mixed devices")


def check_loss_inputs(logits, logits_drop, target, drop, lam, alpha, weight, ignore_index) -> int:
    check_tensor(logits, "logits", ndim=4)
    check_tensor(logits_drop, "logits_drop", ndim=4)
    check_tensor(target, "target", ndim=3, floating=False)
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer labels, got {target.dtype}")
    check_same_device(logits, "logits", logits_drop, "logits_drop")
    check_same_device(logits, "logits", target, "target")
    B, K = logits.shape[:2]
    if K < 2:
        raise ValueError(f"logits must have K >= 2 classes, got K={K}")
    if logits_drop.shape != logits.shape:
        raise ValueError(f"logits_drop must have the shape of logits {tuple(logits.shape)}, got {tuple(logits_drop.shape)}")
    if target.shape[0] != B:
        raise ValueError(f"target must have batch size {B} to match logits, got shape {tuple(target.shape)}")
    check_unit_float(lam, "lam")
    check_float(alpha, "alpha", 0.0)
    check_int(ignore_index, "ignore_index")
    if weight is not None:
        check_tensor(weight, "weight", ndim=1)
        check_same_device(logits, "logits", weight, "weight")
        if weight.shape[0] != K:
            raise ValueError(f"weight must have shape (K,) = ({K},), got {tuple(weight.shape)}")
        if value_checks_enabled(weight):
            check_class_weight_values(weight)
    check_drop(drop, B, K, logits.device)
    if target.numel() and value_checks_enabled(target):
        t = target.long() if target.dtype != torch.uint8 else target.to(torch.int16)
        bad = (t != ignore_index) & ((t < 0) | (t >= K))
        if bool(bad.any()):
            raise ValueError(
                f"target holds labels outside [0, {K}) that are not ignore_index={ignore_index}: "
                f"{torch.unique(t[bad])[:5].tolist()}"
            )
    return K


def check_sample_drop(batch, num_classes, p) -> None:
    check_int(batch, "batch", 0)
    check_int(num_classes, "num_classes", 2)
    check_unit_float(p, "p")
