"""Pure-PyTorch reference of the quantized algorithm the Triton kernels run.

Same scales, same rounding (half away from zero), same order of scaling; it is what the kernel tests
compare against. It materialises the full score matrix, so it is for small shapes only.
"""
from __future__ import annotations

import torch

from .rope import rotate

LOG2E = 1.4426950408889634
FP8_E4M3_MAX = 448.0


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, x + 0.5, x - 0.5).trunc()


def quantize_int8_groups(x: torch.Tensor, group: int):
    """x: FP32 [B, H, N, D] -> (int8-valued FP32 codes, per-row scales [B, H, N])."""
    B, H, N, D = x.shape
    pad = (-N) % group
    xp = torch.nn.functional.pad(x, (0, 0, 0, pad))
    g = xp.view(B, H, -1, group * D)
    scale = g.abs().amax(-1).clamp_min(1e-30) / 127.0
    codes = round_half_away(g * (1.0 / scale)[..., None]).view(B, H, -1, D)[:, :, :N]  # as the kernel: x * (1/s)
    rows = scale.repeat_interleave(group, dim=-1)[..., :N]
    return codes, rows


def sampled_keys(n: int, every: int, tile: int = 16) -> torch.Tensor:
    """Which of n keys K's mean is taken over: the tiles of `tile` keys whose index is a multiple of `every`."""
    return (torch.arange(n) // tile) % every == 0


def sage_reference(q, k, v, *, sm_scale=None, is_causal=False, bias=None, q_group=16, k_group=1,
                   block_m=128, pv_fp8=False, smooth_k=True, smooth_v=False, return_lse=False, k_stats_every=1,
                   fp16_tile_keys=0, rope=None):
    """q, k, v: [B, H, N, D] (any float dtype; K/V may have fewer heads). bias: additive [Bb, Hb, Nk]
    in natural units (as SDPA's float mask). k_stats_every: K's mean from every k_stats_every-th tile of 16 keys
    (kernels/launch.stats_every gives the kernels' value). fp16_tile_keys: with pv_fp8, P·V summed per tile of that
    many keys in FP16 (SageAttention2++'s accumulation, the kernels' fp16_tiles: each tile's sum rounded to FP16,
    V's codes within launch.fp16_tile_v_code_max), the tiles' sums added in FP32. Returns the output in q's dtype
    (and the natural-log LSE)."""
    B, H, NQ, D = q.shape
    HK = k.shape[1]
    sm_scale = D ** -0.5 if sm_scale is None else sm_scale
    qf, kf, vf = q.float(), k.float(), v.float()
    if rope is not None:  # in FP32, whatever the table's dtype
        qf, kf = rotate(qf, rope.float()), rotate(kf, rope.float())
    sample = sampled_keys(k.shape[2], k_stats_every).to(k.device)
    k_mean = kf[:, :, sample].mean(dim=2, keepdim=True) if smooth_k else torch.zeros_like(kf[:, :, :1])
    k_codes, k_rows = quantize_int8_groups(kf - k_mean, k_group)

    # Q is quantized per Q tile: groups never straddle a tile boundary
    q_group = min(q_group, block_m)
    q_codes, q_rows = quantize_int8_groups(qf * (sm_scale * LOG2E), q_group)

    rep = H // HK
    k_codes, k_rows = k_codes.repeat_interleave(rep, 1), k_rows.repeat_interleave(rep, 1)
    s = (q_codes @ k_codes.transpose(-1, -2)) * q_rows[..., :, None] * k_rows[..., None, :]
    if bias is not None:
        s = s + bias.float()[:, :, None, :] * LOG2E
    if is_causal:
        keep = torch.ones(NQ, k.shape[2], dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    m = s.amax(-1, keepdim=True)
    p = torch.exp2(s - m)
    row_sum = p.sum(-1, keepdim=True)

    smooth_v = smooth_v and (pv_fp8 or v.dtype == torch.float32)  # as launch.sage_forward: a 16-bit V is exact
    v_mean = vf.mean(dim=2, keepdim=True) if smooth_v else torch.zeros_like(vf[:, :, :1])
    vs = vf - v_mean
    if pv_fp8:
        # the largest V code: e4m3's, or with FP16 tiles 448 / (4 · keys a tile) (launch.fp16_tile_v_code_max)
        v_code_max = FP8_E4M3_MAX / (4 * fp16_tile_keys) if fp16_tile_keys else FP8_E4M3_MAX
        v_scale = vs.abs().amax(dim=2, keepdim=True).clamp_min(1e-30) / v_code_max
        v8 = (vs * (1.0 / v_scale)).to(torch.float8_e4m3fn).float()
        p8 = (p * FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()
        v8_q = v8.repeat_interleave(rep, 1)  # V's codes per query head
        if fp16_tile_keys:
            tiles = [(p8[..., t:t + fp16_tile_keys] @ v8_q[:, :, t:t + fp16_tile_keys]).half().float()
                     for t in range(0, p8.shape[-1], fp16_tile_keys)]
            pv = torch.stack(tiles).sum(0)
        else:
            pv = p8 @ v8_q
        out = pv / row_sum * (v_scale / FP8_E4M3_MAX).repeat_interleave(rep, 1)
        # the shift makes the dequantized V's mean V's own (kernels/launch.quantize_qkv's v_shift)
        v_mean = vf.mean(dim=2, keepdim=True) - (v8 * v_scale).mean(dim=2, keepdim=True)
    else:
        pv_dtype = torch.float32 if v.dtype == torch.float32 else v.dtype
        vv = vs.to(pv_dtype).float() if smooth_v else vf
        out = (p.to(pv_dtype).float() @ vv.repeat_interleave(rep, 1)) / row_sum
    out = out + v_mean.repeat_interleave(rep, 1)
    if not return_lse:
        return out.to(q.dtype)
    lse = (m.squeeze(-1) + torch.log2(row_sum.squeeze(-1))) / LOG2E
    lse = lse + (qf @ k_mean.repeat_interleave(rep, 1).transpose(-1, -2)).squeeze(-1) * sm_scale
    return out.to(q.dtype), lse
