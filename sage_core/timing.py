"""Median timing of a callable: CUDA events on the GPU (no host clock in the figure), a clock elsewhere."""
from __future__ import annotations

import time

import torch


def median_ms(fn, warmup: int = 1, repeats: int = 10) -> float:
    """Median milliseconds of fn() over `repeats` runs, after `warmup` untimed runs (compilation, caches)."""
    for _ in range(warmup):
        fn()
    times = []
    cuda = torch.cuda.is_available()
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]
