"""Carried statistics: a call site's K mean, V mean and V scale, kept from one call to the next.

A sampler calls each attention of a model once per step, on K and V that move little between steps. The
quantization's first launch exists only to measure those statistics (K's sampled mean, V's mean and range) for
its second. With the previous step's values instead, one launch codes Q, K and V (launch.quantize_qkv's carry),
and its last programs per head measure this step's values for the next (quant_kernels.finish_k_block and
finish_v_block). What that costs in exactness:
- K's mean: none. Any vector taken off K moves each query's scores by one constant, which the softmax drops.
- V's mean: none. The output shift is finished from this call's own V (its exact mean), whatever centre the codes
  took off.
- V's scale: a range that grew past the carried one (times launch.CARRY_MARGIN) would saturate codes. The program
  that sees it makes its head's output non-finite, and the guard's repair recomputes those rows exactly (counted
  as repaired tiles), so this mode runs only with the guard on. The next call carries the grown range.
The first call at a site measures its statistics as every call does without this mode, and primes the site.

Sites are keyed by the caller (the ComfyUI node: the call's place in the forward, the blocks the forward's options
replace, cond or uncond; nodes/override.py's carry_key) with the call's plan signature, and dropped at the end of
each sampling run with the call plans (sage_core.backend.release_buffers), so that one seed gives one image whatever
ran before.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import torch

MAX_SITES = 4096  # a sampling run's sites: blocks × calls × cond/uncond; the least recently used dropped first
# which calls with a site take carried statistics: those with the rotary table inside the quantization (ROTARY),
# whose first launch rotates K's sample and codes Q rotated, and those without (PLAIN). Measured on an H100
# (bench/NOTES.md, rounds "Statistics carried from step to step, …" and "The carried launches measured on the
# H100, …"): Flux.1's call with its table 0.445 -> 0.424 ms, Wan2.1's 25.72 -> 24.81 ms; without a table no gain,
# even at 128 registers: Flux's call 0.402 ms of device time either way (one launch of 78.5 µs for two of 38.9 and
# 38.8), B2 H32 N16384 D64 slower: the quantization is not bound by its statistics' pass or its bytes
ROTARY = True
PLAIN = False


def serves(rope: bool) -> bool:
    """Whether a call with a site, with or without the rotary table, takes carried statistics."""
    return bool(ROTARY if rope else PLAIN)


class CarriedSite:
    """One call site's statistics: values [B*HK, 3, block_d] FP32 (K's mean, V's mean, V's scale with its margin),
    and whether a call has primed them."""

    __slots__ = ("values", "primed")

    def __init__(self, rows: int, block_d: int, device):
        self.values = torch.empty((rows, 3, block_d), device=device, dtype=torch.float32)
        self.primed = False

    def prime(self, k_mean: torch.Tensor | None, v_mean: torch.Tensor, v_scale: torch.Tensor, margin: float) -> None:
        """Take a call's own statistics (quantize_qkv's k_mean, None where K was not smoothed, v_mean and v_scale)."""
        if k_mean is None:
            self.values[:, 0].zero_()
        else:
            self.values[:, 0].copy_(k_mean)
        self.values[:, 1].copy_(v_mean)
        torch.mul(v_scale, margin, out=self.values[:, 2])
        self.primed = True


class CarriedSites:
    """Every call site's CarriedSite, keyed by (the caller's key, the call's signature)."""

    def __init__(self):
        self._sites: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def site(self, key, rows: int, block_d: int, device) -> CarriedSite:
        with self._lock:
            site = self._sites.get(key)
            if site is None:
                site = self._sites[key] = CarriedSite(rows, block_d, device)
                while len(self._sites) > MAX_SITES:
                    self._sites.popitem(last=False)
            else:
                self._sites.move_to_end(key)
            return site

    def clear(self) -> None:
        with self._lock:
            self._sites.clear()

    def __len__(self) -> int:
        return len(self._sites)


SITES = CarriedSites()
