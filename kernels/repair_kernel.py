"""Exact recomputation of the output tiles the 8-bit kernel flagged as non-finite (device code only).

Launched after every Sage call, one program per query tile of the attention kernel's grid (or fewer, each looking
at several: launch.REPAIR_PROGRAMS): a clean tile is passed at once, so the guard costs one tiny launch and no host
synchronisation. A flagged tile is recomputed from the original
Q, K, V in FP32 (IEEE dots, online softmax), with the same bias and causal mask (and Q and K rotated by the
call's rotary table, ROPE), so wherever exact attention is finite the returned output is finite too.
"""
import triton
import triton.language as tl

from .rotary import rotated


@triton.jit
def repair_tiles_kernel(
    Q, K, V, BIAS, OUT, LSE, BAD, REPAIRED,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_bias_b, stride_bias_h,
    H, KV_GROUP, NQ, NK, D, qk_multiplier,
    PE, stride_pb, stride_ph, stride_pn, tiles_m, tiles,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, RETURN_LSE: tl.constexpr, ROPE: tl.constexpr,
):
    """Each program looks at the tiles pid, pid + programs, ... of the call's `tiles` (tiles_m query tiles of
    BLOCK_M rows per head) and repairs the flagged ones: one program per tile, or fewer programs that each look at
    several (launch.REPAIR_PROGRAMS), so that a clean call's launch is smaller."""
    for tile in range(tl.program_id(0), tiles, tl.num_programs(0)):
        pid_m = tile % tiles_m
        bh = tile // tiles_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        if tl.max(tl.load(BAD + bh * NQ + offs_m, mask=offs_m < NQ, other=0), axis=0) != 0:
            repair_tile(Q, K, V, BIAS, OUT, LSE, REPAIRED, pid_m, bh, offs_m,
                        stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                        stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_on, stride_od,
                        stride_bias_b, stride_bias_h, H, KV_GROUP, NQ, NK, D, qk_multiplier,
                        PE, stride_pb, stride_ph, stride_pn,
                        BLOCK_M, BLOCK_N, BLOCK_D, IS_CAUSAL, HAS_BIAS, RETURN_LSE, ROPE)


@triton.jit
def repair_tile(
    Q, K, V, BIAS, OUT, LSE, REPAIRED, pid_m, bh, offs_m,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_bias_b, stride_bias_h,
    H, KV_GROUP, NQ, NK, D, qk_multiplier,
    PE, stride_pb, stride_ph, stride_pn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, RETURN_LSE: tl.constexpr, ROPE: tl.constexpr,
):
    """Query tile pid_m of head bh recomputed exactly, and counted."""
    tl.atomic_add(REPAIRED, 1)  # counted on the device; read only when the counters are reported
    b = bh // H
    h = bh % H
    hk = h // KV_GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=(offs_m[:, None] < NQ) & d_valid[None, :], other=0.0).to(tl.float32)
    if ROPE:
        q = rotated(q, offs_m, offs_d, NQ, D, PE + b * stride_pb + h * stride_ph, stride_pn)
    q = q * qk_multiplier
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    hi = NK
    if IS_CAUSAL:
        hi = tl.minimum(NK, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < NK
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=kv_mask, other=0.0).to(tl.float32)
        if ROPE:
            k = rotated(k, offs_n, offs_d, NK, D, PE + b * stride_pb + hk * stride_ph, stride_pn)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
        if HAS_BIAS:
            s += tl.load(BIAS + b * stride_bias_b + h * stride_bias_h + offs_n, mask=n_valid, other=0.0)[None, :]
        keep = n_valid[None, :]
        if IS_CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    out = acc / l_i[:, None]
    o_mask = (offs_m[:, None] < NQ) & d_valid[None, :]
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
             out.to(OUT.dtype.element_ty), mask=o_mask)
    if RETURN_LSE:
        tl.store(LSE + bh * NQ + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=offs_m < NQ)
