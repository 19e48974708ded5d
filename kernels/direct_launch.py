"""Launches of compiled Triton kernels without Triton's per-call argument binding, for calls that repeat.

`kernel[grid](...)` binds and specialises every argument, formats a cache key from them and looks the compiled
kernel up on each launch: on the H200's host that was most of the 450 µs of Python an FP8 call at Flux's shape
spent (five launches). A model's forward repeats the same few calls, so here the compiled kernel is kept under
a key of everything Triton specialises on (each tensor's dtype and 16-byte alignment, every integer's value,
each float's type, tensor descriptors' tiles and layouts, the compile-time constants and options) and launched
directly the next time. The first call of a key, and every call while a launch hook is set (a profiler) or in
the CPU interpreter, goes through Triton as usual.
"""
from __future__ import annotations

import torch

from .tuning import interpreting

try:  # what a direct launch needs from Triton (3.5-3.9); without it every launch takes Triton's path
    from triton import knobs
    from triton.runtime.driver import driver
    AVAILABLE = True
except Exception:  # noqa: BLE001 - another Triton: launches stay on its own path
    AVAILABLE = False

try:
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except Exception:  # noqa: BLE001 - no Gluon: no tensor descriptors to key
    TensorDescriptor = None


MAX_ENTRIES = 4096  # distinct calls kept (a forward has a handful; a long run of many resolutions more)


class NotKeyable(TypeError):
    """An argument whose specialisation this module does not know: the launch takes Triton's path."""


def argument_key(a):
    """What Triton specialises a runtime argument on (or more: integers by value, not by divisibility)."""
    return arguments_key((a,))[0]


def arguments_key(values) -> tuple:
    """argument_key of each value, the common types inline: a launch has 20-46 arguments, and with a function
    call per argument keying took 15 of the 77 ms that 100 FP8 calls at Flux's shape spent under the profiler."""
    key = []
    for a in values:
        kind = type(a)
        if kind is int or a is None:
            key.append(a)
        elif kind is torch.Tensor:
            key.append((a.dtype, a.data_ptr() % 16 == 0))
        elif kind is float:
            key.append(float)
        else:
            key.append(uncommon_argument_key(a))
    return tuple(key)


def uncommon_argument_key(a):
    """argument_key of what arguments_key does not take inline: booleans, words (a compile-time choice such as the
    repair's dot precision), subclasses, tensor descriptors."""
    if isinstance(a, bool):
        return bool, a
    if isinstance(a, str):
        return str, a
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    if isinstance(a, int):
        return a
    if isinstance(a, float):
        return float
    if TensorDescriptor is not None and isinstance(a, TensorDescriptor):
        return (TensorDescriptor, a.base.dtype, a.base.data_ptr() % 16 == 0, tuple(a.shape), tuple(a.strides),
                tuple(a.block_shape), a.layout, a.padding)
    raise NotKeyable(type(a).__name__)


def specialisation_key(values) -> tuple:
    """What Triton compiles into a kernel from its runtime arguments: an integer by whether it is 1 and whether 16
    divides it (not by its value), the rest as argument_key; None where an argument is not keyable."""
    try:
        return tuple(("int", a == 1, a % 16 == 0) if type(a) is int else argument_key(a) for a in values)
    except NotKeyable:
        return None


class DirectLaunches:
    """The compiled kernels launched so far, by key; `launch` is the one entry point."""

    def __init__(self):
        self.compiled = {}  # key -> (compiled kernel, the names of the keyword arguments that are parameters)
        self.hits = 0

    def launch(self, fn, grid: tuple, args: tuple, kwargs: dict):
        """fn[grid](*args, **kwargs), directly where this call's key has compiled before. Returns the entry that
        can launch this call again (None where Triton's path ran without one to keep)."""
        if not direct_path_open():
            fn[grid](*args, **kwargs)
            return None
        try:
            key = (fn, torch.cuda.current_device(), arguments_key(args), tuple(kwargs),
                   arguments_key(kwargs.values()))
            entry = self.compiled.get(key)
        except NotKeyable:
            fn[grid](*args, **kwargs)
            return None
        if entry is None:
            compiled = fn[grid](*args, **kwargs)
            params = [n for n in fn.arg_names[len(args):] if n in kwargs]
            if compiled is not None and hasattr(compiled, "packed_metadata") and \
                    len(args) + len(params) == len(fn.arg_names):
                if len(self.compiled) >= MAX_ENTRIES:  # shapes seen long ago: start over rather than grow
                    self.compiled.clear()
                entry = self.compiled[key] = (compiled, params)
            return entry
        self.run_entry(entry, grid, args, kwargs)
        return entry

    def run_entry(self, entry, grid: tuple, args: tuple, kwargs: dict, stream=None) -> None:
        """Launch a kept entry on `stream`, by default the current device's current stream (the caller knows the
        key matches)."""
        compiled, params = entry
        self.hits += 1
        runner = compiled.run  # initialises the kernel's handles on first use
        grid = tuple(grid) + (1,) * (3 - len(grid))
        if stream is None:
            stream = driver.active.get_current_stream(torch.cuda.current_device())
        runner(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, None, None, None,
               *args, *(kwargs[n] for n in params))


class LaunchSlot:
    """One launch site of a call plan (kernels/call_plan.py). A plan's signature fixes everything Triton
    specialises on, so the entry its first launch found serves every later launch without a key."""

    __slots__ = ("entry",)

    def __init__(self):
        self.entry = None

    def __call__(self, fn, grid: tuple, args: tuple, kwargs: dict, stream=None) -> None:
        """Launch fn; stream: the raw handle of the current stream where the caller has it (None: asked here)."""
        if self.entry is not None and direct_path_open():
            LAUNCHES.run_entry(self.entry, grid, args, kwargs, stream)
        else:
            self.entry = LAUNCHES.launch(fn, grid, args, kwargs)


def current_stream(device: torch.device):
    """(current device, raw handle of its current stream): where launches go now (None off CUDA). Each
    device's default stream has the handle 0, hence the device."""
    if device.type != "cuda":
        return None
    index = torch.cuda.current_device()
    if AVAILABLE:
        return index, driver.active.get_current_stream(index)
    return index, torch.cuda.current_stream(index).cuda_stream


def direct_path_open() -> bool:
    """Whether launches may skip Triton's path: not in the interpreter, and no launch hook set."""
    return AVAILABLE and not interpreting() and not hooks_set()


def hooks_set() -> bool:
    """Whether a launch hook is registered (profilers such as Proton): Triton's own path then calls it."""
    hook = knobs.runtime.launch_enter_hook
    return bool(getattr(hook, "calls", hook))


LAUNCHES = DirectLaunches()
launch = LAUNCHES.launch
