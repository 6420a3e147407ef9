"""Timing and memory measurement.

GPU: ``triton.testing.do_bench`` (median; it flushes the L2 cache before every
call, synchronises with CUDA events, and resets ``grad_to_none`` so gradients
do not accumulate). Its keyword for the median changed across Triton versions
(``return_mode="median"`` in 3.x; older builds only have ``quantiles``), so the
signature is inspected; if do_bench is missing or fails, :func:`cuda_event_bench`
does the same with CUDA events.

CPU: wall clock (``time.perf_counter``) around each call, median of the reps.
Nothing here runs at import.
"""
from __future__ import annotations

import inspect
import statistics
import time
from typing import Callable, List, Optional, Sequence

import torch


def _clear_grads(grad_to_none: Optional[Sequence[torch.Tensor]]) -> None:
    for t in grad_to_none or ():
        t.grad = None


def cuda_event_bench(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100,
                     grad_to_none: Optional[Sequence[torch.Tensor]] = None,
                     flush_bytes: int = 256 << 20) -> float:
    """Median ms of ``fn`` on the current CUDA stream, timed with CUDA events,
    the L2 cache flushed (a ``flush_bytes`` buffer zeroed) before each call."""
    cache = torch.empty(flush_bytes, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        cache.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    n_warmup = max(1, int(warmup_ms / estimate))
    n_rep = max(5, int(rep_ms / estimate))
    for _ in range(n_warmup):
        _clear_grads(grad_to_none)
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for i in range(n_rep):
        _clear_grads(grad_to_none)
        cache.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def _do_bench():
    try:
        from triton.testing import do_bench
    except Exception:  # triton missing or broken
        return None
    return do_bench


def gpu_bench(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100,
              grad_to_none: Optional[Sequence[torch.Tensor]] = None) -> float:
    """Median ms of ``fn`` on the GPU (do_bench when it works, else CUDA events)."""
    do_bench = _do_bench()
    if do_bench is not None:
        params = inspect.signature(do_bench).parameters
        kw = dict(warmup=warmup_ms, rep=rep_ms)
        if "grad_to_none" in params:
            kw["grad_to_none"] = list(grad_to_none) if grad_to_none else None
        try:
            if "return_mode" in params:
                return float(do_bench(fn, return_mode="median", **kw))
            if "quantiles" in params:
                res = do_bench(fn, quantiles=[0.5], **kw)
                return float(res[0] if isinstance(res, (list, tuple)) else res)
        except Exception:  # fall through to CUDA events
            pass
    return cuda_event_bench(fn, warmup_ms, rep_ms, grad_to_none)


def cpu_bench(fn: Callable[[], object], min_time_s: float = 0.2, max_reps: int = 20, min_reps: int = 3,
              warmup: int = 1, grad_to_none: Optional[Sequence[torch.Tensor]] = None) -> float:
    """Median ms of ``fn`` on the CPU: ``warmup`` calls, then reps until
    ``min_time_s`` has passed (at least ``min_reps``, at most ``max_reps``)."""
    for _ in range(warmup):
        _clear_grads(grad_to_none)
        fn()
    times: List[float] = []
    t_end = time.perf_counter() + min_time_s
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() < t_end):
        _clear_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench(fn: Callable[[], object], device: torch.device, *, quick: bool = False,
          grad_to_none: Optional[Sequence[torch.Tensor]] = None, cpu_min_time_s: float = 0.2,
          cpu_max_reps: int = 20) -> float:
    """Median ms of ``fn`` on ``device`` (GPU: do_bench; CPU: wall clock)."""
    if device.type == "cuda":
        warmup, rep = (10, 40) if quick else (25, 100)
        return gpu_bench(fn, warmup, rep, grad_to_none)
    return cpu_bench(fn, min_time_s=cpu_min_time_s, max_reps=cpu_max_reps, grad_to_none=grad_to_none)


def peak_extra_mib(fn: Callable[[], object], device: torch.device,
                   grad_to_none: Optional[Sequence[torch.Tensor]] = None) -> Optional[float]:
    """Peak memory one call of ``fn`` allocates beyond what is already allocated
    (the inputs, the fixed output gradient), in MiB: ``max_memory_allocated``
    during the call minus ``memory_allocated`` before it. Outputs, saved
    activations and gradients created by the call count; the inputs do not.
    None off CUDA (no allocator statistics)."""
    if device.type != "cuda":
        return None
    _clear_grads(grad_to_none)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    _clear_grads(grad_to_none)
    return peak / 2**20


def copy_bandwidth_gbps(device: torch.device, nbytes: int, quick: bool = False) -> float:
    """Device copy bandwidth in GB/s: ``dst.copy_(src)`` of ``nbytes``, counted
    as read + write (2·nbytes per copy)."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), device, quick=quick, cpu_min_time_s=0.3)
    return 2 * n * 4 / (ms * 1e-3) / 1e9
