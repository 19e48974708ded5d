"""Rotary position embedding applied inside the kernels that read Q and K anyway (device code only).

ComfyUI's Flux layout (comfy/ldm/flux/math.py) is pe [B, H, N, D/2, 2, 2]: channel pair i of token n turns into
out[2i + j] = pe[n, i, j, 0] · x[2i] + pe[n, i, j, 1] · x[2i + 1]. So each channel c is its own value times one
coefficient plus its partner's (c ^ 1) times another. The kernels read those two per channel from a table laid out
as the tile is, [B, H, N, 2, D] in FP32 (or 16-bit, widened on load): row 0 the own coefficients, row 1 the
partners' (launch.rope_table makes it from pe, the node's hand-offs once per forward; nothing about the values, a
rotation's cos and sin, is assumed). Its loads are then 16-byte vectors in the tile's own layout, and the partner
comes from the tile already in registers (its channel pairs split and swapped), not from memory. Read in pe's own
layout, each channel took two 4-byte gathers and a second load of its partner, and Triton moved the tile through
shared memory to their layout and back: on an H100 the rotating launches were bound in L1/TEX, 2-7x the plain
quantization's time (bench/NOTES.md, "The rotary hand-off measured").
"""
import triton
import triton.language as tl


@triton.jit
def rotated(x, offs_n, offs_d, N, D, PE, stride_pn):
    """x, an FP32 [rows, channels] tile of rows offs_n and channels offs_d (channels a power of two, starting at 0),
    rotated by the table PE (launch.rope_table's layout, already offset to the tile's batch and head; stride_pn
    between tokens, D between a token's two rows). Zero outside [N, D]."""
    ROWS: tl.constexpr = x.shape[0]
    CHANNELS: tl.constexpr = x.shape[1]
    valid = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    even, odd = tl.split(tl.reshape(x, (ROWS, CHANNELS // 2, 2)))
    partner = tl.reshape(tl.join(odd, even), (ROWS, CHANNELS))
    own = PE + offs_n[:, None] * stride_pn + offs_d[None, :]
    return tl.load(own, mask=valid, other=0.0) * x + tl.load(own + D, mask=valid, other=0.0) * partner
