"""`sageattn`: call-compatible with the official `sageattention.sageattn`, served by the bundled kernels."""
from __future__ import annotations

from .config import DEFAULT_CONFIG, GRANULARITIES
from .dispatch import DispatchStats, attention


def sageattn(q, k, v, tensor_layout: str = "HND", is_causal: bool = False, sm_scale: float | None = None,
             return_lse: bool = False, **kwargs):
    """Scaled dot-product attention with INT8 Q·Kᵀ and FP16 or FP8 P·V.

    q: [B, Hq, Nq, D] ("HND") or [B, Nq, Hq, D] ("NHD"); k, v: Hk heads (Hq a multiple of Hk), Nk tokens.
    Returns the output in q's layout and dtype, and with return_lse=True also the natural-log
    log-sum-exp of the scaled scores, [B, Hq, Nq] FP32.

    Extra keywords: attn_mask (boolean or additive, broadcastable to [B, H, Nq, Nk]; honoured in the
    kernel when it broadcasts over queries, else served exactly), dropout_p, smooth_k, smooth_v,
    qk_quant_gran ("per_block" | "per_warp" | "per_thread"), pv_precision / kernel ("auto" |
    "int8_fp16" | "int8_fp8"), quant_block (64 | 128), config (a SageConfig), stats (a DispatchStats), rope (a
    rotary table [B, H, N, D/2, 2, 2] in ComfyUI's Flux layout that Q and K are rotated by first: the kernels
    rotate them inside their quantization, sage_core/rope.py), carry_key (a hashable name of the call site, e.g. a
    model block's: its K and V statistics carry to its next call, one quantization launch instead of two;
    kernels/carried_stats.py).
    Official keywords without meaning here (pv_accum_dtype) are accepted and ignored.
    """
    config = kwargs.pop("config", None) or DEFAULT_CONFIG
    changes = {}
    for key, field in (("smooth_k", "smooth_k"), ("smooth_v", "smooth_v"), ("quant_block", "quant_block"),
                       ("kernel", "kernel"), ("pv_precision", "kernel")):
        if key in kwargs:
            changes[field] = kwargs.pop(key)
    if "qk_quant_gran" in kwargs:
        gran = kwargs.pop("qk_quant_gran")
        if gran not in GRANULARITIES:  # the official keyword: same names as SageConfig.qk_granularity
            raise ValueError(f"qk_quant_gran={gran!r} is not one of {sorted(GRANULARITIES)}")
        changes["qk_granularity"] = gran
    if changes:
        config = config.with_(**changes)
    attn_mask = kwargs.pop("attn_mask", None)
    dropout_p = kwargs.pop("dropout_p", 0.0)
    stats: DispatchStats | None = kwargs.pop("stats", None)
    rope = kwargs.pop("rope", None)
    carry_key = kwargs.pop("carry_key", None)
    kwargs.pop("pv_accum_dtype", None)
    if kwargs:
        raise TypeError(f"sageattn() got unexpected keyword arguments: {', '.join(sorted(kwargs))}")
    return attention(q, k, v, tensor_layout=tensor_layout, is_causal=is_causal, sm_scale=sm_scale,
                     attn_mask=attn_mask, dropout_p=dropout_p, config=config, stats=stats, return_lse=return_lse,
                     rope=rope, carry_key=carry_key)
