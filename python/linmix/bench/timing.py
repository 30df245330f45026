"""Timing: CUDA events with an L2 flush on the GPU (Triton's do_bench when present); on the CPU the wall clock
(perf_counter) or, with one torch thread, the calling thread's CPU time (`clock="thread"`).

Every function returns (median, p20, p80) in milliseconds. The callables are timed as given: inputs, output
gradients and layout conversions the caller wants charged are decided by whoever builds them.
"""

from __future__ import annotations

import time

import torch

QUANTILES = (0.5, 0.2, 0.8)
# CPU clocks: "thread" (time.thread_time) counts only the time the calling thread ran, so on a shared, loaded
# machine it leaves out the time spent waiting for a core; it sees no other thread's work, so it is meaningful
# only with torch.get_num_threads() == 1 (the bench refuses it otherwise).
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def _quantiles(ms: list[float]) -> tuple[float, float, float]:
    t = torch.tensor(ms, dtype=torch.float64)
    return tuple(torch.quantile(t, q).item() for q in QUANTILES)


def bench_cpu(fn, min_time_s: float, reps: int | None = None, min_reps: int = 3,
              clock: str = "wall") -> tuple[float, float, float]:
    """`clock` (CLOCKS) around single calls after one warm-up call: `reps` calls, or at least `min_reps` and
    until `min_time_s` of that clock has passed (at most 100)."""
    now = CLOCKS[clock]
    fn()
    ms, t_end = [], now() + min_time_s
    while len(ms) < (reps or 100) and (reps is not None or len(ms) < min_reps or now() < t_end):
        t0 = now()
        fn()
        ms.append((now() - t0) * 1e3)
    return _quantiles(ms)


_FLUSH: torch.Tensor | None = None


def _bench_cuda_events(fn, reps: int, warmup: int) -> tuple[float, float, float]:
    """Our own event loop, flushing L2 by writing a 256 MB buffer before each timed call."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        _FLUSH.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return _quantiles([s.elapsed_time(e) for s, e in zip(starts, ends)])


def bench_cuda(fn, rep_ms: float, reps: int | None = None) -> tuple[float, float, float]:
    """do_bench (warmup 25 ms, `rep_ms` of timed calls, L2 flushed each call) or, with a fixed `reps`
    (profiling runs) or without Triton, the CUDA-event loop above."""
    if reps is None:
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            med, p20, p80 = do_bench(fn, warmup=25, rep=rep_ms, quantiles=list(QUANTILES))
            return med, p20, p80
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        reps = max(10, min(1000, int(rep_ms / max((time.perf_counter() - t0) * 1e3, 1e-3))))
        return _bench_cuda_events(fn, reps, warmup=max(1, reps // 4))
    return _bench_cuda_events(fn, reps, warmup=1)


def bench(fn, device: str, quick: bool, reps: int | None = None, clock: str = "wall") -> tuple[float, float, float]:
    if device == "cuda":
        return bench_cuda(fn, rep_ms=50 if quick else 200, reps=reps)
    return bench_cpu(fn, min_time_s=0.05 if quick else 0.5, reps=reps, min_reps=3 if quick else 5, clock=clock)
