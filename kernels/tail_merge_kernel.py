"""The join of split work items (device code only; the launcher is kernels/hopper_launch.py).

When the ping-pong kernel's grid ends in a part-full wave, its last work items run as `splits` programs each,
one per range of key tiles (hopper_launch.tail_split). Each part leaves its output normalised over its own keys
(FP32, V's scale and shift applied) and its LSE in the scores' base-2 units; this kernel weighs the parts by
their share of the softmax's sum and writes what the whole item would have: the output, its rows' non-finite flags
and the LSE.
"""
import triton
import triton.language as tl

from .attention_kernel import LOG2_FP8_MAX, nonfinite_rows  # LOG2_FP8_MAX: the kernels' exp2 offset (log2 448)


@triton.jit
def sage_fwd_tail_merge_kernel(
    PART_O, PART_LSE, OUT, LSE, BAD,
    stride_ob, stride_oh, stride_on, stride_od,
    H, NQ, n_items, whole,
    SPLITS: tl.constexpr, TILES: tl.constexpr, BLOCK_M: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
    RETURN_LSE: tl.constexpr,
):
    """One program per ROWS rows of a split item's query tile (BLOCK_M rows; an item holds TILES query tiles, one
    per consumer warpgroup): program u joins rows block u % (BLOCK_M / ROWS) of tile (u // (BLOCK_M / ROWS)) %
    TILES of item whole + u // (TILES·BLOCK_M / ROWS), whose parts are partials (that item's index)·SPLITS ..
    +SPLITS-1. The parts were just written and sit in L2: the join is bound by the latency of reading them, so
    every part's load is issued before the first is used (SPLITS unrolled: with a loop over a run-time count the
    loads went one after another, 5.5 µs at Flux's shape)."""
    blocks: tl.constexpr = BLOCK_M // ROWS
    u = tl.program_id(0)
    tail_item = u // (TILES * blocks)
    tile = (u // blocks) % TILES  # the item's tile
    item = whole + tail_item
    bh = item // n_items
    tile_m = TILES * (item % n_items) + tile
    rows = (u % blocks) * ROWS + tl.arange(0, ROWS)  # within the tile
    offs_d = tl.arange(0, BLOCK_D)
    m = tl.full((ROWS,), float("-inf"), tl.float32)
    total = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((ROWS, BLOCK_D), tl.float32)
    for s in tl.static_range(SPLITS):  # a running max, as the softmax's: no part's weight overflows
        part_rows = ((tail_item * SPLITS + s) * TILES + tile) * BLOCK_M + rows
        lse = tl.load(PART_LSE + part_rows)
        part_o = tl.load(PART_O + part_rows[:, None] * BLOCK_D + offs_d[None, :])
        m_new = tl.maximum(m, lse)
        rescale = tl.exp2(m - m_new)
        weight = tl.exp2(lse - m_new)
        acc = acc * rescale[:, None] + part_o * weight[:, None]
        total = total * rescale + weight
        m = m_new
    out = acc / total[:, None]
    b = bh // H
    h = bh % H
    q_rows = tile_m * BLOCK_M + rows
    o_mask = (q_rows < NQ)[:, None] & (offs_d < BLOCK_D)[None, :]
    tl.store(OUT + b * stride_ob + h * stride_oh + q_rows[:, None] * stride_on + offs_d[None, :] * stride_od,
             out.to(OUT.dtype.element_ty), mask=o_mask)
    tl.store(BAD + bh * NQ + q_rows, nonfinite_rows(out, o_mask), mask=q_rows < NQ)
    if RETURN_LSE:
        tl.store(LSE + bh * NQ + q_rows, (m + tl.log2(total) - LOG2_FP8_MAX) * 0.6931471805599453, mask=q_rows < NQ)
