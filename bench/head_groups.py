"""Whole FP8 calls with their heads in groups, each group's quantization and attention on a CUDA stream of its own,
against the plain call and PyTorch's default SDPA, in interleaved rounds on one machine.

The quantization is bound by memory and the attention kernel by its tensor cores. In one call they run one after
the other; with the heads in groups, a group's quantization can run beside the attention of the groups before it
(a head's attention needs only its own head's codes and statistics), and the last wave of one group's attention
beside the first of the next. Arms: GROUPS (2, 3, 4, ...), `chain` (a group's quantization waits for the one
before it, so that the groups' quantizations do not all start at once) and stream priorities (`first`: the first
group's stream highest, `last`: the last group's).

    python bench/head_groups.py [--shapes flux_1024px ...] [--arms g2 g3c s3-hi ...] [--rounds 9] [--graphs]
        [--out head_groups.json]

An arm is g<GROUPS>[c][-first|-last] (each group's quantization and attention on the group's stream) or
s<GROUPS>[-hi] (every group's quantization on one stream, high priority with -hi, each group's attention on its
own). --graphs also times every call captured in a CUDA graph (three calls a replay), the host's share left out.
Per shape: each arm's milliseconds, the ratios to SDPA and to the plain call,
the host's milliseconds per call, and whether the arm's output is the plain call's bits (else the largest
difference and the relative L1 error of both against FP32 attention on the last heads).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import re
import sys
from pathlib import Path

import torch

from sage_attention_pack.kernels import head_groups, hopper_launch, launch
from sage_attention_pack.kernels.call_plan import PLANS
from sage_attention_pack.sage_core import timing
from sage_attention_pack.sage_core.config import SageConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is a folder of scripts
from settings_ab import breakdown, fp8_call, last_heads_error, parse_shape, run_shapes  # noqa: E402

ARM = re.compile(r"^(?:g(\d+)(c?)(?:-(first|last))?|s(\d+)(-hi)?)$")
DEFAULT_ARMS = ("g2", "s2", "s3", "s4", "s2-hi", "s3-hi", "s4-hi")


def parse_arm(text: str):
    """g<GROUPS>[c][-first|-last] -> ("g", groups, chain, priority); s<GROUPS>[-hi] -> ("s", groups, high)."""
    m = ARM.match(text)
    groups = int(m.group(1) or m.group(4)) if m else 0
    if groups < 2:
        raise ValueError(f"arm {text!r} is not g<GROUPS>[c][-first|-last] or s<GROUPS>[-hi] with at least 2 groups")
    return ("g", groups, bool(m.group(2)), m.group(3)) if m.group(1) else ("s", groups, bool(m.group(5)))


def head_bounds(heads: int, groups: int) -> list[tuple[int, int]]:
    """`groups` ranges of heads as even as they go (the first ones one head longer)."""
    size, extra = divmod(heads, groups)
    bounds, start = [], 0
    for g in range(groups):
        end = start + size + (g < extra)
        bounds.append((start, end))
        start = end
    return [b for b in bounds if b[1] > b[0]]


# the event the next group's stream waits on: recorded on a group's stream just before its attention launch
QUANT_DONE: list = [None]
# split arms: (the group's attention stream, its event); the attention launch and the rest of the call move there
ATTENTION: list = [None]
# split arms: a tag per group that keys its own call plan (groups of one size on one stream share a signature)
TAG: list = [None]
_plain_launch = hopper_launch.launch
_plain_plan = PLANS.plan


def recording_launch(*args, **kwargs):
    if QUANT_DONE[0] is not None:
        QUANT_DONE[0].record()
    if ATTENTION[0] is not None:
        stream, event = ATTENTION[0]
        event.record()
        stream.wait_event(event)
        torch.cuda.set_stream(stream)  # the caller of sage_forward sets its stream back
    return _plain_launch(*args, **kwargs)


def tagged_plan(device, signature, make_buffers):
    if TAG[0] is None:
        return _plain_plan(device, signature, make_buffers)
    plan = _plain_plan(device, (TAG[0], signature), make_buffers)
    plan.stream = None  # each launch on the stream current at its launch
    return plan


@contextlib.contextmanager
def hooks():
    """The Hopper launch and the call plans' look-up wrapped for the arms (pass-throughs while no arm sets them),
    PLANS' limits raised so that every arm's plans stay kept, and the library's own split off (the plain call is
    the whole call; bench/settings_ab.py's `head_groups.GROUPS` arms time the library's split); all as it was
    afterwards."""
    limits, library_groups = (PLANS.max_bytes, PLANS.plan_max_bytes), head_groups.GROUPS
    head_groups.GROUPS = 1  # the plain call whole: the library's own split (kernels/head_groups.py) stays out
    # every plan kept: a plan made per call would free its buffers on the group's quantization stream while its
    # attention stream still reads them (the first run of the `s` arms read such reused memory at Wan2.1's shape)
    hopper_launch.launch, PLANS.plan, PLANS.max_bytes, PLANS.plan_max_bytes = recording_launch, tagged_plan, \
        1 << 36, 1 << 36
    try:
        yield
    finally:
        hopper_launch.launch, (PLANS.max_bytes, PLANS.plan_max_bytes) = _plain_launch, limits
        head_groups.GROUPS = library_groups
        del PLANS.plan  # the class's method again
        PLANS.clear()


def stream_priorities() -> tuple[int, int]:
    """(lowest, highest) priority a stream can have here."""
    return torch.cuda.Stream.priority_range() if hasattr(torch.cuda.Stream, "priority_range") else (0, -1)


class HeadSlices:
    """The FP8 call of (q, k, v) as calls of launch.sage_forward on ranges of heads, writing into one output."""

    def __init__(self, q, k, v, config, groups: int):
        self.q, self.k, self.v, self.config = q, k, v, config
        self.bounds = head_bounds(q.shape[1], groups)
        self.repairs = torch.zeros(1, device=q.device, dtype=torch.int32)
        self.sage = SageConfig(kernel="int8_fp8")

    def forward(self, out, h0: int, h1: int) -> None:
        """Heads h0..h1 of the call into out, on the current stream."""
        q, k, v, sage = self.q, self.k, self.v, self.sage
        launch.sage_forward(
            q[:, h0:h1], k[:, h0:h1], v[:, h0:h1], out[:, h0:h1], sm_scale=q.shape[-1] ** -0.5, is_causal=False,
            bias=None, q_group=sage.q_group_rows, k_group=sage.k_group_rows, pv_fp8=True, smooth_k=sage.smooth_k,
            smooth_v=sage.smooth_v, return_lse=False, config=self.config, repair_counter=self.repairs)


class GroupedCall(HeadSlices):
    """Each group's quantization and attention on a stream of its own; the caller's stream waits for all of them."""

    def __init__(self, q, k, v, config, groups: int, chain: bool, priority: str | None):
        super().__init__(q, k, v, config, groups)
        n = len(self.bounds)
        low, high = stream_priorities()
        prio = [0] * n
        if priority == "first":
            prio = [high if g == 0 else low for g in range(n)]
        elif priority == "last":
            prio = [high if g == n - 1 else low for g in range(n)]
        self.streams = [torch.cuda.Stream(priority=p) for p in prio]
        self.quant_done = [torch.cuda.Event() for _ in range(n)]
        self.chain = chain

    def __call__(self):
        caller = torch.cuda.current_stream()
        out = torch.empty_like(self.q)
        for g, (h0, h1) in enumerate(self.bounds):
            stream = self.streams[g]
            stream.wait_stream(caller)
            if self.chain and g:
                stream.wait_event(self.quant_done[g - 1])
            with torch.cuda.stream(stream):
                QUANT_DONE[0] = self.quant_done[g]
                self.forward(out, h0, h1)
        QUANT_DONE[0] = None
        for stream in self.streams:
            caller.wait_stream(stream)
        return (out,)


class SplitCall(HeadSlices):
    """Every group's quantization on one quantization stream (high priority with `high`), one after another, and
    each group's attention (and repair) on a stream of its own that waits only for its group's quantization."""

    def __init__(self, q, k, v, config, groups: int, high: bool):
        super().__init__(q, k, v, config, groups)
        low, top = stream_priorities()
        self.quant_stream = torch.cuda.Stream(priority=top if high else 0)
        self.streams = [torch.cuda.Stream() for _ in self.bounds]
        self.events = [torch.cuda.Event() for _ in self.bounds]

    def __call__(self):
        caller = torch.cuda.current_stream()
        out = torch.empty_like(self.q)
        self.quant_stream.wait_stream(caller)
        for g, (h0, h1) in enumerate(self.bounds):
            TAG[0], ATTENTION[0] = (id(self), g), (self.streams[g], self.events[g])
            torch.cuda.set_stream(self.quant_stream)
            try:
                self.forward(out, h0, h1)
            finally:
                torch.cuda.set_stream(caller)
                TAG[0], ATTENTION[0] = None, None
        for stream in (*self.streams, self.quant_stream):
            caller.wait_stream(stream)
        return (out,)


def graphed(call, calls: int = 3):
    """call() `calls` times captured in one CUDA graph: its replay, and what one replay returns per call."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()  # warm: compiled kernels, kept layouts
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            out = call()
    return graph.replay, calls, out


def arm_call(q, k, v, config, arm):
    return GroupedCall(q, k, v, config, *arm[1:]) if arm[0] == "g" else SplitCall(q, k, v, config, *arm[1:])


def measure(shape: tuple, arms: dict, rounds: int, graphs: bool) -> dict:
    b, h, n, d = shape
    q, k, v, config, plain = fp8_call(shape)
    calls = {"plain": plain, **{name: arm_call(q, k, v, config, arm) for name, arm in arms.items()}}
    sdpa = functools.partial(torch.nn.functional.scaled_dot_product_attention, q, k, v)
    timed = {**calls, "sdpa": sdpa}
    per_replay = {}
    if graphs:
        for name, call in calls.items():
            try:
                replay, per_replay[name], _ = graphed(call)
                timed[f"graph_{name}"] = replay
            except Exception as e:  # reported in the row, the other arms still timed
                per_replay[f"error_graph_{name}"] = timing.error_line(e)
    ms = timing.interleaved_median_ms(timed, rounds=rounds)
    for name, count in per_replay.items():
        if name.startswith("error_"):
            ms[name] = count
        elif isinstance(ms.get(f"graph_{name}"), float):
            ms[f"graph_{name}"] /= count
    row = {"shape": [b, h, n, d], "launch_config": config.key(), **ms}
    for name in calls:
        for prefix in ("", "graph_") if graphs else ("",):
            if isinstance(ms.get(prefix + name), float):
                row[f"{prefix}{name}_vs_sdpa"] = ms["sdpa"] / ms[prefix + name]
                if name != "plain" and isinstance(ms.get(prefix + "plain"), float):
                    row[f"{prefix}{name}_vs_plain"] = ms[prefix + "plain"] / ms[prefix + name]
        row[f"host_ms_{name}"] = breakdown.host_ms(calls[name])
    reference = plain()[0].clone()
    for name, call in calls.items():
        if name == "plain":
            continue
        out = call()[0]
        torch.cuda.synchronize()
        row[f"same_bits_{name}"] = torch.equal(out, reference)
        if not row[f"same_bits_{name}"]:
            row[f"max_diff_{name}"] = (out.float() - reference.float()).abs().max().item()
            if n <= 8192:
                row[f"rel_l1_{name}"] = last_heads_error(out, q, k, v)
                if "rel_l1_plain" not in row:  # once, beside the first arm that differs
                    row["rel_l1_plain"] = last_heads_error(reference, q, k, v)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["flux_1024px"])
    ap.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS))
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--graphs", action="store_true", help="also time each call captured in a CUDA graph")
    ap.add_argument("--out", default="head_groups.json")
    args = ap.parse_args(argv)
    try:
        shapes = {name: parse_shape(name) for name in args.shapes}
        arms = {text: parse_arm(text) for text in args.arms}
    except ValueError as e:
        ap.error(str(e))
    if args.rounds < 1:
        ap.error("rounds must be at least 1")
    if not torch.cuda.is_available():
        raise SystemExit("head_groups times calls on CUDA streams; no CUDA GPU is available")
    with hooks():
        return run_shapes(shapes, lambda shape: measure(shape, arms, args.rounds, args.graphs), args.out,
                          {"rounds": args.rounds, "arms": args.arms, "graphs": args.graphs})


if __name__ == "__main__":
    sys.exit(main())
