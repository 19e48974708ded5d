"""Launchers: shapes, buffers, grids and configurations for the Triton kernels.

Every launcher takes [B, H, N, D] views (any strides) and validates nothing: validation happens once,
in sage_core/dispatch.py, before any work is done.
"""
from __future__ import annotations


import torch
import triton

from . import tuning
from .tuning import interpreting
from .attention_kernel import sage_attention_fwd_kernel
from .repair_kernel import repair_tiles_kernel
from .quant_kernels import channel_stats_kernel, quant_fp8_v_kernel, quant_int8_kernel

LOG2E = 1.4426950408889634
STATS_ROWS = 64
QUANT_ROWS = 128
FP8_MAX = 448.0
V_PAD = 128  # FP8 V rows padded to a multiple of this, so every tile load is in bounds and aligned


def padded_head_dim(d: int) -> int:
    """Head dims run padded to a power of two (≥ 32, the INT8 MMA depth): 40 -> 64, 72/80/96 -> 128,
    160 -> 256."""
    return max(32, triton.next_power_of_2(d))


def channel_stats(x: torch.Tensor, block_d: int):
    """Per-channel mean, max and min over tokens of a [B, H, N, D] view, as FP32 [B, H, block_d]."""
    B, H, N, D = x.shape
    chunks = max(1, triton.cdiv(N, STATS_ROWS))
    parts = torch.empty((3, B * H, chunks, block_d), device=x.device, dtype=torch.float32)
    channel_stats_kernel[(chunks, B * H)](
        x, parts[0], parts[1], parts[2], *x.stride(), H, N, D, ROWS=STATS_ROWS, BLOCK_D=block_d)
    mean = (parts[0].sum(1) / max(N, 1)).view(B, H, block_d)
    vmax = parts[1].amax(1).view(B, H, block_d)
    vmin = parts[2].amin(1).view(B, H, block_d)
    if D < block_d:  # padded channels are zero, never ±inf
        vmax[..., D:] = 0
        vmin[..., D:] = 0
    return mean, vmax, vmin


def quantize_int8(x: torch.Tensor, group: int, block_d: int, multiplier: float = 1.0, mean=None):
    """INT8 codes [B, H, N, block_d] and FP32 scales [B, H, ceil(N/group)] of (x - mean) * multiplier."""
    B, H, N, D = x.shape
    rows = max(QUANT_ROWS, group)
    n_groups = triton.cdiv(N, group)
    xq = torch.empty((B, H, N, block_d), device=x.device, dtype=torch.int8)
    scale = torch.empty((B, H, n_groups), device=x.device, dtype=torch.float32)
    if N:
        quant_int8_kernel[(triton.cdiv(N, rows), B * H)](
            x, mean if mean is not None else scale, xq, scale, *x.stride(), H, N, D, n_groups, float(multiplier),
            ROWS=rows, GROUP=group, BLOCK_D=block_d, SUBTRACT_MEAN=mean is not None)
    return xq, scale


def quantize_v_fp8(v: torch.Tensor, block_d: int, smooth: bool):
    """FP8 e4m3 V stored transposed [B, H, block_d, N_padded], per-channel scales, and V's mean (or None)."""
    B, H, N, D = v.shape
    mean, vmax, vmin = channel_stats(v, block_d)
    if smooth:
        amax = torch.maximum(vmax - mean, mean - vmin)
    else:
        amax = torch.maximum(vmax.abs(), vmin.abs())
        mean = None
    scale = amax.clamp_min(1e-30) / FP8_MAX
    n_padded = triton.cdiv(max(N, 1), V_PAD) * V_PAD
    vq = torch.empty((B, H, block_d, n_padded), device=v.device, dtype=torch.float8_e4m3fn)
    quant_fp8_v_kernel[(n_padded // V_PAD, B * H)](
        v, mean if mean is not None else scale, scale, vq, *v.stride(), H, N, D, n_padded,
        ROWS=V_PAD, BLOCK_D=block_d, SUBTRACT_MEAN=mean is not None, FP8_ROUND_IN_FP32=interpreting())
    return vq, scale, mean


def sage_forward(q, k, v, out, *, sm_scale: float, is_causal: bool, bias, q_group: int, k_group: int,
                 pv_fp8: bool, smooth_k: bool, smooth_v: bool, return_lse: bool, config: tuning.LaunchConfig,
                 repair_counter=None):
    """Run quantization and attention; writes `out` ([B, H, Nq, D] view) and returns (lse, bad_count).

    q_group: query rows per INT8 scale (capped at the Q tile); k_group: keys per scale, 0 for one per tile.
    repair_counter: a 1-element int32 device tensor: tiles with a non-finite output are then recomputed
    exactly on the device (no host synchronisation) and counted into it; None skips the guard.

    bias: None or an FP32 [Bb, Hb, Nk] additive bias in log2 units, Bb in {1, B}, Hb in {1, H}.
    """
    B, H, NQ, D = q.shape
    HK, NK = k.shape[1], k.shape[2]
    block_d = padded_head_dim(D)
    block_m, block_n = config.block_m, config.block_n
    q_group = min(q_group, block_m)
    k_group = k_group or block_n  # 0: one K scale per key tile

    q8, q_scale = quantize_int8(q, q_group, block_d, multiplier=sm_scale * LOG2E)
    k_mean = channel_stats(k, block_d)[0] if smooth_k else None
    k8, k_scale = quantize_int8(k, k_group, block_d, mean=k_mean)
    if pv_fp8:
        v8, v_scale, v_mean = quantize_v_fp8(v, block_d, smooth_v)
        v_padded = v8.shape[-1]
    else:
        v8, v_scale, v_padded = k_scale, k_scale, 0
        v_mean = channel_stats(v, block_d)[0] if smooth_v else None

    grid = (triton.cdiv(NQ, block_m), B * H)
    lse = torch.empty((B, H, NQ), device=q.device, dtype=torch.float32) if return_lse else k_scale
    bad = torch.zeros(grid[1] * grid[0], device=q.device, dtype=torch.int32)
    if bias is not None:
        bias_strides = (bias.stride(0) if bias.shape[0] > 1 else 0, bias.stride(1) if bias.shape[1] > 1 else 0)
    else:
        bias_strides = (0, 0)
    sage_attention_fwd_kernel[grid](
        q8, q_scale, k8, k_scale, v, v8, v_scale, v_mean if v_mean is not None else k_scale,
        bias if bias is not None else k_scale, out, lse, bad,
        *v.stride(), *out.stride(), *bias_strides,
        H, H // HK, NQ, NK, D, q_scale.shape[-1], k_scale.shape[-1], v_padded,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, Q_GROUP=q_group, K_GROUP=k_group,
        PV_FP8=pv_fp8, SMOOTH_V=v_mean is not None, IS_CAUSAL=is_causal, HAS_BIAS=bias is not None,
        RETURN_LSE=return_lse, BF16_DOT_IN_FP32=interpreting() and v.dtype == torch.bfloat16,
        FP8_ROUND_IN_FP32=interpreting(), EVEN_D=D == block_d, WARP_SPECIALIZE=config.warp_specialize,
        MAGIC_CONVERT=config.magic_convert,
        num_warps=config.num_warps,
        num_stages=config.num_stages)
    if return_lse and k_mean is not None:
        # K smoothing shifted every score of a row by q·mean(K)·scale: add it back for the true LSE
        km = k_mean[..., :D].repeat_interleave(H // HK, dim=1)
        lse += torch.einsum("bhnd,bhd->bhn", q.float(), km) * sm_scale
    if repair_counter is not None:  # after the LSE correction: repaired rows get their exact LSE
        repair_tiles_kernel[grid](
            q, k, v, bias if bias is not None else k_scale, out, lse, bad, repair_counter,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *bias_strides,
            H, H // HK, NQ, NK, D, sm_scale * LOG2E, BLOCK_M=block_m, BLOCK_N=32, BLOCK_D=block_d,
            IS_CAUSAL=is_causal, HAS_BIAS=bias is not None, RETURN_LSE=return_lse, num_warps=4, num_stages=1)
    return (lse if return_lse else None), bad


__all__ = ["padded_head_dim", "channel_stats", "quantize_int8", "quantize_v_fp8", "sage_forward",
           "LOG2E"]
