"""Triton quantization kernels (device code only; launchers live in kernels/launch.py).

All kernels read a [B, H, N, D] tensor through explicit strides, so NHD, HND and non-contiguous
views need no copy. Rounding is half away from zero, the same as sage_core/reference.py.
"""
import triton
import triton.language as tl

FP8_E4M3_MAX = tl.constexpr(448.0)


@triton.jit
def round_half_away(x):
    # Truncation after adding ±0.5 rounds half away from zero, identically on GPU and interpreter.
    return tl.where(x >= 0, x + 0.5, x - 0.5)


@triton.jit
def to_fp8_e4m3(x, ROUND_IN_FP32: tl.constexpr):
    """Cast to FP8 e4m3 (round to nearest even). Triton's CPU interpreter rounds ties up and flushes
    subnormals in its own cast, so there (ROUND_IN_FP32) values are first rounded onto the e4m3 grid in
    FP32, making the cast exact and the interpreter's result the one the GPU instruction gives."""
    if ROUND_IN_FP32:
        ax = tl.abs(x)
        step = tl.exp2(tl.floor(tl.log2(tl.maximum(ax, 0.015625))) - 3.0)  # 3 mantissa bits; 2^-6 = min normal
        r = ax / step
        f = tl.floor(r)
        odd = f - 2.0 * tl.floor(f * 0.5)
        up = (r - f > 0.5) | ((r - f == 0.5) & (odd == 1.0))
        x = tl.where(x < 0, -1.0, 1.0) * tl.minimum(tl.where(up, f + 1.0, f) * step, FP8_E4M3_MAX)
    return x.to(tl.float8e4nv)


@triton.jit
def load_tile(X, b, h, offs_n, offs_d, stride_b, stride_h, stride_n, stride_d, N, D):
    """A [rows, BLOCK_D] FP32 tile of a strided [B, H, N, D] tensor, zero outside it, and its in-bounds mask."""
    valid = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    ptrs = X + b * stride_b + h * stride_h + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d
    return tl.load(ptrs, mask=valid, other=0.0).to(tl.float32), valid


@triton.jit
def quantize_rows_int8(x, ROWS: tl.constexpr, GROUP: tl.constexpr, BLOCK_D: tl.constexpr):
    """INT8 codes, the scale of each GROUP of rows, and that scale repeated per row, for a [ROWS, BLOCK_D]
    FP32 tile. A group holding NaN or Inf gets a NaN scale, so the attention output turns non-finite and
    the guard recomputes it exactly instead of returning finite garbage."""
    grouped = tl.reshape(x, (ROWS // GROUP, GROUP * BLOCK_D))
    amax = tl.max(tl.abs(grouped), axis=1)
    has_bad = tl.max(tl.where(grouped == grouped, 0.0, 1.0), axis=1) > 0
    scale = tl.maximum(amax, 1e-30) / 127.0
    scale = tl.where(has_bad, float("nan"), scale)
    q = round_half_away(grouped / scale[:, None]).to(tl.int8)
    q = tl.reshape(q, (ROWS, BLOCK_D))
    row_scale = tl.reshape(tl.broadcast_to(scale[:, None], (ROWS // GROUP, GROUP)), (ROWS,))
    return q, scale, row_scale


@triton.jit
def kv_stats_kernel(
    K, V, PARTS,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    HK, N, D, rows_per_chunk,
    TILE: tl.constexpr, BLOCK_D: tl.constexpr, K_STATS: tl.constexpr, V_STATS: tl.constexpr,
):
    """Partial per-channel statistics of K and V over one chunk of tokens, for one (batch, KV head):
    PARTS[bh, chunk] = (sum of K, sum of V, max of V, min of V), each [BLOCK_D] in FP32 (padded channels
    read as 0). The quantization kernel finishes the reduction, so no PyTorch reduction runs in between."""
    chunk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HK
    h = bh % HK
    offs_d = tl.arange(0, BLOCK_D)
    k_sum = tl.zeros((BLOCK_D,), tl.float32)
    v_sum = tl.zeros((BLOCK_D,), tl.float32)
    v_max = tl.full((BLOCK_D,), float("-inf"), tl.float32)
    v_min = tl.full((BLOCK_D,), float("inf"), tl.float32)
    lo = chunk * rows_per_chunk
    hi = tl.minimum(N, lo + rows_per_chunk)
    for start in range(lo, hi, TILE):
        offs_n = start + tl.arange(0, TILE)
        row_ok = offs_n < hi
        if K_STATS:
            k, _ = load_tile(K, b, h, offs_n, offs_d, stride_kb, stride_kh, stride_kn, stride_kd, hi, D)
            k_sum += tl.sum(k, axis=0)
        if V_STATS:
            v, _ = load_tile(V, b, h, offs_n, offs_d, stride_vb, stride_vh, stride_vn, stride_vd, hi, D)
            v_sum += tl.sum(v, axis=0)
            v_max = tl.maximum(v_max, tl.max(tl.where(row_ok[:, None], v, float("-inf")), axis=0))
            v_min = tl.minimum(v_min, tl.min(tl.where(row_ok[:, None], v, float("inf")), axis=0))
    out = PARTS + (bh * tl.num_programs(0) + chunk) * 4 * BLOCK_D + offs_d
    tl.store(out, k_sum)
    tl.store(out + BLOCK_D, v_sum)
    tl.store(out + 2 * BLOCK_D, v_max)
    tl.store(out + 3 * BLOCK_D, v_min)


@triton.jit
def finish_stats(PARTS, bh, n_chunks, N, offs_d, BLOCK_D: tl.constexpr, WHICH: tl.constexpr):
    """Reduce one statistic over the chunks of kv_stats_kernel: 0 mean of K, 1 mean of V, 2 max of V,
    3 min of V."""
    base = PARTS + bh * n_chunks * 4 * BLOCK_D + WHICH * BLOCK_D + offs_d
    if WHICH == 2:
        acc = tl.full((BLOCK_D,), float("-inf"), tl.float32)
    elif WHICH == 3:
        acc = tl.full((BLOCK_D,), float("inf"), tl.float32)
    else:
        acc = tl.zeros((BLOCK_D,), tl.float32)
    for c in range(0, n_chunks):
        x = tl.load(base + c * 4 * BLOCK_D)
        if WHICH == 2:
            acc = tl.maximum(acc, x)
        elif WHICH == 3:
            acc = tl.minimum(acc, x)
        else:
            acc += x
    if WHICH < 2:
        acc = acc / tl.maximum(N, 1).to(tl.float32)
    return acc


@triton.jit
def pv_key_slot(n):
    """Where key n goes within its 32: bits (h u q t) -> (h q u t), the relabelling under which the scores'
    accumulator registers are the FP8 P·V operand's (kernels/hopper_attention_kernel.to_pv_operand)."""
    return (n & ~15) | (((n >> 1) & 3) << 2) | (((n >> 3) & 1) << 1) | (n & 1)


@triton.jit
def quantize_qkv_kernel(
    Q, K, V, PARTS, Q8, Q_SCALE, K8, K_SCALE, V8, V_SCALE, K_MEAN, V_MEAN, V_ERR,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    BH, BHK, H, HK, NQ, NK, D, n_chunks, q_groups, k_groups, v_padded, q_multiplier, v_code_max,
    ROWS: tl.constexpr, Q_GROUP: tl.constexpr, K_GROUP: tl.constexpr, BLOCK_D: tl.constexpr,
    SMOOTH_K: tl.constexpr, SMOOTH_V: tl.constexpr, PV_FP8: tl.constexpr, FP8_ROUND_IN_FP32: tl.constexpr,
    PV_KEY_ORDER: tl.constexpr,
):
    """Every quantization of one attention call in one launch; program_id(2) picks the tensor.

    0: Q -> INT8 codes [BH, NQ, BLOCK_D] of q * q_multiplier, one scale per Q_GROUP rows.
    1: K -> INT8 codes [BHK, NK, BLOCK_D] of k - mean(k) (SMOOTH_K), one scale per K_GROUP rows; the
       first program of each head also writes the mean (for the LSE correction).
    2: V -> with PV_FP8, FP8 e4m3 codes stored transposed [BHK, BLOCK_D, v_padded] (the K-major operand
       FP8 tensor-core dots want) with per-channel scales; the first program writes the scales and, with
       SMOOTH_V, the mean that the attention kernel adds back. PV_KEY_ORDER stores the keys of every
       32 in the order the Hopper kernel's P operand comes in (pv_key_slot). Every program also writes the
       sum of its rows' FP8 rounding errors per channel into V_ERR [BHK, programs, BLOCK_D] (see
       launch.output_shift: their mean is taken off the output).
    Means and ranges come from kv_stats_kernel's partial statistics, finished here."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    role = tl.program_id(2)
    offs_n = pid * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    if role == 0:
        if (bh < BH) & (pid * ROWS < NQ):
            x, _ = load_tile(Q, bh // H, bh % H, offs_n, offs_d, stride_qb, stride_qh, stride_qn, stride_qd, NQ, D)
            codes, scale, _ = quantize_rows_int8(x * q_multiplier, ROWS, Q_GROUP, BLOCK_D)
            tl.store(Q8 + (bh * NQ + offs_n[:, None]) * BLOCK_D + offs_d[None, :], codes, mask=offs_n[:, None] < NQ)
            offs_g = pid * (ROWS // Q_GROUP) + tl.arange(0, ROWS // Q_GROUP)
            tl.store(Q_SCALE + bh * q_groups + offs_g, scale, mask=offs_g < q_groups)
    elif role == 1:
        if (bh < BHK) & (pid * ROWS < NK):
            k, valid = load_tile(K, bh // HK, bh % HK, offs_n, offs_d, stride_kb, stride_kh, stride_kn, stride_kd,
                                 NK, D)
            if SMOOTH_K:
                mean = finish_stats(PARTS, bh, n_chunks, NK, offs_d, BLOCK_D, 0)
                k = tl.where(valid, k - mean[None, :], 0.0)
                if pid == 0:
                    tl.store(K_MEAN + bh * BLOCK_D + offs_d, mean)
            codes, scale, _ = quantize_rows_int8(k, ROWS, K_GROUP, BLOCK_D)
            tl.store(K8 + (bh * NK + offs_n[:, None]) * BLOCK_D + offs_d[None, :], codes, mask=offs_n[:, None] < NK)
            offs_g = pid * (ROWS // K_GROUP) + tl.arange(0, ROWS // K_GROUP)
            tl.store(K_SCALE + bh * k_groups + offs_g, scale, mask=offs_g < k_groups)
    else:
        if (bh < BHK) & (pid * ROWS < tl.maximum(v_padded, 1)):
            if SMOOTH_V:
                mean = finish_stats(PARTS, bh, n_chunks, NK, offs_d, BLOCK_D, 1)
            else:
                mean = tl.zeros((BLOCK_D,), tl.float32)
            if PV_FP8:
                vmax = finish_stats(PARTS, bh, n_chunks, NK, offs_d, BLOCK_D, 2)
                vmin = finish_stats(PARTS, bh, n_chunks, NK, offs_d, BLOCK_D, 3)
                amax = tl.maximum(vmax - mean, mean - vmin)
                scale = tl.maximum(amax, 1e-30) / v_code_max
                v, valid = load_tile(V, bh // HK, bh % HK, offs_n, offs_d, stride_vb, stride_vh, stride_vn,
                                     stride_vd, NK, D)
                v = tl.where(valid, v - mean[None, :], 0.0)
                codes = to_fp8_e4m3(v / scale[None, :], FP8_ROUND_IN_FP32)
                rounding = tl.where(valid, codes.to(tl.float32) * scale[None, :] - v, 0.0)
                tl.store(V_ERR + (bh * tl.num_programs(0) + pid) * BLOCK_D + offs_d, tl.sum(rounding, axis=0))
                slot_n = pv_key_slot(offs_n) if PV_KEY_ORDER else offs_n
                tl.store(V8 + (bh * BLOCK_D + offs_d[None, :]) * v_padded + slot_n[:, None], codes,
                         mask=offs_n[:, None] < v_padded)
                if pid == 0:
                    tl.store(V_SCALE + bh * BLOCK_D + offs_d, scale)
            if SMOOTH_V:
                if pid == 0:
                    tl.store(V_MEAN + bh * BLOCK_D + offs_d, mean)
