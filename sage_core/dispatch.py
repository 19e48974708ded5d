"""The dispatcher: validate once, pick the kernel for device/dtype/shape, fall back to SDPA with a reason.

Rules it keeps:
- bad input (rank, shapes, layout, device mix) raises ValueError/TypeError naming the argument, before
  any work, whatever `on_unsupported` says: that is a caller bug, not an unsupported case;
- input the fast path cannot serve runs `torch.nn.functional.scaled_dot_product_attention` and the
  reason is counted (or raised, with on_unsupported="raise");
- output tiles of a fast-path call that hold NaN/Inf are recomputed exactly on the device (no host
  synchronisation) and counted, so wherever exact attention is finite the result is finite.
"""
from __future__ import annotations

import logging
import math
import threading
from collections import Counter

import torch
import torch.nn.functional as F

from ..kernels.tuning import seq_bucket  # triton-free
from . import autoselect, backend, rope as rotary
from .config import DEFAULT_CONFIG, SageConfig

log = logging.getLogger("sage_attention_pack")
LAYOUTS = ("HND", "NHD")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


class UnsupportedInput(RuntimeError):
    """Raised with on_unsupported="raise" when the fast path cannot serve a call."""


class ExactPreferred(Exception):
    """Raised, when the caller asked for it, where `auto` measured exact attention fastest: a host such as
    ComfyUI then runs its own exact attention (its backend choice), so turning Sage on there costs nothing."""


class DispatchStats:
    """Thread-safe counters of what really ran: Sage calls per variant, fallbacks per reason."""

    def __init__(self):
        self._lock = threading.Lock()
        self.reset()

    def reset(self):
        with getattr(self, "_lock", threading.Lock()):
            self.sage = Counter()
            self.fallback = Counter()
            self.exact = Counter()  # calls routed to exact attention on purpose (block list, step range, off)
            self.rotary_fused = 0  # Sage calls whose rotary table the quantization applied (no rotation pass)
            self._counters = {}  # device -> int32 tensor the repair kernel counts into; read when reported
            # kernel failures that every call of the same kind would repeat (a compile error on this GPU and
            # Triton), by failure_key -> reason: such calls then go straight to exact attention instead of
            # compiling again, seconds each. Out-of-memory is not remembered: the next call may fit.
            self._failed = {}

    def record_sage(self, variant: str):
        with self._lock:
            self.sage[variant] += 1

    def record_fallback(self, reason: str):
        with self._lock:
            self.fallback[reason] += 1

    def record_exact(self, why: str):
        with self._lock:
            self.exact[why] += 1

    def record_rotary_fused(self):
        with self._lock:
            self.rotary_fused += 1

    def remember_failure(self, key: tuple, reason: str):
        with self._lock:
            self._failed[key] = reason

    def known_failure(self, key_of) -> str | None:
        """The remembered failure of calls of this kind, if any: key_of() makes the key, only when some failure
        was remembered at all (the common case asks nothing more; a dict's truth and get are atomic)."""
        return self._failed.get(key_of()) if self._failed else None

    def repair_counter(self, device) -> torch.Tensor:
        """The device counter of output tiles recomputed exactly (NaN/Inf guard)."""
        with self._lock:
            counter = self._counters.get(device)
            if counter is None:
                counter = self._counters[device] = torch.zeros(1, dtype=torch.int32, device=device)
            return counter

    @property
    def recomputed(self) -> int:
        """Output tiles recomputed exactly so far (reading it synchronises with the device)."""
        return sum(int(c.item()) for c in self._counters.values())

    @property
    def total(self) -> int:
        return sum(self.sage.values()) + sum(self.fallback.values()) + sum(self.exact.values())

    def snapshot(self) -> dict:
        """{"sage": {variant: n}, "fallback": {reason: n}, "exact": {why: n}, "recomputed": n, "rotary_fused": n,
        "total": n}."""
        with self._lock:
            return {"sage": dict(self.sage), "fallback": dict(self.fallback), "exact": dict(self.exact),
                    "recomputed": self.recomputed, "rotary_fused": self.rotary_fused,
                    "total": sum(self.sage.values()) + sum(self.fallback.values()) + sum(self.exact.values())}


GLOBAL_STATS = DispatchStats()
_WARNED: set[str] = set()


def failure_key(q, k, variant: str, is_causal: bool, has_bias: bool, rotary: bool = False) -> tuple:
    """What a kernel's compilation depends on for a call (HND q and k): device, variant, head dim, dtype, masking,
    a rotary table (the quantization compiled with its rotation) and the length buckets (tuned launch
    configurations differ by bucket)."""
    return (str(q.device), variant, q.shape[-1], q.dtype, is_causal, has_bias, rotary, seq_bucket(q.shape[2]),
            seq_bucket(k.shape[2]))


def to_hnd(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t if layout == "HND" else t.transpose(1, 2)


def check_ranks(q, k, v, rank: int, layout_words: str):
    """q, k and v are tensors of `rank` dimensions, or an error names the first that is not."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ValueError(f"{name} must be {rank}-D ({layout_words}), got shape {tuple(t.shape)}")


def validate(q, k, v, tensor_layout: str, attn_mask=None) -> tuple:
    """Raise a clear error naming the argument for input no attention can take; returns q, k and v as HND views."""
    if tensor_layout not in LAYOUTS:
        raise ValueError(f"tensor_layout={tensor_layout!r} is unknown: use 'HND' ([B,H,N,D]) or 'NHD' ([B,N,H,D])")
    check_ranks(q, k, v, 4, tensor_layout)
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    qh, kh, vh = (to_hnd(t, tensor_layout) for t in (q, k, v))
    if qh.shape[0] != kh.shape[0] or kh.shape[0] != vh.shape[0]:
        raise ValueError(f"batch sizes differ: q {qh.shape[0]}, k {kh.shape[0]}, v {vh.shape[0]}")
    if kh.shape[1] != vh.shape[1] or kh.shape[2] != vh.shape[2]:
        raise ValueError(f"k and v must have the same heads and length, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if kh.shape[1] == 0 or qh.shape[1] % kh.shape[1]:
        raise ValueError(f"q heads ({qh.shape[1]}) must be a multiple of k/v heads ({kh.shape[1]})")
    if qh.shape[3] != kh.shape[3]:
        raise ValueError(f"q and k head dims differ: {qh.shape[3]} vs {kh.shape[3]}")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor, got {type(attn_mask).__name__}")
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask is on {attn_mask.device}, q on {q.device}")
        try:
            torch.broadcast_shapes(attn_mask.shape, (qh.shape[0], qh.shape[1], qh.shape[2], kh.shape[2]))
        except RuntimeError:
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                             f"[B, H, Nq, Nk] = {[qh.shape[0], qh.shape[1], qh.shape[2], kh.shape[2]]}") from None
    return qh, kh, vh


def key_bias(attn_mask, b: int, h: int, nq: int, nk: int):
    """A mask that broadcasts over queries as an FP32 [Bb, Hb, Nk] bias in log2 units, or None if the
    mask varies per query (then the kernels cannot take it)."""
    m = attn_mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    if m.shape[2] != 1:
        if nq == 1 or bool((m == m[:, :, :1]).all()):
            m = m[:, :, :1]
        else:
            return None
    m = m[:, :, 0].expand(m.shape[0], m.shape[1], nk)
    if m.dtype == torch.bool:
        return torch.zeros(m.shape, dtype=torch.float32, device=m.device).masked_fill_(~m, float("-inf"))
    return m.float() * backend.LOG2E


def fast_path_refusal(q, k, v, attn_mask, dropout_p: float) -> str | None:
    """Why the Triton kernels cannot serve this call (None if they can). Works on HND tensors."""
    if dropout_p:
        return "dropout"
    if q.dtype not in FLOAT_DTYPES:
        return f"dtype {str(q.dtype).replace('torch.', '')}"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    device_refusal = backend.device_refusal(q.device)
    if device_refusal:
        return device_refusal
    return None


def sdpa(q, k, v, *, is_causal=False, sm_scale=None, attn_mask=None, dropout_p=0.0, return_lse=False):
    """Exact attention on HND tensors (GQA expanded), optionally with the natural-log LSE."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    if attn_mask is not None and attn_mask.dtype not in (torch.bool, q.dtype):
        attn_mask = attn_mask.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                         scale=sm_scale)
    if not return_lse:
        return out, None
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask.float()
    if is_causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril(), float("-inf"))
    return out, torch.logsumexp(s, dim=-1)


def attention(q, k, v, *, tensor_layout="HND", is_causal=False, sm_scale=None, attn_mask=None, dropout_p=0.0,
              config: SageConfig | None = None, stats: DispatchStats | None = None, return_lse=False,
              defer_exact=False, host_exact=None, rope=None, carry_key=None):
    """Attention through the fastest path that can serve; same semantics as SDPA (top-left causal).

    rope: a rotary table [Bp, Hp, N, D/2, 2, 2] (ComfyUI's Flux `pe`, in [B, H, ...] order whatever the layout;
    sage_core/rope.py) that Q and K are rotated by before the attention: the kernels rotate them inside their
    quantization; every exact path rotates them first as ComfyUI does. With defer_exact, ExactPreferred leaves
    the rotation to the host, which then runs its own rotation and attention.

    defer_exact: where `auto` picks exact attention, raise ExactPreferred (counted as "auto:sdpa") instead of
    running PyTorch's SDPA here. host_exact: the exact attention the host then runs for this call (no arguments),
    which `auto` times in place of PyTorch's SDPA when it first decides for calls of this kind.

    carry_key: a hashable name of the call site (a model's block and call, as the ComfyUI node keys them) whose
    K and V statistics carry from one call to the next, so that the quantization takes one launch instead of two
    (FP8 P·V with the guard on; kernels/carried_stats.py says what it costs: nothing in exactness, a repair where
    V outgrows the carried range)."""
    config = config or DEFAULT_CONFIG
    stats = stats or GLOBAL_STATS
    qh, kh, vh = validate(q, k, v, tensor_layout, attn_mask)
    if carry_key is not None:
        try:
            hash(carry_key)
        except TypeError:
            raise TypeError(f"carry_key must be hashable (it names a call site), got {type(carry_key).__name__}")
    if rope is not None:
        rotary.validate(rope, qh, kh)
    B, H, NQ, D = qh.shape
    NK = kh.shape[2]
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(D) if D else 1.0

    def rotated():
        """Q and K as exact attention takes them: rotated by the table, if any."""
        if rope is None:
            return qh, kh
        return rotary.rotate(qh, rope), rotary.rotate(kh, rope)

    def exact(reason=None):
        if reason == "kernel off":
            stats.record_exact(reason)
        elif reason:
            if config.on_unsupported == "raise":
                raise UnsupportedInput(f"Sage attention cannot serve this call: {reason}")
            stats.record_fallback(reason)
        out, lse = sdpa(*rotated(), vh, is_causal=is_causal, sm_scale=sm_scale, attn_mask=attn_mask,
                        dropout_p=dropout_p, return_lse=return_lse)
        out = out if tensor_layout == "HND" else out.transpose(1, 2)
        return (out, lse) if return_lse else out

    if min(B, H, NQ, NK, D) == 0:
        # some CUDA SDPA backends return an undefined tensor here: answer directly. With no keys, the
        # weighted sum over nothing is 0 and the LSE is -inf.
        stats.record_exact("empty input")
        out = q.new_zeros(q.shape[:-1] + (vh.shape[-1],))
        lse = torch.full((B, H, NQ), float("-inf"), device=q.device, dtype=torch.float32)
        return (out, lse) if return_lse else out
    if config.kernel == "off":
        return exact("kernel off")
    refusal = fast_path_refusal(qh, kh, vh, attn_mask, dropout_p)
    if refusal:
        return exact(refusal)
    bias = None
    if attn_mask is not None:
        bias = key_bias(attn_mask, B, H, NQ, NK)
        if bias is None:
            return exact("per-query mask")

    if rope is not None and return_lse:  # the LSE's correction for K's smoothing reads Q: rotate first
        qh, kh = rotated()
        rope = None  # (rotated() and exact() now take qh and kh as they are)

    variant = config.kernel
    if variant == "auto":
        variant = autoselect.choose(qh, kh, vh, is_causal=is_causal, bias=bias, config=config,
                                    host_exact=host_exact if defer_exact else None, rope=rope)
        if variant == "sdpa":
            stats.record_sage("auto:sdpa")
            if defer_exact:
                raise ExactPreferred()
            out, lse = sdpa(*rotated(), vh, is_causal=is_causal, sm_scale=sm_scale, attn_mask=attn_mask,
                            return_lse=return_lse)
            out = out if tensor_layout == "HND" else out.transpose(1, 2)
            return (out, lse) if return_lse else out
    if variant == "int8_fp8" and not backend.supports_fp8(qh.device):
        variant = "int8_fp16"  # FP8 tensor cores start at Ada (sm89); INT8·FP16 is exact elsewhere

    def kind():
        return failure_key(qh, kh, variant, is_causal, bias is not None, rope is not None)

    known = stats.known_failure(kind) if config.on_unsupported != "raise" else None
    if known:
        return exact(known)
    try:
        out, lse, _ = backend.run(qh, kh, vh, layout=tensor_layout, sm_scale=sm_scale, is_causal=is_causal,
                                  bias=bias, config=config, pv_fp8=variant == "int8_fp8", return_lse=return_lse,
                                  repair_counter=stats.repair_counter(qh.device) if config.nan_guard else None,
                                  rope=rope, carry_key=carry_key if config.carry_stats else None)
    except Exception as e:  # a compile or launch failure on this GPU/Triton: exact attention, said once
        if config.on_unsupported == "raise":
            raise
        reason = f"kernel error: {type(e).__name__}"
        if not isinstance(e, torch.OutOfMemoryError):
            stats.remember_failure(kind(), reason)
        if reason not in _WARNED:
            _WARNED.add(reason)
            log.warning("Sage attention: %s (%s); exact attention serves such calls", reason,
                        str(e).splitlines()[0][:200] if str(e) else "")
        return exact(reason)
    stats.record_sage(variant)
    if rope is not None:
        stats.record_rotary_fused()
    return (out, lse) if return_lse else out
