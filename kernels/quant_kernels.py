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
def load_centered_tile(X, MEAN, bh, b, h, offs_n, offs_d, stride_b, stride_h, stride_n, stride_d, N, D,
                       BLOCK_D: tl.constexpr, SUBTRACT_MEAN: tl.constexpr):
    """A [rows, BLOCK_D] FP32 tile of a strided [B, H, N, D] tensor, zero outside it, minus the per-channel
    mean when asked (MEAN is [B*H, BLOCK_D])."""
    valid = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    ptrs = X + b * stride_b + h * stride_h + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d
    x = tl.load(ptrs, mask=valid, other=0.0).to(tl.float32)
    if SUBTRACT_MEAN:
        mean = tl.load(MEAN + bh * BLOCK_D + offs_d)
        x = tl.where(valid, x - mean[None, :], 0.0)
    return x


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
def channel_stats_kernel(
    X, SUM, MAX, MIN,
    stride_b, stride_h, stride_n, stride_d,
    H, N, D,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Partial per-channel sum / max / min over ROWS tokens, written to [B*H, chunks, BLOCK_D]."""
    chunk = tl.program_id(0)
    bh = tl.program_id(1)
    n_chunks = tl.num_programs(0)
    b = bh // H
    h = bh % H
    offs_n = chunk * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    valid = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    ptrs = X + b * stride_b + h * stride_h + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d
    x = tl.load(ptrs, mask=valid, other=0.0).to(tl.float32)
    out = (bh * n_chunks + chunk) * BLOCK_D + offs_d
    tl.store(SUM + out, tl.sum(x, axis=0))
    tl.store(MAX + out, tl.max(tl.where(valid, x, float("-inf")), axis=0))
    tl.store(MIN + out, tl.min(tl.where(valid, x, float("inf")), axis=0))


@triton.jit
def quant_int8_kernel(
    X, MEAN, XQ, SCALE,
    stride_b, stride_h, stride_n, stride_d,
    H, N, D, n_groups, multiplier,
    ROWS: tl.constexpr, GROUP: tl.constexpr, BLOCK_D: tl.constexpr, SUBTRACT_MEAN: tl.constexpr,
):
    """Symmetric INT8 quantization of (x - mean) * multiplier, one scale per GROUP consecutive tokens.

    XQ is a contiguous [B, H, N, BLOCK_D] int8 buffer (head dim zero-padded), SCALE [B, H, n_groups].
    """
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    offs_n = pid * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    x = load_centered_tile(X, MEAN, bh, bh // H, bh % H, offs_n, offs_d, stride_b, stride_h, stride_n, stride_d,
                           N, D, BLOCK_D, SUBTRACT_MEAN)
    q, scale, _ = quantize_rows_int8(x * multiplier, ROWS, GROUP, BLOCK_D)
    out_ptrs = XQ + (bh * N + offs_n[:, None]) * BLOCK_D + offs_d[None, :]
    tl.store(out_ptrs, q, mask=offs_n[:, None] < N)
    offs_g = pid * (ROWS // GROUP) + tl.arange(0, ROWS // GROUP)
    tl.store(SCALE + bh * n_groups + offs_g, scale, mask=offs_g < n_groups)


@triton.jit
def quant_fp8_v_kernel(
    V, MEAN, SCALE, VQ,
    stride_b, stride_h, stride_n, stride_d,
    H, N, D, n_padded,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, SUBTRACT_MEAN: tl.constexpr, FP8_ROUND_IN_FP32: tl.constexpr,
):
    """FP8 e4m3 quantization of V with per-channel scales, stored transposed as [B, H, BLOCK_D, n_padded].

    The transposed layout makes V the K-major operand that FP8 tensor-core dots want.
    """
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    offs_n = pid * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    v = load_centered_tile(V, MEAN, bh, bh // H, bh % H, offs_n, offs_d, stride_b, stride_h, stride_n, stride_d,
                           N, D, BLOCK_D, SUBTRACT_MEAN)
    scale = tl.load(SCALE + bh * BLOCK_D + offs_d)
    vq = to_fp8_e4m3(v / scale[None, :], FP8_ROUND_IN_FP32)
    out_ptrs = VQ + (bh * BLOCK_D + offs_d[None, :]) * n_padded + offs_n[:, None]
    tl.store(out_ptrs, vq, mask=offs_n[:, None] < n_padded)
