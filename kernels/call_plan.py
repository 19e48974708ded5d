"""Call plans: what a call of one shape needs besides its inputs (workspace buffers, TMA descriptors, the
compiled kernel of each launch), kept between calls of that shape so that a repeat only launches.

A model's forward repeats a few call shapes. On the H200's host an FP8 call at Flux's shape spent ~550 µs in
Python, under cProfile ~15% of it in twelve allocations, ~13% in keying five launches and ~6% in TMA
descriptors. Reusing the buffers is safe because a call writes every buffer in full before reading it and the
calls of one stream run in order; another stream or thread gets its own plan, and a call during CUDA graph
capture gets fresh buffers, as before.

Memory: a plan is kept only where its buffers take at most PLAN_MAX_BYTES (the short calls, whose host time
shows; a 32k-token call's device time hides it), and all kept plans at most PLANS_MAX_BYTES, the least recently
used dropped first. The ComfyUI node clears them at the end of each sampling run (sage_core.backend.release_buffers).
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict

import torch

from .direct_launch import LaunchSlot, current_stream, specialisation_key

PLAN_MAX_BYTES = 64 << 20
PLANS_MAX_BYTES = 128 << 20
# A plan's launch slots reuse what their first launch compiled, so a later launch that asks for other compile-time
# arguments (a switch that is not in the call's signature), or whose runtime integers Triton would specialise
# differently (one that is 1, or that 16 divides, where the first was not), would silently run the first kernel.
# Checked where SAGE_ATTENTION_CHECK_PLANS is set (the tests set it): a comparison of both per launch.
CHECK_LAUNCHES = os.environ.get("SAGE_ATTENTION_CHECK_PLANS", "0") not in ("", "0")


def held_bytes(values, seen: set | None = None) -> int:
    """The memory the tensors among `values` hold, and those of the call plans and lists of tuples among them (a
    call split in head groups keeps a plan per group): the memory, not the elements seen, so a buffer with no
    memory of its own (an expanded stand-in) costs none, and a storage shared by views counts once."""
    seen = set() if seen is None else seen
    total = 0
    for value in values:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(value, CallPlan):
            total += held_bytes(value.buffers.values(), seen)
        elif isinstance(value, (list, tuple)):
            total += held_bytes(value, seen)
    return total


class CallPlan:
    """The buffers of one call shape, a launch slot per launch site and whatever else is derived from them."""

    def __init__(self, buffers: dict, stream=None):
        self.buffers = buffers
        self.stream = stream  # the raw handle of the stream the plan is keyed on (None: asked per launch)
        self.nbytes = held_bytes(buffers.values())
        self.slots: dict[str, LaunchSlot] = {}
        self.derived: dict = {}
        # site -> (kernel, compile-time arguments, runtime arguments' specialisation), with CHECK_LAUNCHES
        self.first_launch: dict[str, tuple] = {}

    def run(self, site: str, fn, grid: tuple, args: tuple, kwargs: dict) -> None:
        """Launch fn at one of this plan's sites (the same site launches the same specialisation every call)."""
        slot = self.slots.get(site)
        if slot is None:
            slot = self.slots[site] = LaunchSlot()
            if CHECK_LAUNCHES:
                self.first_launch[site] = (fn, dict(kwargs), specialisation_key(args))
        elif CHECK_LAUNCHES:
            self.check_launch(site, fn, args, kwargs)
        slot(fn, grid, args, kwargs, self.stream)

    def check_launch(self, site: str, fn, args: tuple, kwargs: dict) -> None:
        """Raise if a launch at `site` asks for another kernel, other compile-time arguments or another
        specialisation of its runtime arguments than its first."""
        first = self.first_launch.get(site)
        if first is None:  # the plan was made before checking was switched on
            return
        first_fn, first_kwargs, first_args = first
        if fn is first_fn and kwargs == first_kwargs:
            now = specialisation_key(args)
            if now != first_args and None not in (now, first_args):
                names = getattr(fn, "arg_names", [])
                changed = [names[i] if i < len(names) else str(i)
                           for i, (a, b) in enumerate(zip(first_args, now)) if a != b] or ["their number"]
                raise RuntimeError(
                    f"launch site {site!r} of a call plan passed {getattr(fn, '__name__', fn)} runtime arguments that "
                    f"Triton specialises otherwise than at its first launch ({', '.join(changed)}): what sets them "
                    f"must be part of the call's signature (kernels/launch.py, sage_forward)")
        else:
            changed = sorted(k for k in first_kwargs.keys() | kwargs.keys() if first_kwargs.get(k) != kwargs.get(k))
            raise RuntimeError(
                f"launch site {site!r} of a call plan asked for {getattr(fn, '__name__', fn)} with other compile-time "
                f"arguments than its first launch ({', '.join(changed) or 'another kernel'}): what sets them must "
                f"be part of the call's signature (kernels/launch.py, sage_forward)")

    def derive(self, name: str, make):
        """make(), once per plan (what the signature fixes: the kernel that serves, TMA descriptors over the plan's
        buffers)."""
        hit = self.derived.get(name)
        if hit is None:
            hit = self.derived[name] = make()
        return hit


class CallPlans:
    """The kept plans by call signature, least recently used first."""

    def __init__(self, max_bytes: int = PLANS_MAX_BYTES, plan_max_bytes: int = PLAN_MAX_BYTES):
        self.max_bytes, self.plan_max_bytes = max_bytes, plan_max_bytes
        self.plans: OrderedDict[tuple, CallPlan] = OrderedDict()
        self.nbytes = 0
        self.reused = 0
        self.lock = threading.Lock()  # threads share the table (each has its own plans in it)

    def plan(self, device: torch.device, signature: tuple, make_buffers) -> CallPlan:
        """The kept plan of this signature on the current stream and thread, else a new one (kept if it fits)."""
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return CallPlan(make_buffers())  # a graph keeps its own buffers' addresses: never share them
        stream = current_stream(device)
        key = (stream, threading.get_ident(), signature)
        with self.lock:
            plan = self.plans.get(key)
            if plan is not None:
                self.plans.move_to_end(key)
                self.reused += 1
                return plan
        plan = CallPlan(make_buffers(), stream[1] if stream is not None else None)
        if plan.nbytes <= self.plan_max_bytes:
            with self.lock:
                while self.plans and self.nbytes + plan.nbytes > self.max_bytes:
                    self.nbytes -= self.plans.popitem(last=False)[1].nbytes
                self.plans[key] = plan
                self.nbytes += plan.nbytes
        return plan

    def clear(self) -> None:
        """Drop every kept plan (their buffers return to PyTorch's allocator)."""
        with self.lock:
            self.plans.clear()
            self.nbytes = 0


PLANS = CallPlans()
