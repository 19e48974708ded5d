"""Median timing of callables: CUDA events on the GPU (no host clock in the figure), a clock elsewhere."""
from __future__ import annotations

import math
import random
import statistics
import time

import torch

# On the GPU each sample times back-to-back calls filling at least this long, as a model's forward issues
# them: the host's launch work then overlaps the device's, and the figure is the device's time per call.
MIN_SAMPLE_MS = 2.0
MAX_CALLS_PER_SAMPLE = 50
# Before each callable's samples in an interleaved round, it runs untimed for at least this long: a GPU at its
# power limit moves its clock with the load (measured on an H200 at 700 W: 1470-1980 MHz during the benchmark,
# and without this step the same kernel read 6% apart as two methods of one round).
SETTLE_MS = 100.0
MAX_SETTLE_CALLS = 200
LEAD_CALLS = 1  # untimed calls queued ahead of each GPU sample (see sample_ms)


def error_line(e: Exception) -> str:
    """An exception in one line, as benchmark rows report a method that could not run."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def one_call_ms(fn) -> float | None:
    """Device milliseconds of one fn() call (None off the GPU)."""
    if not torch.cuda.is_available():
        return None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return max(start.elapsed_time(end), 1e-3)


def calls_filling(call_ms: float | None, target_ms: float, most: int) -> int:
    """How many back-to-back calls of call_ms fill target_ms, within 1..most (1 off the GPU)."""
    return 1 if call_ms is None else max(1, min(most, math.ceil(target_ms / call_ms)))


def calls_per_sample(fn) -> int:
    """How many back-to-back calls of fn fill one sample (1 off the GPU)."""
    return calls_filling(one_call_ms(fn), MIN_SAMPLE_MS, MAX_CALLS_PER_SAMPLE)


def sample_ms(fn, calls: int) -> float:
    """Milliseconds per call over `calls` back-to-back calls of fn. On the GPU the timed calls follow one
    untimed call (LEAD_CALLS), so that the host is a call ahead of the device when the clock starts, as in a
    model's forward: a sample started from an idle GPU also timed the first call's host latency (25–75 µs per
    sample at image sizes on the H200, whichever attention ran). A host slower than the device still shows:
    the device then waits between the timed calls."""
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) * 1e3 / calls
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(LEAD_CALLS):
        fn()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def median_ms(fn, warmup: int = 1, repeats: int = 10) -> float:
    """Median milliseconds per fn() call over `repeats` samples, after `warmup` untimed runs (compilation,
    caches)."""
    for _ in range(warmup):
        fn()
    calls = calls_per_sample(fn)
    return statistics.median(sample_ms(fn, calls) for _ in range(repeats))


def visit_order(names: list, round_index: int) -> list:
    """The order in which round `round_index` visits `names`: the given order first, then a fixed pseudo-random
    permutation per round. A rotation per round (what this did before) keeps every callable behind the same one
    in every round but the first: in the model forwards with the peers, ComfyUI's default always ran right
    after comfy-kitchen's forward and read 4% slower than the same attention through the node (bench/NOTES.md)."""
    if round_index == 0 or len(names) < 2:
        return list(names)
    return random.Random(round_index).sample(names, len(names))


def interleaved_median_ms(fns: dict, rounds: int = 5, per_round: int = 2, warmup: int = 1,
                          settle_ms: float = SETTLE_MS) -> dict:
    """Median milliseconds per call of each named callable, sampled in rounds that visit every callable in
    turn, so that a drift of the machine (clocks, temperature, other work on the host) reaches all of them
    alike: timed one after another, the same SDPA call read up to 11% apart within one run. On the GPU each
    visit first runs the callable untimed for settle_ms (see SETTLE_MS). Each round visits them in its own
    order (visit_order), so that no callable always follows the same one. Returns {name: ms}, or
    {name: "ExceptionType: message"} for a callable that raised (it is then left out)."""
    result, calls, settle = {}, {}, {}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                fn()
            call_ms = one_call_ms(fn)
            calls[name] = calls_filling(call_ms, MIN_SAMPLE_MS, MAX_CALLS_PER_SAMPLE)
            settle[name] = calls_filling(call_ms, settle_ms, MAX_SETTLE_CALLS) if call_ms and settle_ms > 0 else 0
        except Exception as e:  # reported per callable, the others still timed
            result[name] = error_line(e)
    samples = {name: [] for name in calls}
    for r in range(rounds):
        for name in visit_order(list(samples), r):
            try:
                for _ in range(settle[name]):
                    fns[name]()
                samples[name] += [sample_ms(fns[name], calls[name]) for _ in range(per_round)]
            except Exception as e:
                result[name] = error_line(e)
                del samples[name]
    result.update({name: statistics.median(s) for name, s in samples.items()})
    return {name: result[name] for name in fns if name in result}
