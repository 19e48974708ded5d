"""`auto`: per (GPU, dtype, head dim, batch·heads bucket, length bucket, causal, mask) use whichever of the Sage
variants and SDPA is fastest, decided once by timing them on the first real call of that kind and cached on disk.
The batch·heads bucket is there because one length can go either way: on the H200 at 8k tokens, Flux's 24 heads
(a short call, where SDPA wins) and 64 batch·heads (where the FP8 kernel wins) fell into one entry.

All candidates are within the accuracy bounds the benchmark checks (FP16 P·V: cosine ≥ 0.9999; FP8 P·V:
cosine ≥ 0.999), so the choice is about speed alone; where SDPA wins, turning Sage on costs nothing.
"""
from __future__ import annotations

import functools
import os

import torch

from . import backend
from .config import SageConfig
from .timing import interleaved_median_ms

TIMING_REPEATS = 3  # samples per candidate
TIMING_ROUNDS = 3  # taken one per round, the candidates in turn
# Below this many score elements per head a call is launch-bound: exact attention, no measurement.
MIN_SCORES_FOR_SAGE = 256 * 256


@functools.lru_cache(maxsize=None)
def choice_cache():
    from ..kernels import tuning

    return tuning.TuningCache(f"auto-{backend.device_tag()}.json", tuning.shipped_table(backend.gpu_name(), "auto"))


def choice_key(q, k, is_causal: bool, has_bias: bool, config: SageConfig, rotary: bool = False) -> str:
    return _choice_key(q.shape[-1], q.shape[0] * q.shape[1], q.shape[2], k.shape[2], q.dtype, is_causal, has_bias,
                       config, rotary)


@functools.lru_cache(maxsize=4096)
def _choice_key(d: int, bh: int, nq: int, nk: int, dtype, is_causal: bool, has_bias: bool,
                config: SageConfig, rotary: bool = False) -> str:
    """The key string, made once per distinct call: at image sizes a call lasts ~0.2 ms and the host's work
    per call shows in the time (bench/NOTES.md, "auto's host path"). Calls that bring a rotary table have keys of
    their own ("|rope"): what they time differs (the rotation inside Sage, or before the exact attention)."""
    from ..kernels import tuning

    return (f"d{d}|bh{tuning.seq_bucket(bh)}|nq{tuning.seq_bucket(nq)}|nk{tuning.seq_bucket(nk)}|"
            f"{str(dtype).replace('torch.', '')}|{'causal' if is_causal else 'full'}|"
            f"{'mask' if has_bias else 'nomask'}|{config.qk_granularity}{config.quant_block}|"
            f"sk{int(config.smooth_k)}sv{int(config.smooth_v)}" + ("|rope" if rotary else ""))


def candidates(device) -> list[str]:
    names = ["int8_fp16", "sdpa"]
    if backend.supports_fp8(device):
        names.insert(0, "int8_fp8")
    return names


def choose(q, k, v, *, is_causal: bool, bias, config: SageConfig, host_exact=None, rope=None) -> str:
    """The variant `auto` runs for these HND inputs. host_exact, rope: see time_variants."""
    if q.device.type != "cuda":
        return "int8_fp16"  # the interpreter is for correctness, not speed
    if q.shape[2] * k.shape[2] < MIN_SCORES_FOR_SAGE:
        return "sdpa"
    key = choice_key(q, k, is_causal, bias is not None, config, rope is not None)
    cached = choice_cache().get(key)
    if cached:
        return cached["variant"]
    if torch.cuda.is_current_stream_capturing() or os.environ.get("SAGE_ATTENTION_NO_AUTOTIME"):
        return "int8_fp8" if backend.supports_fp8(q.device) else "int8_fp16"
    timings = time_variants(q, k, v, is_causal=is_causal, bias=bias, config=config, host_exact=host_exact, rope=rope)
    best = min(timings, key=timings.get)
    choice_cache().put(key, {"variant": best, "ms": timings})
    return best


def time_variants(q, k, v, *, is_causal: bool, bias, config: SageConfig, host_exact=None,
                  rope=None) -> dict[str, float]:
    """Median milliseconds of each candidate on these very inputs (warm-up run excluded). rope: the call's rotary
    table (sage_core/rope.py), timed as each candidate runs it: inside Sage's quantization, before the exact
    attention.

    host_exact: where a host runs its own exact attention for the calls `auto` leaves exact (ComfyUI's hook), that
    attention on this very call, as a function of no arguments: it is timed as the exact candidate instead of
    PyTorch's SDPA called here, because it is what will run, and the two need not match: in a ComfyUI process, in
    inference mode, SDPA called plainly took 61 ms at Wan2.1's shape where ComfyUI's attention (cuDNN first) took
    39.4 ms in the model's forward (bench/NOTES.md, "Inside the Wan2.1 forward")."""
    from . import rope as rotary
    from .dispatch import sdpa

    mask = None if bias is None else (bias[:, :, None, :] / backend.LOG2E).to(q.dtype)

    def exact():
        qe, ke = (q, k) if rope is None else (rotary.rotate(q, rope), rotary.rotate(k, rope))
        return sdpa(qe, ke, v, is_causal=is_causal, attn_mask=mask)

    runs = {}
    for name in candidates(q.device):
        if name == "sdpa":
            runs[name] = host_exact or exact
        else:
            runs[name] = functools.partial(backend.run, q, k, v, layout="HND", sm_scale=q.shape[-1] ** -0.5,
                                           is_causal=is_causal, bias=bias, config=config,
                                           pv_fp8=name == "int8_fp8", return_lse=False, rope=rope)
    # interleaved rounds: a close call between SDPA and a Sage variant is decided by the code, not by the
    # machine's drift between one timing and the next; a variant that cannot compile or launch here is simply
    # not a candidate
    timed = interleaved_median_ms(runs, rounds=TIMING_ROUNDS, per_round=max(1, TIMING_REPEATS // TIMING_ROUNDS))
    if isinstance(timed.get("sdpa"), str):
        raise RuntimeError(f"exact attention failed while timing auto's candidates: {timed['sdpa']}")
    return {name: ms for name, ms in timed.items() if not isinstance(ms, str)}
