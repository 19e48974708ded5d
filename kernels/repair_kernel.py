"""Exact recomputation of the output tiles the 8-bit kernel flagged as non-finite (device code only).

Launched after every Sage call, one program per launch.REPAIR_TILES query tiles of the attention kernel's grid: a
clean call's programs read their tiles' row flags and end, so the guard costs one small launch and no host
synchronisation. A flagged tile is recomputed from the original Q, K, V in FP32 (online softmax; the dots as
DOT_PRECISION says: "tf32x3", three TF32 products on the tensor cores that together keep FP32's precision, or
"ieee", FP32 on the FMA pipe), with the same bias and causal mask (and Q and K rotated by the call's rotary table,
ROPE), so wherever exact attention is finite the returned output is finite too.
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
    TILES: tl.constexpr, ROWS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Program pid of P looks at TILES query tiles of the call's `tiles` (tiles_m tiles of BLOCK_M rows per head),
    pid, pid + P, pid + 2P, ..., in one load of their row flags, and repairs the flagged ones one after another:
    a head's consecutive tiles fall to different programs, so a whole flagged head is repaired in parallel as
    before (P = tiles / TILES, at least as many as a head's tiles from 16 heads on). Each of the grid's
    BLOCK_M / ROWS programs along axis 1 recomputes one slice of ROWS rows of every flagged tile it finds, so that
    one flagged tile is repaired by that many programs at once. The kernel's resources are
    the repair's, which a clean call pays in every program it launches: one program per tile took 5.7-7.3 µs at
    Flux's shape and 50-60 µs at B2 H32 N16384 D128 on an H100 with ~56 KB of shared memory a program (bench/NOTES.md,
    round "The quantization in one launch, …"). A flagged tile is recomputed ROWS rows at a time (launch.repair_rows):
    with a whole 64- or 128-row tile in FP32 registers ptxas spilled up to tens of KB per thread; 16 rows take 17.5 KB
    of shared memory at head dim 128 on sm90 and no spill. One program for all of a tile's slices took one flagged
    tile 3.9 ms at Flux's shape on an H100 (bench/NOTES.md, round "Heads in groups inside the library, …")."""
    programs = tl.num_programs(0)
    tile = tl.program_id(0) + tl.arange(0, TILES) * programs
    row = (tile % tiles_m)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
    flags = tl.load(BAD + (tile // tiles_m)[:, None] * NQ + row, mask=(tile[:, None] < tiles) & (row < NQ), other=0)
    if tl.max(tl.max(flags, axis=1), axis=0) != 0:
        for t in range(tl.program_id(0), tiles, programs):
            pid_m = t % tiles_m
            bh = t // tiles_m
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            if tl.max(tl.load(BAD + bh * NQ + offs_m, mask=offs_m < NQ, other=0), axis=0) != 0:
                if tl.program_id(1) == 0:
                    tl.atomic_add(REPAIRED, 1)  # a tile counted once, on the device; read only when reported
                b = bh // H
                h = bh % H
                hk = h // KV_GROUP
                # the tile's head (Q, OUT, BIAS, PE_Q) and KV head (K, V, PE_K), and the causal mask's last key of
                # the tile
                q_head, out_head = Q + b * stride_qb + h * stride_qh, OUT + b * stride_ob + h * stride_oh
                k_head, v_head = K + b * stride_kb + hk * stride_kh, V + b * stride_vb + hk * stride_vh
                bias_head = BIAS + b * stride_bias_b + h * stride_bias_h
                pe_q, pe_k = PE + b * stride_pb + h * stride_ph, PE + b * stride_pb + hk * stride_ph
                hi = tl.minimum(NK, (pid_m + 1) * BLOCK_M) if IS_CAUSAL else NK
                repair_row_slice(q_head, k_head, v_head, out_head, bias_head, LSE + bh * NQ, pe_q, pe_k, stride_pn,
                                 stride_qn, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_on, stride_od,
                                 pid_m * BLOCK_M + tl.program_id(1) * ROWS + tl.arange(0, ROWS), hi, NQ, NK, D,
                                 qk_multiplier, ROWS, BLOCK_N, BLOCK_D, IS_CAUSAL, HAS_BIAS, RETURN_LSE, ROPE,
                                 DOT_PRECISION)


@triton.jit
def repair_row_slice(Q, K, V, OUT, BIAS, LSE, PE_Q, PE_K, stride_pn,
                     stride_qn, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_on, stride_od,
                     offs_m, hi, NQ, NK, D, qk_multiplier,
                     ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, RETURN_LSE: tl.constexpr, ROPE: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """Query rows offs_m of one head recomputed exactly over keys 0..hi: Q, OUT, BIAS, LSE and PE_Q at that head, K,
    V and PE_K at its KV head."""
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    q = tl.load(Q + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=(offs_m[:, None] < NQ) & d_valid[None, :], other=0.0).to(tl.float32)
    if ROPE:
        q = rotated(q, offs_m, offs_d, NQ, D, PE_Q, stride_pn)
    q = q * qk_multiplier
    m_i = tl.full((ROWS,), float("-inf"), tl.float32)
    l_i = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((ROWS, BLOCK_D), tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < NK
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0
                    ).to(tl.float32)
        if ROPE:
            k = rotated(k, offs_n, offs_d, NK, D, PE_K, stride_pn)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if HAS_BIAS:
            s += tl.load(BIAS + offs_n, mask=n_valid, other=0.0)[None, :]
        keep = n_valid[None, :]
        if IS_CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0
                    ).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    o_mask = (offs_m[:, None] < NQ) & d_valid[None, :]
    tl.store(OUT + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od, out.to(OUT.dtype.element_ty),
             mask=o_mask)
    if RETURN_LSE:
        tl.store(LSE + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=offs_m < NQ)
