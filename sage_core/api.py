"""The official `sageattention` package's entry points, call-compatible and served by the bundled kernels:
`sageattn`, `sageattn_varlen`, and the names that pick a kernel (`sageattn_qk_int8_pv_fp16_triton`,
`sageattn_qk_int8_pv_fp16_cuda`, `sageattn_qk_int8_pv_fp8_cuda`, `sageattn_qk_int8_pv_fp8_cuda_sm90`), so that
code written for it runs unchanged with only its import changed."""
from __future__ import annotations

import operator

import torch

from .config import DEFAULT_CONFIG, GRANULARITIES
from .dispatch import DispatchStats, attention, check_ranks, validate


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


# The official P·V accumulator choices per entry point: accepted (our kernels accumulate P·V in FP32 or, on the
# FP16-tile configurations, as their tables say) and checked, so that a typo is named rather than ignored.
FP16_PV_ACCUM = ("fp32", "fp16", "fp16+fp32")
FP8_PV_ACCUM = ("fp32", "fp32+fp32", "fp32+fp16")


def _kernel_named(kernel: str, accum_choices: tuple, q, k, v, tensor_layout, is_causal, sm_scale, return_lse,
                  kwargs: dict):
    """sageattn with the P·V precision the official name picks; the other keywords as sageattn takes them."""
    accum = kwargs.pop("pv_accum_dtype", None)
    if accum is not None and accum not in accum_choices:
        raise ValueError(f"pv_accum_dtype={accum!r} is not one of {list(accum_choices)}")
    for named in ("kernel", "pv_precision"):
        if named in kwargs:
            raise TypeError(f"{named}= cannot be given here: this entry point always runs {kernel}")
    return sageattn(q, k, v, tensor_layout=tensor_layout, is_causal=is_causal, sm_scale=sm_scale,
                    return_lse=return_lse, kernel=kernel, **kwargs)


def sageattn_qk_int8_pv_fp16_triton(q, k, v, tensor_layout: str = "HND", quantization_backend: str = "triton",
                                    is_causal: bool = False, attn_mask=None, sm_scale: float | None = None,
                                    smooth_k: bool = True, return_lse: bool = False, **kwargs):
    """INT8 Q·Kᵀ, FP16 P·V (the official SageAttention 1 kernel's name). quantization_backend: "triton" or "cuda",
    accepted; the bundled Triton kernels quantize either way."""
    if quantization_backend not in ("triton", "cuda"):
        raise ValueError(f"quantization_backend={quantization_backend!r} is not one of ['triton', 'cuda']")
    return _kernel_named("int8_fp16", FP16_PV_ACCUM, q, k, v, tensor_layout, is_causal, sm_scale, return_lse,
                         dict(kwargs, attn_mask=attn_mask, smooth_k=smooth_k))


def sageattn_qk_int8_pv_fp16_cuda(q, k, v, tensor_layout: str = "HND", is_causal: bool = False,
                                  qk_quant_gran: str | None = None, sm_scale: float | None = None,
                                  pv_accum_dtype: str = "fp32", smooth_k: bool = True, smooth_v: bool = False,
                                  return_lse: bool = False, **kwargs):
    """INT8 Q·Kᵀ, FP16 P·V (SageAttention2's CUDA kernel's name), served by the bundled Triton kernels.
    qk_quant_gran: as sageattn takes it; left out, the pack's own granularity (SageConfig.qk_granularity)."""
    return _kernel_named("int8_fp16", FP16_PV_ACCUM, q, k, v, tensor_layout, is_causal, sm_scale, return_lse,
                         dict(kwargs, pv_accum_dtype=pv_accum_dtype, smooth_k=smooth_k, smooth_v=smooth_v,
                              **_granularity(qk_quant_gran)))


def sageattn_qk_int8_pv_fp8_cuda(q, k, v, tensor_layout: str = "HND", is_causal: bool = False,
                                 qk_quant_gran: str | None = None, sm_scale: float | None = None,
                                 pv_accum_dtype: str = "fp32+fp16", smooth_k: bool = True, smooth_v: bool = False,
                                 return_lse: bool = False, **kwargs):
    """INT8 Q·Kᵀ, FP8 e4m3 P·V (SageAttention2's CUDA kernel's name), served by the bundled Triton kernels; on a GPU
    without FP8 tensor cores (before Ada) the dispatcher runs FP16 P·V, as for kernel="int8_fp8"."""
    return _kernel_named("int8_fp8", FP8_PV_ACCUM, q, k, v, tensor_layout, is_causal, sm_scale, return_lse,
                         dict(kwargs, pv_accum_dtype=pv_accum_dtype, smooth_k=smooth_k, smooth_v=smooth_v,
                              **_granularity(qk_quant_gran)))


def sageattn_qk_int8_pv_fp8_cuda_sm90(q, k, v, tensor_layout: str = "HND", is_causal: bool = False,
                                      qk_quant_gran: str | None = None, sm_scale: float | None = None,
                                      pv_accum_dtype: str = "fp32+fp32", smooth_k: bool = True,
                                      return_lse: bool = False, **kwargs):
    """INT8 Q·Kᵀ, FP8 e4m3 P·V (SageAttention2's Hopper kernel's name); on the H100 and H200 the bundled Hopper
    kernels serve it."""
    return _kernel_named("int8_fp8", FP8_PV_ACCUM, q, k, v, tensor_layout, is_causal, sm_scale, return_lse,
                         dict(kwargs, pv_accum_dtype=pv_accum_dtype, smooth_k=smooth_k,
                              **_granularity(qk_quant_gran)))


def _granularity(qk_quant_gran: str | None) -> dict:
    return {} if qk_quant_gran is None else {"qk_quant_gran": qk_quant_gran}


def sageattn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                    is_causal: bool = False, sm_scale: float | None = None, smooth_k: bool = True, **kwargs):
    """Attention over a batch of sequences of different lengths packed along the first axis, as the official
    `sageattn_varlen` takes them: q [total_q, Hq, D], k and v [total_k, Hk, D]; cu_seqlens_q and cu_seqlens_k
    [batch + 1] (int32 or int64) where sequence i holds rows cu_seqlens[i]:cu_seqlens[i + 1]. Returns
    [total_q, Hq, D] in q's dtype. Each sequence attends to its own keys only (causal: top-left, as sageattn),
    and K's smoothing takes each sequence's own mean. Other keywords as sageattn takes them (kernel, config,
    stats, ...); attn_mask and return_lse have no packed form and are refused.

    The sequence bounds are read on the host (one synchronisation). Sequences of one length run as one batched
    call; otherwise each runs as its own call."""
    for name in ("attn_mask", "return_lse", "tensor_layout", "rope", "carry_key"):
        if name in kwargs:
            raise TypeError(f"sageattn_varlen() takes no {name}=")
    check_ranks(q, k, v, 3, "[total tokens, heads, head dim]")
    q_bounds, q_lengths = _sequence_bounds("cu_seqlens_q", cu_seqlens_q, q.shape[0], "q", max_seqlen_q,
                                           "max_seqlen_q")
    k_bounds, k_lengths = _sequence_bounds("cu_seqlens_k", cu_seqlens_k, k.shape[0], "k", max_seqlen_k,
                                           "max_seqlen_k")
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"k and v must hold the same tokens, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if len(q_bounds) != len(k_bounds):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                         f"{len(q_bounds) - 1} and {len(k_bounds) - 1}")
    call = dict(kwargs, tensor_layout="NHD", is_causal=is_causal, sm_scale=sm_scale, smooth_k=smooth_k)
    batch = len(q_bounds) - 1
    if batch and len(set(q_lengths)) == 1 and len(set(k_lengths)) == 1:  # one call: the packed rows are a batch's
        nq, nk = q_lengths[0], k_lengths[0]
        out = sageattn(q.unflatten(0, (batch, nq)), k.unflatten(0, (batch, nk)), v.unflatten(0, (batch, nk)), **call)
        return out.flatten(0, 1)
    # the shapes sageattn checks (heads, head dims, dtypes, devices) are checked before the first sequence runs
    validate(q[:0].unsqueeze(0), k[:0].unsqueeze(0), v[:0].unsqueeze(0), "NHD")
    out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    for i in range(batch):
        rows = slice(q_bounds[i], q_bounds[i + 1])
        if rows.start == rows.stop:
            continue
        keys = slice(k_bounds[i], k_bounds[i + 1])
        out[rows] = sageattn(q[rows].unsqueeze(0), k[keys].unsqueeze(0), v[keys].unsqueeze(0), **call)[0]
    return out


def _sequence_bounds(name: str, cu_seqlens, total: int, tokens_of: str, max_seqlen, max_name: str) -> tuple:
    """cu_seqlens as lists of row bounds and of sequence lengths, checked: a 1-D integer tensor from 0 to `total`,
    never decreasing, no sequence longer than max_seqlen (the official kernels size their grid by it)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() == 0:
        raise ValueError(f"{name} must be 1-D [batch + 1], got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64, got {str(cu_seqlens.dtype).replace('torch.', '')}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(f"{name} must run from 0 to the {total} tokens of {tokens_of}, got {bounds[0]} to "
                         f"{bounds[-1]}")
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError(f"{name} must never decrease, got {bounds}")
    try:
        max_seqlen = operator.index(max_seqlen)
    except TypeError:
        raise TypeError(f"{max_name} must be an int, got {type(max_seqlen).__name__}") from None
    if lengths and max(lengths) > max_seqlen:
        raise ValueError(f"{max_name}={max_seqlen} is shorter than the longest sequence in {name} ({max(lengths)})")
    return bounds, lengths
