"""A call's heads in groups, each group's quantization and attention on a CUDA stream of its own.

At Flux's shape on an H100 the quantization (~78 µs, bound by memory) and the attention kernel (~0.33 ms, bound by
its tensor cores) run one after the other, and each ends in a part-full wave. A head's attention needs only its own
head's codes and statistics, so with the heads in two groups on two streams one group's quantization runs beside
the other's attention, and the groups' last waves share the machine. As a script (bench/head_groups.py) two groups
took Flux's call 0.4115 -> 0.3999 ms; built as a call of the whole entry point per group it lost, each group paying a
call's host time (bench/NOTES.md, round "Heads in groups on streams of their own, …"). Here a call plan holds one
plan per group (kernels/call_plan.py), made once, so a call adds only the groups' launches and two events. Off as
shipped (GROUPS): measured, it gained too little (see there).

Where it applies (`bounds`): the Hopper ping-pong kernel with FP8 P·V, one batch (each group's row flags are then a
contiguous part of the call's), whole groups of K/V heads, a rotary table shared by every head, no bias, no LSE, no
causal mask, enough work (MIN_WORK) and at most MAX_KEYS keys: at 16k and 32k keys the split measured level or
slower, and SDXL's shorter call became bound by the host. Each group runs with its own grid and no tail split (the
other group fills the tail), so a head's output has the same bits as in the whole call wherever that does not
split its tail either.
"""
from __future__ import annotations

import threading

import torch

# groups a call's heads are split into where `bounds` allows it; 1, as shipped, never splits. On an H100 two groups
# took 0.7-0.9% off Flux's call (4608 keys) in interleaved A/Bs and lost 1.7% at 5120 keys, 0.7% at 6144, 4.8% at
# 8192 (where the whole call splits its grid's tail already) and 1.7% at 4096 with the one-warpgroup kernel there;
# three and four groups lost 9% and 40% at Flux, each group costing the host ~0.13 ms (bench/NOTES.md, round "Heads
# in groups inside the library, …"). Too little, and too unevenly, to split calls by default.
GROUPS = 1
MIN_WORK = 4e10  # B·H·Nq·Nk·D below which the groups' extra launches cost more host time than the overlap saves
MAX_KEYS = 5120
# the split on every path, the portable kernel's and the CPU interpreter's included (the tests' switch: there the
# groups run one after another, which checks everything but the streams)
ANY_PATH = False


def bounds(q, k, *, pipelined: bool, ping_pong: bool, pv_fp8: bool, return_lse: bool, has_bias: bool,
           is_causal: bool, rope: torch.Tensor | None) -> list[tuple[int, int, int, int]] | None:
    """The groups of a call on [B, H, NQ, D] q and [B, HK, NK, D] k, as (h0, h1, kh0, kh1) head ranges of Q and of
    K/V, or None where the call is not split."""
    B, H, NQ, D = q.shape
    HK, NK = k.shape[1], k.shape[2]
    groups = GROUPS
    if groups < 2 or B != 1 or HK % groups or return_lse or has_bias or is_causal or not pv_fp8:
        return None
    if rope is not None and rope.shape[1] != 1:  # a table per head would need slicing per group
        return None
    if not ANY_PATH and (not (pipelined and ping_pong) or q.device.type != "cuda" or NK > MAX_KEYS
                         or B * H * NQ * NK * D < MIN_WORK or torch.cuda.is_current_stream_capturing()):
        return None
    per_group, ratio = HK // groups, H // HK
    return [(g * per_group * ratio, (g + 1) * per_group * ratio, g * per_group, (g + 1) * per_group)
            for g in range(groups)]


class Streams(threading.local):
    """Per thread and device: the side streams of all groups but the last (which runs on the caller's stream), the
    event they wait on and the events the caller waits on. Made once, so that a call only records and waits; per
    thread, so that two threads' calls never record the same event."""

    def __init__(self):
        self.by_device: dict = {}

    def get(self, device: torch.device, sides: int) -> tuple:
        key = (device.index, sides)
        hit = self.by_device.get(key)
        if hit is None:
            hit = self.by_device[key] = ([torch.cuda.Stream(device) for _ in range(sides)], torch.cuda.Event(),
                                         [torch.cuda.Event() for _ in range(sides)])
        return hit


STREAMS = Streams()


def run(device: torch.device, groups: list, call_group) -> None:
    """call_group(group) for every group: on CUDA each but the last on a side stream that starts where the caller's
    stream stands now, the last on the caller's, and the caller's stream then waits for all of them (so the call's
    buffers, freed or reused on the caller's stream later, are never touched by a side stream again)."""
    if device.type != "cuda":
        for group in groups:
            call_group(group)
        return
    sides, fork, joins = STREAMS.get(device, len(groups) - 1)
    caller = torch.cuda.current_stream(device)
    fork.record(caller)
    for group, side, join in zip(groups, sides, joins):
        side.wait_event(fork)
        torch.cuda.set_stream(side)
        try:
            call_group(group)
        finally:
            torch.cuda.set_stream(caller)
        join.record(side)
    call_group(groups[-1])
    for join in joins:
        caller.wait_event(join)
