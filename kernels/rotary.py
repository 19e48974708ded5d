"""Rotary position embedding applied inside the kernels that read Q and K anyway (device code only).

The table is ComfyUI's Flux layout (comfy/ldm/flux/math.py): pe [B, H, N, D/2, 2, 2] in FP32, where channel pair
i of token n turns into out[2i + j] = pe[n, i, j, 0] · x[2i] + pe[n, i, j, 1] · x[2i + 1]. So each channel c is its
own value times pe[n, c/2, c%2, c%2] plus its partner's (c ^ 1) times pe[n, c/2, c%2, 1 - c%2]: the tile keeps the
layout it was loaded in (no split or join of channel pairs), the partner comes from a second load of the same
cache lines, and nothing about the table's values (a rotation's cos and sin) is assumed. A token's 2x2 matrices
are taken contiguous (strides 4, 2, 1 over pair, row, column; kernels/launch.rope_arguments sees to it): with
their offsets known when compiling, the loads need no address arithmetic per element (with runtime strides the
quantization's programs took 255 registers and spilled).
"""
import triton
import triton.language as tl


@triton.jit
def rotated(x, X, b, h, offs_n, offs_d, stride_b, stride_h, stride_n, stride_d, N, D, PE, stride_pn):
    """x, the FP32 tile of rows offs_n and channels offs_d of head (b, h) of the strided tensor X, rotated by
    the table PE (already offset to this batch's and head's table, stride_pn between tokens; see the module).
    Zero outside the tensor."""
    valid = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    partner = tl.load(X + b * stride_b + h * stride_h + offs_n[:, None] * stride_n + (offs_d ^ 1)[None, :] * stride_d,
                      mask=valid, other=0.0).to(tl.float32)
    j = offs_d % 2
    entry = PE + offs_n[:, None] * stride_pn + (2 * offs_d)[None, :]  # pe[n, c/2, c%2, 0]
    own = tl.load(entry + j[None, :], mask=valid, other=0.0)
    across = tl.load(entry + (1 - j)[None, :], mask=valid, other=0.0)
    return own * x + across * partner
