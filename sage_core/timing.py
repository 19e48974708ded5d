"""Median timing of a callable: CUDA events on the GPU (no host clock in the figure), a clock elsewhere."""
from __future__ import annotations

import math
import time

import torch

# On the GPU each sample times back-to-back calls filling at least this long, as a model's forward issues
# them: the host's launch work then overlaps the device's, and the figure is the device's time per call.
MIN_SAMPLE_MS = 2.0
MAX_CALLS_PER_SAMPLE = 50


def median_ms(fn, warmup: int = 1, repeats: int = 10) -> float:
    """Median milliseconds per fn() call over `repeats` samples, after `warmup` untimed runs (compilation,
    caches)."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[len(times) // 2]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    calls = max(1, min(MAX_CALLS_PER_SAMPLE, math.ceil(MIN_SAMPLE_MS / max(start.elapsed_time(end), 1e-3))))
    times = []
    for _ in range(repeats):
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]
