"""Triton SageAttention forward kernel (device code only; the launcher is kernels/launch.py).

One program computes BLOCK_M query rows of one (batch, head):
  1. loads its INT8 Q tile (quantized beforehand, one scale per Q_GROUP rows, the softmax scale and
     log2(e) folded in): a loaded operand stays in shared memory for the tensor cores, where a tile
     quantized in registers was re-gathered byte by byte on every key tile;
  2. streams INT8 K tiles (pre-quantized, K smoothing applied, one scale per K_GROUP keys) and
     computes the scores in FP32 with an online softmax in base 2; the row maximum is taken on the
     unscaled integer products, so each score costs one fused multiply-add before its exp2;
  3. accumulates P·V either with P in FP16/BF16 against V in its own dtype (SageAttention 1), or with
     P scaled by 448 into FP8 e4m3 against per-channel FP8 V (SageAttention 2), in FP32; FP8 P·V either
     in the output's registers (PV_DIRECT) or per key tile first, in FP32 or in FP16 (PV_FP16_TILES,
     SageAttention2++).
Masks are an additive bias over keys (already in log2 units) that broadcasts over queries.
"""
import triton
import triton.language as tl

from .quant_kernels import to_fp8_e4m3

LOG2_FP8_MAX = tl.constexpr(8.807354922057604)  # log2(448)
# 1.5 * 2^23 as an FP32 bit pattern: an int32 x with |x| < 2^22 added to it reads, as FP32, 1.5 * 2^23 + x
# exactly, so seeding the INT8 dot's accumulator with it turns the int-to-float conversion of every score
# into a free reinterpretation (|Q8·K8| ≤ 127² · 256 < 2^22 for every head dim served).
MAGIC_I2F_BITS = tl.constexpr(0x4B400000)
MAGIC_I2F = tl.constexpr(12582912.0)


@triton.jit
def nonfinite_rows(out, mask):
    """1 (int8) for each row of an output tile holding NaN or Inf where `mask` is set (|x| < inf is false for
    both), else 0: the per-row flags the guard's repair reads."""
    return (tl.sum(tl.where(mask & ~(tl.abs(out) < float("inf")), 1, 0), axis=1) > 0).to(tl.int8)


@triton.jit
def tile_scores(q8, k_base, start_n, offs_d, NK, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                MASKED: tl.constexpr, MAGIC_CONVERT: tl.constexpr):
    """Q8 · K8ᵀ of one key tile as FP32 (plus MAGIC_I2F when MAGIC_CONVERT: the caller subtracts it)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if MASKED:
        k8 = tl.load(k_base + offs_n[:, None] * BLOCK_D + offs_d[None, :], mask=offs_n[:, None] < NK, other=0)
    else:
        k8 = tl.load(k_base + offs_n[:, None] * BLOCK_D + offs_d[None, :])
    if MAGIC_CONVERT:
        seed = tl.full((q8.shape[0], BLOCK_N), MAGIC_I2F_BITS, tl.int32)
        return tl.dot(q8, tl.trans(k8), acc=seed, out_dtype=tl.int32).to(tl.float32, bitcast=True)
    return tl.dot(q8, tl.trans(k8)).to(tl.float32)


@triton.jit
def softmax_pv(acc, m_i, l_i, qk, q_scale, start_n, offs_m, offs_d, d_valid, ks_base, bias_base, v_base,
               v8_base, v_mean, stride_vn, stride_vd, NK, v_padded,
               BLOCK_N: tl.constexpr, K_GROUP: tl.constexpr, MASKED: tl.constexpr,
               PV_FP8: tl.constexpr, SHIFT_V: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
               BF16_DOT_IN_FP32: tl.constexpr, FP8_ROUND_IN_FP32: tl.constexpr, V_DTYPE: tl.constexpr,
               MAGIC_CONVERT: tl.constexpr, PV_DIRECT: tl.constexpr, PV_FP16_TILES: tl.constexpr):
    """The online-softmax update of one key tile from its raw products `qk`, then P·V. MASKED tiles (the
    ragged tail, the causal diagonal) pay for bounds and causal masks; every other tile runs without them."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_valid = offs_n < NK
    qk_offset = MAGIC_I2F if MAGIC_CONVERT else 0.0
    # scores: (qk - qk_offset) * row_scale (* key scale), in log2 units
    exp_shift = 0.0
    if PV_FP8:
        # P pre-scaled by 448 (e4m3's largest value) inside the exp2, for free: P·V and the row sum
        # carry the same factor, so it cancels in acc / l
        exp_shift = LOG2_FP8_MAX
    if K_GROUP >= BLOCK_N and not HAS_BIAS and not MASKED:
        # one K scale for the whole tile, folded into Q's row scales (all positive): the row max of the
        # raw products gives the row max of the scores, and each exp2 argument is one FMA
        row_scale = q_scale * tl.load(ks_base + start_n // K_GROUP)
        m_new = tl.maximum(m_i, (tl.max(qk, axis=1) - qk_offset) * row_scale)
        p = tl.exp2(qk * row_scale[:, None] - (m_new + qk_offset * row_scale - exp_shift)[:, None])
        m_new_safe = m_new
    else:
        if K_GROUP >= BLOCK_N:
            s = (qk - qk_offset) * (q_scale * tl.load(ks_base + start_n // K_GROUP))[:, None]
        else:
            if MASKED:
                k_scale = tl.load(ks_base + offs_n // K_GROUP, mask=n_valid, other=0.0)
            else:
                k_scale = tl.load(ks_base + offs_n // K_GROUP)
            s = (qk - qk_offset) * q_scale[:, None] * k_scale[None, :]
        if HAS_BIAS:
            if MASKED:
                s = s + tl.load(bias_base + offs_n, mask=n_valid, other=0.0)[None, :]
            else:
                s = s + tl.load(bias_base + offs_n)[None, :]
        if MASKED:
            keep = n_valid[None, :]
            if IS_CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        if MASKED or HAS_BIAS:
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with every key masked so far
        else:
            m_new_safe = m_new
        p = tl.exp2(s - (m_new_safe - exp_shift)[:, None])
    alpha = tl.exp2(m_i - m_new_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    if PV_FP8:
        v8_ptrs = v8_base + offs_d[None, :] * v_padded + offs_n[:, None]
        if MASKED:
            v8 = tl.load(v8_ptrs, mask=offs_n[:, None] < v_padded, other=0.0)
        else:
            v8 = tl.load(v8_ptrs)
        p8 = to_fp8_e4m3(p, FP8_ROUND_IN_FP32)
        if PV_DIRECT:
            acc = tl.dot(p8, v8, acc)
        elif PV_FP16_TILES:
            # SageAttention2++'s two-level accumulation: the tile's product in an FP16 accumulator, which runs at
            # twice the FP32 one's rate on GeForce Ada and Blackwell tensor cores; V's codes are kept small
            # enough that a tile's sum cannot overflow it (launch.fp16_tile_v_code_max)
            acc += tl.dot(p8, v8, out_dtype=tl.float16).to(tl.float32)
        else:
            # two-level accumulation: each tile's FP8 product lands in FP32 before it joins acc
            acc += tl.dot(p8, v8)
    else:
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
        if MASKED:
            v = tl.load(v_ptrs, mask=n_valid[:, None] & d_valid[None, :], other=0.0)
        else:
            v = tl.load(v_ptrs, mask=d_valid[None, :], other=0.0)
        if SHIFT_V:
            v = (v.to(tl.float32) - v_mean[None, :]).to(V_DTYPE)
        if V_DTYPE == tl.float32:
            acc += tl.dot(p, v)
        elif BF16_DOT_IN_FP32:
            # Triton's CPU interpreter mis-multiplies bf16 operands: same rounding of P, exact product
            acc += tl.dot(p.to(tl.bfloat16).to(tl.float32), v.to(tl.float32))
        else:
            acc = tl.dot(p.to(V_DTYPE), v, acc)
    return acc, m_new, l_i


@triton.jit
def sage_attention_fwd_kernel(
    Q8, Q_SCALE, K8, K_SCALE, V, V8, V_SCALE, V_SHIFT, BIAS, OUT, LSE, BAD,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_bias_b, stride_bias_h,
    H, KV_GROUP, NQ, NK, D, q_groups, k_groups, v_padded,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    Q_GROUP: tl.constexpr, K_GROUP: tl.constexpr,
    PV_FP8: tl.constexpr, SHIFT_V: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr, RETURN_LSE: tl.constexpr, BF16_DOT_IN_FP32: tl.constexpr,
    FP8_ROUND_IN_FP32: tl.constexpr, EVEN_D: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    MAGIC_CONVERT: tl.constexpr, PV_DIRECT: tl.constexpr, PV_FP16_TILES: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    bh_kv = b * (H // KV_GROUP) + h // KV_GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    if EVEN_D:
        d_valid = offs_d < BLOCK_D  # all true, known at compile time: no per-element masks
    else:
        d_valid = offs_d < D
    row_valid = offs_m < NQ
    q8 = tl.load(Q8 + (bh * NQ + offs_m[:, None]) * BLOCK_D + offs_d[None, :], mask=row_valid[:, None], other=0)
    q_scale = tl.load(Q_SCALE + bh * q_groups + offs_m // Q_GROUP, mask=row_valid, other=1.0)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)

    hi = NK
    full_hi = (NK // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        # top-left aligned, as torch's scaled_dot_product_attention(is_causal=True)
        hi = tl.minimum(NK, (pid_m + 1) * BLOCK_M)
        full_hi = tl.minimum(full_hi, (pid_m * BLOCK_M // BLOCK_N) * BLOCK_N)
    k_base = K8 + bh_kv * NK * BLOCK_D
    ks_base = K_SCALE + bh_kv * k_groups
    bias_base = BIAS + b * stride_bias_b + h * stride_bias_h
    v_base = V + b * stride_vb + (h // KV_GROUP) * stride_vh
    v8_base = V8 + bh_kv * BLOCK_D * v_padded
    v_mean = tl.zeros((BLOCK_D,), tl.float32)
    if SHIFT_V and not PV_FP8:  # the FP16 path subtracts V's mean from every V tile; FP8 V was stored smoothed
        v_mean = tl.load(V_SHIFT + bh_kv * BLOCK_D + offs_d)
    V_DTYPE: tl.constexpr = V.dtype.element_ty
    # the unmasked bulk of the keys, optionally warp-specialised (producer/consumer warps on Blackwell). (Issuing
    # the next tile's Q·Kᵀ before this tile's softmax, by hand, made Triton 3.6 wait on every wgmma: slower.)
    for start_n in tl.range(0, full_hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        qk = tile_scores(q8, k_base, start_n, offs_d, NK, BLOCK_N, BLOCK_D, False, MAGIC_CONVERT)
        acc, m_i, l_i = softmax_pv(
            acc, m_i, l_i, qk, q_scale, start_n, offs_m, offs_d, d_valid, ks_base, bias_base, v_base,
            v8_base, v_mean, stride_vn, stride_vd, NK, v_padded, BLOCK_N, K_GROUP, False, PV_FP8, SHIFT_V,
            IS_CAUSAL, HAS_BIAS, BF16_DOT_IN_FP32, FP8_ROUND_IN_FP32, V_DTYPE, MAGIC_CONVERT, PV_DIRECT,
            PV_FP16_TILES)
    for start_n in range(full_hi, hi, BLOCK_N):  # the ragged tail and the causal diagonal
        qk = tile_scores(q8, k_base, start_n, offs_d, NK, BLOCK_N, BLOCK_D, True, MAGIC_CONVERT)
        acc, m_i, l_i = softmax_pv(
            acc, m_i, l_i, qk, q_scale, start_n, offs_m, offs_d, d_valid, ks_base, bias_base, v_base,
            v8_base, v_mean, stride_vn, stride_vd, NK, v_padded, BLOCK_N, K_GROUP, True, PV_FP8, SHIFT_V,
            IS_CAUSAL, HAS_BIAS, BF16_DOT_IN_FP32, FP8_ROUND_IN_FP32, V_DTYPE, MAGIC_CONVERT, PV_DIRECT,
            PV_FP16_TILES)

    out = acc / l_i[:, None]
    if PV_FP8:
        v_scale = tl.load(V_SCALE + bh_kv * BLOCK_D + offs_d)
        out = out * v_scale[None, :]
    if SHIFT_V:  # the output shift (launch.quantize_qkv's v_shift), loaded here: no registers held across the loop
        out = out + tl.load(V_SHIFT + bh_kv * BLOCK_D + offs_d)[None, :]
    o_mask = row_valid[:, None] & d_valid[None, :]
    o_ptrs = OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=o_mask)
    tl.store(BAD + bh * NQ + offs_m, nonfinite_rows(out, o_mask), mask=row_valid)
    if RETURN_LSE:
        # natural-log LSE of the (smoothed) scaled scores; the launcher adds K smoothing's correction
        log2_sum = tl.log2(l_i) - LOG2_FP8_MAX if PV_FP8 else tl.log2(l_i)
        lse = (m_i + log2_sum) * 0.6931471805599453
        tl.store(LSE + bh * NQ + offs_m, lse, mask=row_valid)
