"""One typed configuration for every Sage attention call."""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

KERNELS = ("auto", "int8_fp16", "int8_fp8", "off")
GRANULARITIES = ("per_block", "per_warp", "per_thread")
QUANT_BLOCKS = (64, 128)
ON_UNSUPPORTED = ("fallback", "raise")

# Rows of Q that share one INT8 scale, per granularity (per_block uses the whole Q block).
WARP_ROWS = 16
THREAD_ROWS = 1


@dataclass(frozen=True)
class SageConfig:
    """How the 8-bit attention quantizes and which P·V precision it uses.

    kernel:          "auto" (fastest measured variant within the accuracy bounds, SDPA included),
                     "int8_fp16" (INT8 Q·Kᵀ, FP16/BF16 P·V), "int8_fp8" (INT8 Q·Kᵀ, FP8 e4m3 P·V),
                     "off" (exact attention, for A/B in one graph).
    smooth_k:        subtract K's per-channel mean over tokens before quantizing (exact for softmax).
    smooth_v:        subtract V's per-channel mean and add it back to the output (helps FP8 P·V).
    qk_granularity:  rows of Q sharing one scale: a whole quant block, a warp's 16 rows, or each row.
                     K uses one scale per key tile (per_block, per_warp) or per key token (per_thread).
    quant_block:     tokens per Q quantization block and per attention Q tile (64 or 128).
    nan_guard:       recompute a call exactly when the fast path produced a non-finite value.
    carry_stats:     where the caller names its call sites (the ComfyUI node does: block, call, cond or
                     uncond), FP8 calls take K's and V's statistics from the site's call before, one
                     quantization launch instead of two (kernels/carried_stats.py).
    on_unsupported:  "fallback" to exact attention (counted, with its reason) or "raise".
    """

    kernel: str = "auto"
    smooth_k: bool = True
    smooth_v: bool = False
    qk_granularity: str = "per_warp"
    quant_block: int = 128
    nan_guard: bool = True
    carry_stats: bool = True
    on_unsupported: str = "fallback"

    def __post_init__(self):
        _check_choice("kernel", self.kernel, KERNELS)
        _check_choice("qk_granularity", self.qk_granularity, GRANULARITIES)
        _check_choice("quant_block", self.quant_block, QUANT_BLOCKS)
        _check_choice("on_unsupported", self.on_unsupported, ON_UNSUPPORTED)

    def with_(self, **changes) -> "SageConfig":
        try:  # every call through sageattn() with keywords derives one: once per distinct change
            return _derived(self, tuple(sorted(changes.items())))
        except TypeError:  # an unhashable value: replace() itself says what is wrong
            return replace(self, **changes)

    @property
    def q_group_rows(self) -> int:
        """How many consecutive query rows share one INT8 scale."""
        return {"per_block": self.quant_block, "per_warp": WARP_ROWS, "per_thread": THREAD_ROWS}[self.qk_granularity]

    @property
    def k_group_rows(self) -> int:
        """How many consecutive key rows share one INT8 scale: 1 (per token, for per_thread), or 0 meaning
        one scale per key tile of the attention kernel (64 or 128 keys), as the official kernels do."""
        return 1 if self.qk_granularity == "per_thread" else 0


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"SageConfig.{name}={value!r} is not one of {', '.join(map(repr, allowed))}")


@functools.lru_cache(maxsize=256)
def _derived(config: SageConfig, changes: tuple) -> SageConfig:
    return replace(config, **dict(changes))


DEFAULT_CONFIG = SageConfig()  # frozen: one instance serves every call that brings none
