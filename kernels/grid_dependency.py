"""Programmatic dependent launch: which of a call's launches chain.

A chained launch starts on the multiprocessors that the previous launch's last wave leaves free and waits there
(griddepcontrol.wait) for that launch's results, instead of starting only after it has ended and been retired;
the previous launch lets it start (griddepcontrol.launch_dependents) once all of its own programs have. Before
its wait a chained launch may only read what the previous launch does not write (the call's inputs). CUDA
GPUs of compute capability 9 and later; elsewhere the kernels compile without the instructions and launch as
usual.
"""
from __future__ import annotations

import os

import torch

from .tuning import cuda_capability, interpreting

# SAGE_ATTENTION_GRID_DEPENDENCY=0 launches every kernel as usual (a driver or tool that mishandles chained
# launches); the benchmarks flip ENABLED to measure both ways
ENABLED = os.environ.get("SAGE_ATTENTION_GRID_DEPENDENCY", "1") not in ("", "0")


def chains_launches(device: torch.device) -> bool:
    """Whether launches on `device` can chain: a CUDA GPU of compute capability 9 or later."""
    major = (cuda_capability(device) or (0, 0))[0]
    return major >= 9


def grid_dependency(device: torch.device) -> bool:
    """Whether a call's launches on `device` chain now: chains_launches, outside the interpreter, while ENABLED."""
    return ENABLED and not interpreting() and chains_launches(device)


def chained_launch(chained: bool) -> dict:
    """The launch option of a launch that chains on the previous one (Triton's launch_pdl), where it does."""
    return {"launch_pdl": True} if chained else {}
