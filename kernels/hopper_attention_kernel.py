"""Hopper (sm90) SageAttention forward kernels in Gluon (device code only; the launcher is kernels/hopper_launch.py).

The same algorithm as kernels/attention_kernel.py (INT8 Q·Kᵀ with one K scale per key tile, FP32 online
softmax in base 2, FP8 e4m3 P·V with per-channel V scales), written at the level where the schedule is ours
rather than the compiler's:
  - K and V tiles arrive by TMA into a ring of STAGES buffers, each with its own mbarrier;
  - the matrix products are asynchronous wgmma: the scores of key tile j are issued, then P·V of tile j-1,
    and the softmax of tile j runs while the tensor cores still work on P·V (the "intra-warpgroup
    overlap" of FlashAttention-3). Triton's own pipeliner waits on every wgmma of this loop;
  - P·V either accumulates in place in the wgmma accumulator (TWO_LEVEL=False: the launcher then smooths V,
    see kernels/launch.py) or lands per tile in an FP16 accumulator and joins the FP32 output with one FMA
    (TWO_LEVEL: SageAttention2's two-level accumulation with SageAttention2++'s FP16 tile accumulator, half the
    registers of an FP32 one, which spilled at 128 keys per tile; the launcher keeps FP8 V codes within ±1 so
    that 128 keys × P ≤ 448 cannot overflow FP16);
  - P's row sums (the softmax's normaliser) come from the tensor cores too: P times a tile of FP8 ones, issued
    with P·V (row_sums), except in the one-warpgroup two-level kernel, whose registers are all taken.
  - in the ping-pong kernel with turns, Q's codes sit in registers (scores_operand): each turn is shorter;
  - or, given a 16-bit v_desc (the call's V in FP16 or BF16, read by TMA from the caller's tensor as it lies),
    P·V in V's own type, accumulated in place in FP32: no V quantization at all, P rounded to 8 or 11
    significant bits rather than e4m3's 4, at twice FP8's tensor-core time for P·V (SageAttention's INT8·FP16
    variant).
Two kernels: sage_fwd_sm90_kernel, one warpgroup per program, loading its own tiles; and
sage_fwd_sm90_pingpong_kernel, two consumer warpgroups taking turns at the tensor cores (or, without the
turn-taking, two or three) and a producer warp, one program per group of query tiles or (PERSISTENT) one per
multiprocessor looping over them.
Served: non-causal, no mask, head dims 64 and 128, FP8 P·V or a 16-bit V. Everything else runs the portable kernel.
"""
from triton.experimental import gluon
from triton.runtime.jit import constexpr_function
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)

# names that changed after Triton 3.6: the TMA load (async_copy_global_to_shared -> async_load) and the CTA
# barrier (thread_barrier -> barrier)
tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier

LOG2_FP8_MAX = gl.constexpr(8.807354922057604)  # log2(448): P is scaled into e4m3's range inside its exp2
# a 16-bit V's ring slots and the row sums' tile of ones: rows of 128 or 256 bytes, TMA's and wgmma's swizzle
V16_SHARED = gl.constexpr(gl.NVMMASharedLayout(128, 16))
MAGIC_I2F_BITS = gl.constexpr(0x4B400000)  # see attention_kernel.py: INT32 scores read as FP32 for free
MAGIC_I2F = gl.constexpr(12582912.0)
# four P values -> one register of four FP8 bytes (the P·V A operand), from FP32 or from two f16x2 registers
P8_FROM_F32 = gl.constexpr("{ .reg .b16 lo, hi;\ncvt.rn.satfinite.e4m3x2.f32 lo, $2, $1;\n"
                           "cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3;\nmov.b32 $0, {lo, hi}; }")
P8_FROM_F16X2 = gl.constexpr("{ .reg .b16 lo, hi;\ncvt.rn.satfinite.e4m3x2.f16x2 lo, $1;\n"
                             "cvt.rn.satfinite.e4m3x2.f16x2 hi, $2;\nmov.b32 $0, {lo, hi}; }")

# The ping-pong kernel's hand-offs run on hardware named barriers (bar.sync / bar.arrive), as FlashAttention-3's
# do: a Gluon mbarrier.arrive is one thread's, so the compiler puts a warpgroup bar.sync before each (three per
# key tile). IDs above the few Triton numbers its partitions with. Barrier TURN_BARRIER + c: consumer c's turn
# at the tensor cores (the other consumer arrives, c waits); SLOT_BARRIER + s: ring slot s is free (every
# consumer arrives, the producer waits: slot_threads).
TURN_BARRIER = gl.constexpr(8)
SLOT_BARRIER = gl.constexpr(10)
TURN_THREADS = gl.constexpr(256)  # two consumer warpgroups
# $1: barrier id; $2: 0 skips the arrive. Each thread runs it once (a one-element-per-thread token).
NAMED_SYNC = gl.constexpr("bar.sync $1, $2; mov.b32 $0, 0;")
NAMED_ARRIVE = gl.constexpr("{ .reg .pred p; setp.ne.b32 p, $3, 0; @p bar.arrive $1, $2; mov.b32 $0, 0; }")


@constexpr_function
def is_16bit(dtype):
    """Whether V (its descriptor's or its ring's element type) is the call's own FP16/BF16 V rather than FP8 codes."""
    return dtype.primitive_bitwidth == 16


@constexpr_function
def mma_k(dtype):
    """The k of one wgmma instruction for operands of `dtype`: 32 bytes of them."""
    return 256 // dtype.primitive_bitwidth


@constexpr_function
def slot_threads(consumers):
    """The threads at a ring slot's barrier: the consumer warpgroups and the producer warp."""
    return consumers * 128 + 32


@gluon.jit
def per_thread(value, WARPS: gl.constexpr):
    """`value` once in every thread of a partition of WARPS warps: an operand of a barrier's inline PTX."""
    return gl.full([32 * WARPS], value, gl.int32, gl.BlockedLayout([1], [32], [WARPS], [0]))


@gluon.jit
def named_sync(barrier_id, threads: gl.constexpr, WARPS: gl.constexpr):
    """bar.sync on hardware barrier `barrier_id` (completes when `threads` threads got there) by every thread
    of a partition of WARPS warps."""
    gl.inline_asm_elementwise(NAMED_SYNC, "=r,r,r", [per_thread(barrier_id, WARPS), per_thread(threads, WARPS)],
                              dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def named_arrive(barrier_id, threads: gl.constexpr, live, WARPS: gl.constexpr):
    """bar.arrive on hardware barrier `barrier_id` by every thread of a partition of WARPS warps, if `live`."""
    gl.inline_asm_elementwise(NAMED_ARRIVE, "=r,r,r,r", [per_thread(barrier_id, WARPS), per_thread(threads, WARPS),
                                                         per_thread(live, WARPS)],
                              dtype=gl.int32, is_pure=False, pack=1)


@constexpr_function
def rescale_if_moved_asm(n):
    """PTX for rescale_if_moved over a thread's n accumulator values: $0..$n-1 the values (tied to the inputs
    $n..$2n-1), $2n..$3n-1 their rows' factors. Elements 0 and 2 of a wgmma accumulator's thread are its two rows
    (r and r + 8); the vote makes the branch uniform over the warp's 16 rows."""
    muls = "\n".join(f"mul.f32 ${i}, ${i}, ${2 * n + i};" for i in range(n))
    return ("{ .reg .pred moved, any;\n"
            f"setp.neu.f32 moved, ${2 * n}, 0f3F800000;\n"
            f"setp.neu.or.f32 moved, ${2 * n + 2}, 0f3F800000, moved;\n"
            "vote.sync.any.pred any, moved, 0xffffffff;\n"
            "@!any bra.uni SKIP;\n" + muls + "\nSKIP: }")


@constexpr_function
def rescale_if_moved_constraints(n):
    """The constraints of rescale_if_moved_asm: n outputs, n inputs tied to them, n factors."""
    return ",".join(["=f"] * n + [str(i) for i in range(n)] + ["f"] * n)


@gluon.jit
def rescale_if_moved(acc, factors):
    """acc times its rows' factors, branched over by a warp none of whose 16 rows moved its max (every factor
    exactly 1, so skipping changes no bit): in a long sequence most rows keep their max after the first key
    tiles. The branch costs four instructions and keeps the multiplies (head dim / 2 per key tile and thread) from
    being interleaved with the code around them: on the H200 2-3% faster at Wan2.1's 32k tokens with turns and
    1% at HunyuanVideo's 118k without, 5% slower with turns at 16k, level with three consumers at head dim 64
    (bench/NOTES.md, "The rescale skipped where no row moved, …"); the launch table chooses."""
    n: gl.constexpr = acc.shape[0] * acc.shape[1] // 128  # a thread's share of the warpgroup's accumulator
    return gl.inline_asm_elementwise(rescale_if_moved_asm(n), rescale_if_moved_constraints(n), [acc, factors],
                                     dtype=gl.float32, is_pure=True, pack=n)


@gluon.jit
def online_softmax(s_bits, m_i, row_scale, n_left, BLOCK_N: gl.constexpr, s_layout: gl.constexpr,
                   LAST: gl.constexpr, MAGIC: gl.constexpr):
    """One key tile's softmax update from its INT32 scores. Returns (P, new max, rescale); the caller takes
    P's row sums (on the tensor cores, row_sums, or in the two-level one-warpgroup kernel with a sum here).
    MAGIC: the scores were seeded with MAGIC_I2F_BITS and are read as FP32 (plus MAGIC_I2F) for free;
    otherwise they are converted (I2F: no seeding moves, a conversion per score)."""
    if MAGIC:
        s = s_bits.to(gl.float32, bitcast=True)
        offset: gl.constexpr = MAGIC_I2F
    else:
        s = s_bits.to(gl.float32)
        offset: gl.constexpr = 0.0
    if LAST:
        # only the last tile can be ragged: keys past the end never count. Masked after scaling, so a zero
        # row scale (a K tile that smoothing made all zero) cannot turn -inf into NaN.
        cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s = (s - offset) * gl.expand_dims(row_scale, 1)
        s = gl.where(gl.expand_dims(cols < n_left, 0), s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1))
        p = gl.exp2(s - gl.expand_dims(m_new - LOG2_FP8_MAX, 1))
    else:
        m_new = gl.maximum(m_i, (gl.max(s, axis=1) - offset) * row_scale)
        bias = m_new + offset * row_scale - LOG2_FP8_MAX
        p = gl.exp2(s * gl.expand_dims(row_scale, 1) - gl.expand_dims(bias, 1))
    alpha = gl.exp2(m_i - m_new)
    return p, m_new, alpha


@gluon.jit
def carried(p, V_DTYPE: gl.constexpr):
    """P as it crosses to the next step, where its product is issued: with a 16-bit V in V's type, what P·V
    multiplies (half the registers of FP32: at head dim 64 under 168 registers the loop spilled with FP32 P), cast
    after P·V's wait (the A operand's registers written while a wgmma is in flight make ptxas serialise every
    wgmma); FP8 P·V: as it is (see to_pv_operand)."""
    if is_16bit(V_DTYPE):
        p = p.to(V_DTYPE)
    return p


@gluon.jit
def to_pv_operand(p, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, p_layout: gl.constexpr, V_DTYPE: gl.constexpr):
    """P as the A operand of P·V. A 16-bit V (V_DTYPE): P in that type, which the scores' accumulator layout
    already matches register for register (k_width 2). Otherwise P in FP8, without moving a byte between
    threads: within every 32 keys the accumulator gives a thread keys {2q, 2q+1, 8+2q, 9+2q} (+16) where the A
    operand wants {4q..4q+3} (+16). Relabelling the keys (bits h u q t -> h q u t) makes the two the same
    registers; the quantization kernel stores FP8 V with its keys in that order (see quant_kernels.pv_key_source)."""
    if is_16bit(V_DTYPE):
        operand = gl.convert_layout(p.to(V_DTYPE), p_layout, assert_trivial=True)
    else:
        # relabel in FP32 (a renaming of registers), then cast: each pair conversion lands in its final
        # half-register
        p = gl.reshape(p, [BLOCK_M, BLOCK_N // 32, 2, 2, 4, 2])
        p = gl.permute(p, [0, 1, 2, 4, 3, 5])
        p = gl.reshape(p, [BLOCK_M, BLOCK_N])
        p = gl.convert_layout(p, p_layout, assert_trivial=True)
        # four neighbours of a thread -> one A-operand register, two conversions. P carried across steps in FP16
        # (two-level ping-pong, whose FP32 P spilled beside the producer warp) arrives as two f16x2 registers.
        if p.dtype == gl.float16:
            operand = gl.inline_asm_elementwise(P8_FROM_F16X2, "=r,r,r", [p], dtype=gl.float8e4nv, is_pure=True,
                                                pack=4)
        else:
            operand = gl.inline_asm_elementwise(P8_FROM_F32, "=r,r,r,r,r", [p], dtype=gl.float8e4nv, is_pure=True,
                                                pack=4)
    return operand


@gluon.jit
def issue_kv_load(k_desc, v_desc, k_smem, v_smem, bars, tile, slot, bh_kv, v_row0, v_col0, NK, live,
                  BLOCK_N: gl.constexpr, BLOCK_D: gl.constexpr):
    """TMA of key tile `tile` (K rows and the matching V: FP8 Vᵀ columns, or a 16-bit V's rows) into ring slot
    `slot`, if `live`. (v_row0, v_col0): where the head's V starts in v_desc (v_origin)."""
    bar = bars.index(slot)
    mbarrier.expect(bar, BLOCK_N * BLOCK_D * (1 + v_desc.dtype.primitive_bitwidth // 8), pred=live)  # INT8 K, V
    tma_load(k_desc, [bh_kv * NK + tile * BLOCK_N, 0], bar, k_smem.index(slot), pred=live)
    if is_16bit(v_desc.dtype):
        # the call's V [B, HK, NK, D]: keys past NK arrive as zeros (a ragged last tile's P is 0 there, and 0
        # times whatever lay in memory past the head could be NaN)
        tma_load(v_desc, [v_row0, v_col0, tile * BLOCK_N, 0], bar,
                 v_smem.index(slot).reshape([1, 1, BLOCK_N, BLOCK_D]), pred=live)
    else:
        tma_load(v_desc, [v_row0, v_col0 + tile * BLOCK_N], bar, v_smem.index(slot), pred=live)


@gluon.jit
def v_origin(v_desc, bh_kv, HK, BLOCK_D: gl.constexpr):
    """Where K/V head bh_kv's V starts in v_desc, as two coordinates: FP8 codes, (its first row of BLOCK_D
    channels, 0); a 16-bit V, the call's own [B, HK, NK, D] in a 4-D descriptor, (batch, head)."""
    if is_16bit(v_desc.dtype):
        origin = (bh_kv // HK, bh_kv % HK)
    else:
        origin = (bh_kv * BLOCK_D, bh_kv * 0)
    return origin


@gluon.jit
def pv_operand(v_smem, slot):
    """Ring slot `slot`'s V as P·V's B operand [keys, head dim]: FP8 codes are stored [head dim, keys] (FP8's
    wgmma reads B K-major only); a 16-bit V as it came, [keys, head dim]."""
    if is_16bit(v_smem.dtype):
        operand = v_smem.index(slot)
    else:
        operand = v_smem.index(slot).permute((1, 0))
    return operand


@gluon.jit
def scores_operand(q_smem, s_layout: gl.constexpr, IN_REGISTERS: gl.constexpr):
    """Q's INT8 codes as the A operand of every Q·Kᵀ: read from shared memory by each wgmma, or (IN_REGISTERS)
    loaded once into 16 registers per thread. In the ping-pong kernel with turns, registers shorten each turn
    (123 -> 101 instructions before its first product, the seeds' moves being most of the rest) and lift
    Wan2.1 by 2-4%; without turns and in the one-warpgroup kernel they read level or 2% slower (bench/NOTES.md,
    "Q's codes in registers"). With FP16 P·V (its A operand twice FP8's registers) they stay in shared memory:
    with them in registers Triton 3.9's ping-pong kernel spilled in its loop. The next work item's TMA of Q
    overwrites the tile only after every use of these registers, so no proxy fence is needed between the load
    and that write."""
    if IN_REGISTERS:
        q_op = q_smem.load(gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=4))
    else:
        q_op = q_smem
    return q_op


@gluon.jit
def kv_head(bh, H, KV_GROUP):
    """The K/V (batch·head) that query (batch·head) bh reads: KV_GROUP query heads share one (grouped-query)."""
    return (bh // H) * (H // KV_GROUP) + (bh % H) // KV_GROUP


@constexpr_function
def sums_on_mma(two_level, ping_pong):
    """Whether a kernel sums P's rows on the tensor cores (row_sums) rather than in its softmax: all but the
    one-warpgroup two-level kernel, which at 255 registers already spills in its loop with the sums' [M, 8]
    accumulator. Decided here once, for attend_rows and for the kernel that allocates the tile of ones."""
    return bool(ping_pong) or not two_level


@gluon.jit
def row_sums(p8, ones_smem, l_acc):
    """Issue the key tile's row sums of P as a product with a tile of ones (m64n8: 1/16 of P·V's tensor work):
    they leave the softmax's instruction stream (~70 of its ~530 per key tile), and the normaliser sums the same
    FP8 P that P·V multiplies. Every column holds the sum. Each tile's sums start from zero and are folded into
    l_acc in FP32 (fold_row_sums): accumulated in place, the tensor cores' FP8 accumulation (FP22) would drop the
    low bits of every addend once the sum is 2^13 times larger than it."""
    return warpgroup_mma(p8, ones_smem.permute((1, 0)), gl.zeros_like(l_acc), use_acc=False, is_async=True)


@gluon.jit
def by_row(factors, rows: gl.constexpr):
    """Per-row factors (one per score row) as a column that scales a tile whose rows are laid out as `rows`."""
    return gl.expand_dims(gl.convert_layout(factors, rows), 1)


@gluon.jit
def fold_row_sums(l_acc, tile_sums, alpha, l_rows: gl.constexpr):
    """l_acc rescaled to the tile's running max, plus the tile's row sums."""
    return l_acc * by_row(alpha, l_rows) + tile_sums


@gluon.jit
def pipeline_step(j, ring0, p_prev, m_i, l_acc, alpha_prev, acc, q_op, k_smem, v_smem, ones_smem, full_bars,
                  consumer, k_desc, v_desc, seed, tile_zero, q_scale, ks_base, bh_kv, v_row0, v_col0, NK, NQ, n_tiles,
                  BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_D: gl.constexpr, STAGES: gl.constexpr,
                  TWO_LEVEL: gl.constexpr, CONSUMERS: gl.constexpr, TURNS: gl.constexpr, LAST: gl.constexpr,
                  MAGIC: gl.constexpr,
                  SUMS_ON_MMA: gl.constexpr, s_layout: gl.constexpr, o_rows: gl.constexpr, l_rows: gl.constexpr,
                  p_layout: gl.constexpr, LAZY_RESCALE: gl.constexpr):
    """Step j ≥ 1 of the pipeline (FlashAttention-3's intra-warpgroup overlap): issue the scores of tile j and
    P·V of tile j-1, run tile j's softmax, then wait for P·V. P crosses steps in FP32 (FP16 in two-level
    ping-pong, to fit 240 registers) and is cast right before its product (carried as bytes, the compiler
    unpacks and repacks it: ~4 instructions per key); nothing asynchronous is in flight across steps.
    Accumulating in place, the accumulator is rescaled to tile j's max after P·V's wait, not as P·V's operand:
    the 64 multiplies leave the ping-pong turn and overlap the other warpgroup's products (bench/NOTES.md,
    "The rescale after P·V's wait").
    SUMS_ON_MMA: P's row sums of tile j-1 are issued with its P·V (row_sums) and l is an [M, 8] accumulator;
    ptxas then places the P·V wait before the softmax's exponentials (bench/NOTES.md, "Row sums on the tensor
    cores"; in ping-pong the other warpgroup's products keep the tensor cores busy meanwhile). Otherwise the
    softmax adds up its row (l: one value per row) and the P·V wait depends on that sum, which keeps the
    softmax under P·V.
    CONSUMERS: 0 in the one-warpgroup kernel, which loads its own tiles; otherwise the ping-pong kernel's
    consumer warpgroups (`consumer` 0 .. CONSUMERS-1), whose ring a producer warp refills (SLOT_BARRIER). With
    TURNS (two warpgroups) they take turns issuing their products (TURN_BARRIER), so that one's softmax runs while
    the other's products occupy the tensor cores; without, each issues its products as soon as its softmax is
    done, and the tensor cores take them in the order they come (bench/NOTES.md, "Ping-pong without turns, …").
    ring0: how many key tiles this program's ring carried before this work item's (persistent ping-pong), which
    sets the ring slot and mbarrier phase of tile j. LAZY_RESCALE: accumulating in place, a warp none of whose
    rows moved its max skips the rescale (rescale_if_moved)."""
    g = ring0 + j  # the tile's position in the ring's sequence
    if CONSUMERS:
        g = g.to(gl.uint32)  # ring0 is not known ≥ 0 there: unsigned, % and // by STAGES stay bit operations
    slot = (g % STAGES).to(gl.int32)
    prev = ((g - 1) % STAGES).to(gl.int32)
    mbarrier.wait(full_bars.index(slot), ((g // STAGES) & 1).to(gl.int32))
    p8 = to_pv_operand(p_prev, BLOCK_M, BLOCK_N, p_layout, v_smem.dtype)
    if CONSUMERS and TURNS:
        named_sync(TURN_BARRIER + consumer, TURN_THREADS, 4)
    s_tok = warpgroup_mma(q_op, k_smem.index(slot).permute((1, 0)), seed, use_acc=MAGIC,
                          is_async=True)
    if TWO_LEVEL:
        # two-level accumulation: the tile's FP8 product lands in its own FP16 registers
        o_tok = warpgroup_mma(p8, pv_operand(v_smem, prev), tile_zero, use_acc=False, is_async=True)
    else:
        o_tok = warpgroup_mma(p8, pv_operand(v_smem, prev), acc, is_async=True)  # rescaled last step
    if SUMS_ON_MMA:
        l_tok = row_sums(p8, ones_smem, l_acc)
    if CONSUMERS and TURNS:
        # the other's turn; consumer 1 arrived once before its first tile, so it skips its last arrive
        named_arrive(TURN_BARRIER + 1 - consumer, TURN_THREADS, (consumer == 0) | (j < n_tiles - 1), 4)
    s_bits = warpgroup_mma_wait(2 if SUMS_ON_MMA else 1, deps=[s_tok])  # P·V (and the row sums) in flight
    p, m_i, alpha = online_softmax(s_bits, m_i, q_scale * gl.load(ks_base + j), NK - j * BLOCK_N, BLOCK_N,
                                   s_layout, LAST, MAGIC)
    if TWO_LEVEL and CONSUMERS:
        p = p.to(gl.float16)  # carried to the next step in half the registers (see to_pv_operand)
    if SUMS_ON_MMA:
        o_tile, l_tile = warpgroup_mma_wait(0, deps=[o_tok, l_tok])
        l_acc = fold_row_sums(l_acc, l_tile, alpha_prev, l_rows)
    else:
        l_acc = l_acc * alpha + gl.sum(p, axis=1)
        # ptxas hoists a wgmma wait to the top of its basic block, which would put this softmax behind P·V:
        # a branch that is always taken (NQ > 0 here) starts a new block after the softmax
        if NQ > 0:
            o_tile, l_acc = warpgroup_mma_wait(0, deps=[o_tok, l_acc])
        else:
            o_tile = warpgroup_mma_wait(0, deps=[o_tok])
    p = carried(p, v_smem.dtype)
    if TWO_LEVEL:
        acc = acc * by_row(alpha_prev, o_rows) + o_tile.to(gl.float32)
    elif LAZY_RESCALE:
        acc = rescale_if_moved(o_tile, by_row(alpha, o_rows))
    else:
        acc = o_tile * by_row(alpha, o_rows)  # to this tile's max, out of the turn
    if CONSUMERS:
        # this warpgroup is done with tile j-1's slot
        named_arrive(SLOT_BARRIER + prev, slot_threads(CONSUMERS), True, 4)
    else:
        # the slot of tile j-1 is free in every warp: refill it, STAGES tiles ahead
        cta_barrier()
        issue_kv_load(k_desc, v_desc, k_smem, v_smem, full_bars, j - 1 + STAGES, prev, bh_kv, v_row0, v_col0, NK,
                      j - 1 + STAGES < n_tiles, BLOCK_N, BLOCK_D)
    return p, m_i, l_acc, alpha, acc


@gluon.jit
def store_output(out, head_out, row0, rows, offs_d, o_mask, stride_on, stride_od, NQ, BLOCK_M: gl.constexpr,
                 BLOCK_D: gl.constexpr, OUT_STORE: gl.constexpr):
    """A warpgroup's output tile (in the P·V accumulator's layout, `rows` and `offs_d` its coordinates, o_mask the
    rows inside the head) into its head's rows at head_out. The accumulator gives each thread pairs of neighbouring
    channels, and ptxas wrote them two bytes at a time: 64 stores a thread at head dim 128, which took ~3 µs of a
    Flux program's ~47 (timestamps in the kernel on the H200, docs/performance.md, "The output's store"). OUT_STORE (the
    launcher's out_store) 2: the tile crosses shared memory into rows of 8 channels a thread and leaves in
    16-byte stores; 1: the pairs in 4-byte stores; 0: as laid out (an output whose rows are not 16-byte aligned).
    The partitions of the ping-pong kernel do not inherit the arguments' alignment: the hints say what the launcher
    checked (contiguous channels, 16-byte aligned rows)."""
    if OUT_STORE == 2:
        rows_of_8: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (BLOCK_D // 8), BLOCK_D // 8], [4, 1], [1, 0])
        st_rows = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, rows_of_8))
        st_cols = gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, rows_of_8))
        ptrs = head_out + gl.expand_dims(st_rows, 1) * stride_on + gl.expand_dims(st_cols, 0) * stride_od
        gl.store(gl.max_contiguous(gl.multiple_of(ptrs, [16, 16]), [1, 8]), gl.convert_layout(out, rows_of_8),
                 mask=gl.expand_dims(st_rows < NQ, 1))
    else:
        ptrs = head_out + gl.expand_dims(rows, 1) * stride_on + gl.expand_dims(offs_d, 0) * stride_od
        if OUT_STORE == 1:
            gl.store(gl.max_contiguous(gl.multiple_of(ptrs, [16, 4]), [1, 2]), out, mask=gl.expand_dims(rows < NQ, 1))
        else:
            gl.store(ptrs, out, mask=o_mask)


@constexpr_function
def scores_layout(BLOCK_N):
    """The scores' accumulator: one warp per 16 query rows, the wgmma spanning the key tile (k = 32 bytes)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 32])


@gluon.jit
def load_q(q_desc, q_bar, q_smem, Q_SCALE, bh, tile_m, NQ, q_groups, live, BLOCK_M: gl.constexpr,
           BLOCK_N: gl.constexpr, BLOCK_D: gl.constexpr, Q_GROUP: gl.constexpr):
    """Issue the TMA of Q's INT8 tile (rows tile_m·BLOCK_M .. of batch·head bh) into q_smem, arriving on q_bar, and
    load its rows' scales (in the scores' row layout), if `live`; otherwise neither (scales of 1). Rows past the
    head's end read the next head's (or TMA's zero fill): their outputs are never stored. With the call's own
    16-bit Q (q_desc's type; quantize_q loads and codes it in attend_rows) nothing is issued, and the scales are
    quantize_q's (ones here)."""
    row0 = tile_m * BLOCK_M
    if live and not is_16bit(q_desc.dtype):
        mbarrier.expect(q_bar, BLOCK_M * BLOCK_D)  # INT8 bytes
        tma_load(q_desc, [bh * NQ + row0, 0], q_bar, q_smem)
    offs_m = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, scores_layout(BLOCK_N)))
    if is_16bit(q_desc.dtype):
        scale = gl.full([BLOCK_M], 1.0, gl.float32, gl.SliceLayout(1, scores_layout(BLOCK_N)))
    else:
        scale = gl.load(Q_SCALE + bh * q_groups + offs_m // Q_GROUP, mask=(offs_m < NQ) & live, other=1.0)
    return scale


@constexpr_function
def q_tile_layout(BLOCK_D):
    """A 16-bit Q tile in registers for its quantization: 8 channels (16 bytes) per thread, a row across
    BLOCK_D // 8 threads of a warp, so that a row's maximum takes a few shuffles and no shared memory."""
    return gl.BlockedLayout([1, 8], [32 // (BLOCK_D // 8), BLOCK_D // 8], [4, 1], [1, 0])


@constexpr_function
def q_codes_layout(BLOCK_M, BLOCK_D):
    """Q's INT8 codes in shared memory, as the scores' wgmma reads them (the layout the launcher gives the TMA
    of codes quantize_kernel made)."""
    return gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_D], gl.int8)


@gluon.jit
def group_max(x, ROWS: gl.constexpr, GROUP: gl.constexpr, rows: gl.constexpr):
    """Each row's value replaced by the largest of its GROUP consecutive rows' ([ROWS] in layout `rows`)."""
    if GROUP > 1:
        by_group = gl.reshape(x, [ROWS // GROUP, GROUP])
        wide, _ = gl.broadcast(gl.expand_dims(gl.max(by_group, axis=1), 1), by_group)
        x = gl.convert_layout(gl.reshape(wide, [ROWS]), rows)
    return x


@gluon.jit
def quantize_q(Q_HEAD, stride_qn, row0, NQ, q_smem, multiplier, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
               BLOCK_D: gl.constexpr, Q_GROUP: gl.constexpr):
    """INT8 codes of rows row0 .. row0+BLOCK_M of a head's 16-bit Q (Q_HEAD: its first row; channels contiguous,
    rows stride_qn apart; rows past NQ read as zeros) times `multiplier` into q_smem, one scale per Q_GROUP rows;
    returns the rows' scales in the scores' row layout. The tile is loaded straight into registers, 16 bytes a
    thread: staged in shared memory by TMA it took 33 KB more of it (the kernel ran 14-32% slower, bench/NOTES.md,
    "Q coded inside the attention kernel, …"). The same arithmetic as quantize_kernel's Q role
    (quant_kernels.quantize_int8_role with quantize_rows_int8): the same codes and scales, bit for bit, a group
    holding NaN or Inf scaled NaN (the guard then recomputes its rows). Coded here, Q costs no pass of its own:
    its 16-bit tile is read once, by this program, instead of read, written as codes and read again."""
    layout: gl.constexpr = q_tile_layout(BLOCK_D)
    rows: gl.constexpr = gl.SliceLayout(1, layout)
    offs_m = row0 + gl.arange(0, BLOCK_M, layout=rows)
    offs_d = gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, layout))
    ptrs = Q_HEAD + gl.expand_dims(offs_m, 1) * stride_qn + gl.expand_dims(offs_d, 0)
    x = gl.load(ptrs, mask=gl.expand_dims(offs_m < NQ, 1), other=0.0).to(gl.float32) * multiplier
    amax = group_max(gl.max(gl.abs(x), axis=1), BLOCK_M, Q_GROUP, rows)
    has_nan = group_max(gl.max(gl.where(x == x, 0.0, 1.0), axis=1), BLOCK_M, Q_GROUP, rows)
    scale = gl.where(has_nan > 0, float("nan"), gl.maximum(amax, 1e-30) / 127.0)
    # one correctly rounded division per row, as quant_kernels.reciprocal (Gluon's `/` is an approximate one)
    y = x * gl.expand_dims(gl.div_rn(gl.full_like(scale, 1.0), scale), 1)
    q_smem.store(gl.where(y >= 0, y + 0.5, y - 0.5).to(gl.int8))  # rounded half away from zero
    fence_async_shared()  # the generic-proxy stores, before the tensor cores read them
    cta_barrier()  # every warp's rows, before the warpgroup's first product
    return gl.convert_layout(scale, gl.SliceLayout(1, scores_layout(BLOCK_N)))


@gluon.jit
def attend_rows(tile_m, bh, ring0, q_phase, q_scale, next_bh, next_tile_m, q_desc, k_desc, v_desc, q_smem,
                q_bar, k_smem, v_smem, full_bars, ones_smem, consumer, Q_SCALE, K_SCALE, V_SCALE, V_SHIFT,
                OUT, LSE, BAD, stride_ob, stride_oh, stride_on, stride_od, H, KV_GROUP, NQ, NK, q_groups, k_groups,
                t0, t1, part, PART_O, PART_LSE, q_multiplier, Q, stride_qb, stride_qh, stride_qn,
                BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                BLOCK_D: gl.constexpr, Q_GROUP: gl.constexpr, STAGES: gl.constexpr, TWO_LEVEL: gl.constexpr,
                CONSUMERS: gl.constexpr, TURNS: gl.constexpr, SHIFT_V: gl.constexpr, RETURN_LSE: gl.constexpr,
                MAGIC: gl.constexpr,
                LAZY_RESCALE: gl.constexpr, OUT_STORE: gl.constexpr, NEXT_Q: gl.constexpr, Q_REGS: gl.constexpr):
    """One warpgroup's work: query rows tile_m·BLOCK_M .. +BLOCK_M of (batch·head) bh against key tiles
    t0 .. t1-1, then the output, its rows' non-finite flags and the LSE; or, for a part of a split work item
    (part ≥ 0, the grid's tail: see work_item), the part's normalised output in FP32 and its base-2 LSE at
    partial `part` (PART_O, PART_LSE), which tail_merge_kernel joins. ring0: key tiles the ring carried before
    these (their slots and phases go on from there); q_phase: the phase of q_bar for this Q tile, whose load the
    caller issued (load_q), q_scale its rows' scales. With a 16-bit q_desc the call's Q (Q, its batch, head and
    row strides) is loaded and coded into q_smem here, with q_multiplier, and its scales are the ones quantize_q
    gives. NEXT_Q (the persistent kernel): once the
    last scores are in, the load of this warpgroup's next Q tile (next_tile_m of next_bh; none if next_bh < 0) is
    issued into q_smem, so that it lands while this item finishes; returns that tile's scales."""
    # one warp per 16 query rows; the scores' wgmma spans the key tile, P·V's the head dim (k = 32 bytes)
    PV_K: gl.constexpr = mma_k(v_smem.dtype)
    s_layout: gl.constexpr = scores_layout(BLOCK_N)
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_D, PV_K])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=PV_K // 8)
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    o_cols: gl.constexpr = gl.SliceLayout(0, o_layout)
    # P's row sums: P (the same registers as P·V's A operand) times an 8-column tile of ones
    l_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, 8, PV_K])
    l_rows: gl.constexpr = gl.SliceLayout(1, l_layout)
    SUMS_ON_MMA: gl.constexpr = sums_on_mma(TWO_LEVEL, CONSUMERS)

    b = bh // H
    h = bh % H
    bh_kv = kv_head(bh, H, KV_GROUP)
    v_row0, v_col0 = v_origin(v_desc, bh_kv, H // KV_GROUP, BLOCK_D)
    n_tiles = t1 - t0
    # the keys from tile t0 on: the softmax masks what lies past NK (the one-warpgroup kernel, which also loads
    # its own tiles with it, always starts at tile 0)
    nk_left = NK - t0 * BLOCK_N
    row0 = tile_m * BLOCK_M

    offs_m = row0 + gl.arange(0, BLOCK_M, layout=s_rows)
    ks_base = K_SCALE + bh_kv * k_groups + t0
    seed = gl.full([BLOCK_M, BLOCK_N], MAGIC_I2F_BITS if MAGIC else 0, gl.int32, s_layout)
    # two-level: each tile's P·V in an FP16 accumulator (half the registers of FP32), folded into FP32
    tile_zero = gl.zeros([BLOCK_M, BLOCK_D], gl.float16, o_layout)

    # tile 0: its scores and softmax, with nothing to overlap yet (masked: it may be the last)
    if is_16bit(q_desc.dtype):
        q_head = Q + b.to(gl.int64) * stride_qb + h.to(gl.int64) * stride_qh
        q_scale = quantize_q(q_head, stride_qn, row0, NQ, q_smem, q_multiplier, BLOCK_M, BLOCK_N, BLOCK_D, Q_GROUP)
    else:
        mbarrier.wait(q_bar, q_phase)
    q_op = scores_operand(q_smem, s_layout, Q_REGS)
    mbarrier.wait(full_bars.index(ring0 % STAGES), (ring0 // STAGES) & 1)
    if CONSUMERS and TURNS:
        named_arrive(TURN_BARRIER, TURN_THREADS, consumer == 1, 4)  # consumer 0 goes first
        named_sync(TURN_BARRIER + consumer, TURN_THREADS, 4)
    s_tok = warpgroup_mma(q_op, k_smem.index(ring0 % STAGES).permute((1, 0)), seed, use_acc=MAGIC,
                          is_async=True)
    if CONSUMERS and TURNS:
        named_arrive(TURN_BARRIER + 1 - consumer, TURN_THREADS, (consumer == 0) | (n_tiles > 1), 4)
    s_bits = warpgroup_mma_wait(0, deps=[s_tok])
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, s_rows)
    p, m_i, alpha = online_softmax(s_bits, m_i, q_scale * gl.load(ks_base), nk_left, BLOCK_N, s_layout, True,
                                   MAGIC)
    if SUMS_ON_MMA:
        l_acc = gl.zeros([BLOCK_M, 8], gl.float32, l_layout)  # tile 0's sums are issued with its P·V
    else:
        l_acc = gl.sum(p, axis=1)
    if TWO_LEVEL and CONSUMERS:
        p = p.to(gl.float16)  # carried to the next step in half the registers (see to_pv_operand)
    p = carried(p, v_smem.dtype)
    acc = gl.zeros([BLOCK_M, BLOCK_D], gl.float32, o_layout)
    for j in range(1, n_tiles - 1):
        p, m_i, l_acc, alpha, acc = pipeline_step(
            j, ring0, p, m_i, l_acc, alpha, acc, q_op, k_smem, v_smem, ones_smem, full_bars, consumer, k_desc,
            v_desc, seed, tile_zero, q_scale, ks_base, bh_kv, v_row0, v_col0, nk_left, NQ, n_tiles, BLOCK_M, BLOCK_N,
            BLOCK_D, STAGES, TWO_LEVEL, CONSUMERS, TURNS, False, MAGIC, SUMS_ON_MMA, s_layout, o_rows, l_rows, p_layout,
            LAZY_RESCALE)
    if n_tiles > 1:
        p, m_i, l_acc, alpha, acc = pipeline_step(
            n_tiles - 1, ring0, p, m_i, l_acc, alpha, acc, q_op, k_smem, v_smem, ones_smem, full_bars, consumer,
            k_desc, v_desc, seed, tile_zero, q_scale, ks_base, bh_kv, v_row0, v_col0, nk_left, NQ, n_tiles, BLOCK_M,
            BLOCK_N, BLOCK_D, STAGES, TWO_LEVEL, CONSUMERS, TURNS, True, MAGIC, SUMS_ON_MMA, s_layout, o_rows, l_rows,
            p_layout, LAZY_RESCALE)
    if NEXT_Q:  # every product that reads Q's tile is done: the next one may land in its place
        next_scale = load_q(q_desc, q_bar, q_smem, Q_SCALE, next_bh, next_tile_m, NQ, q_groups, next_bh >= 0,
                            BLOCK_M, BLOCK_N, BLOCK_D, Q_GROUP)
    else:
        next_scale = q_scale
    # P·V of the last tile
    p8 = to_pv_operand(p, BLOCK_M, BLOCK_N, p_layout, v_smem.dtype)
    last_slot = (ring0 + n_tiles - 1) % STAGES
    v_last = pv_operand(v_smem, last_slot)
    if TWO_LEVEL:
        o_tok = warpgroup_mma(p8, v_last, tile_zero, use_acc=False, is_async=True)
    else:
        o_tok = warpgroup_mma(p8, v_last, acc, is_async=True)  # rescaled in the last step (zero if none)
    if SUMS_ON_MMA:
        l_tok = row_sums(p8, ones_smem, l_acc)
    # the output's per-channel vectors, loaded while the last products run (after their wait, their latency
    # was the epilogue's)
    offs_d = gl.arange(0, BLOCK_D, layout=o_cols)
    if not is_16bit(v_smem.dtype):
        v_scale = gl.load(V_SCALE + bh_kv * BLOCK_D + offs_d)
    if SHIFT_V:
        v_shift = gl.load(V_SHIFT + bh_kv * BLOCK_D + offs_d)
    if SUMS_ON_MMA:
        o_tile, l_tile = warpgroup_mma_wait(0, deps=[o_tok, l_tok])
        l_i = gl.max(fold_row_sums(l_acc, l_tile, alpha, l_rows), axis=1)  # every column holds the sum
    else:
        o_tile = warpgroup_mma_wait(0, deps=[o_tok])
        l_i = l_acc
    if TWO_LEVEL:
        acc = acc * by_row(alpha, o_rows) + o_tile.to(gl.float32)
    else:
        acc = o_tile
    if CONSUMERS:
        # the producer may refill it (next item)
        named_arrive(SLOT_BARRIER + last_slot, slot_threads(CONSUMERS), True, 4)

    out = acc * gl.expand_dims(gl.convert_layout(1.0 / l_i, o_rows), 1)
    if not is_16bit(v_smem.dtype):  # FP8 codes: back to V's units
        out = out * gl.expand_dims(v_scale, 0)
    if SHIFT_V:
        out = out + gl.expand_dims(v_shift, 0)
    if part >= 0:
        # a part of a split work item: its output over its keys, normalised, and its LSE in the scores' base-2
        # units (see online_softmax), for tail_merge_kernel to join (which writes the rows' non-finite flags)
        part_row0 = (CONSUMERS * part + consumer) * BLOCK_M  # this warpgroup's rows among the partials
        part_rows = part_row0 + gl.arange(0, BLOCK_M, layout=o_rows)
        gl.store(PART_O + gl.expand_dims(part_rows, 1) * BLOCK_D + gl.expand_dims(offs_d, 0), out)
        gl.store(PART_LSE + part_row0 + gl.arange(0, BLOCK_M, layout=s_rows),
                 m_i + gl.convert_layout(gl.log2(l_i), s_rows))
    else:
        rows = row0 + gl.arange(0, BLOCK_M, layout=o_rows)
        o_mask = gl.expand_dims(rows < NQ, 1) & gl.expand_dims(offs_d < BLOCK_D, 0)
        store_output(out.to(OUT.dtype.element_ty), OUT + b * stride_ob + h * stride_oh, row0, rows, offs_d, o_mask,
                     stride_on, stride_od, NQ, BLOCK_M, BLOCK_D, OUT_STORE)
        # a flag per row: its sum stays within the four threads that hold the row (one per tile cost ~0.7 µs of
        # a Flux program, a reduction across the warpgroup's warps through shared memory)
        row_bad = gl.sum(gl.where(gl.abs(out) < float("inf"), 0, 1), axis=1)
        gl.store(BAD + bh * NQ + rows, (row_bad > 0).to(gl.int8), mask=rows < NQ)
        if RETURN_LSE:
            lse = (m_i + gl.convert_layout(gl.log2(l_i), s_rows) - LOG2_FP8_MAX) * 0.6931471805599453
            gl.store(LSE + bh * NQ + offs_m, lse, mask=offs_m < NQ)
    return next_scale


@gluon.jit
def ones_tile(v_desc, BLOCK_N: gl.constexpr):
    """8 rows of BLOCK_N ones in V's P·V type in shared memory: the B operand of row_sums (as V is P·V's)."""
    fill: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [1, 4], [1, 0])
    if is_16bit(v_desc.dtype):
        ones_smem = gl.allocate_shared_memory(v_desc.dtype, [8, BLOCK_N], V16_SHARED)
        ones_smem.store(gl.full([8, BLOCK_N], 1.0, v_desc.dtype, fill))
    else:
        ones_smem = gl.allocate_shared_memory(gl.float8e4nv, [8, BLOCK_N], v_desc.layout)
        # 0x38 is 1.0 in e4m3, written as bytes: no conversion
        ones_smem.store(gl.full([8, BLOCK_N], 0x38, gl.int8, fill).to(gl.float8e4nv, bitcast=True))
    fence_async_shared()  # the generic-proxy stores, before the tensor cores read them
    cta_barrier()  # every warp's rows, before any warp's product
    return ones_smem


@gluon.jit
def v_ring(v_desc, STAGES: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_D: gl.constexpr):
    """The ring's V slots: FP8 codes [head dim, keys], or a 16-bit V's tiles [keys, head dim] (v_desc's block)."""
    if is_16bit(v_desc.dtype):
        # the swizzle of v_desc's [1, 1, BLOCK_N, BLOCK_D] tiles, in two dimensions for the wgmma
        ring = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BLOCK_N, BLOCK_D], V16_SHARED)
    else:
        ring = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_D, BLOCK_N], v_desc.layout)
    return ring


@gluon.jit
def q_tiles(q_desc, CONSUMERS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_D: gl.constexpr):
    """Each consumer's Q codes, as TMA lands them and the scores read them; with a 16-bit q_desc (quantize_q codes
    the call's Q in the kernel) in the layout the codes' TMA would have given."""
    if is_16bit(q_desc.dtype):
        layout: gl.constexpr = q_codes_layout(BLOCK_M, BLOCK_D)
    else:
        layout: gl.constexpr = q_desc.layout
    return gl.allocate_shared_memory(gl.int8, [CONSUMERS, BLOCK_M, BLOCK_D], layout)


@gluon.jit
def ring_barriers(STAGES: gl.constexpr):
    """A `full` mbarrier (the TMA of the tile has landed) for each ring slot."""
    full_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(full_bars.index(s), count=1)
    return full_bars


@gluon.jit
def sage_fwd_sm90_kernel(
    q_desc, k_desc, v_desc, Q_SCALE, K_SCALE, V_SCALE, V_SHIFT, OUT, LSE, BAD,
    stride_ob, stride_oh, stride_on, stride_od,
    H, KV_GROUP, NQ, NK, q_groups, k_groups,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_D: gl.constexpr, Q_GROUP: gl.constexpr,
    STAGES: gl.constexpr, TWO_LEVEL: gl.constexpr, SHIFT_V: gl.constexpr, RETURN_LSE: gl.constexpr,
    MAGIC: gl.constexpr, OUT_STORE: gl.constexpr,
):
    """One warpgroup per program, BLOCK_M = 64 query rows; it issues its own TMA loads STAGES tiles ahead."""
    k_smem = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, BLOCK_D], k_desc.layout)
    v_smem = v_ring(v_desc, STAGES, BLOCK_N, BLOCK_D)
    q_smem = gl.allocate_shared_memory(gl.int8, [BLOCK_M, BLOCK_D], q_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    full_bars = ring_barriers(STAGES)
    bh_kv = kv_head(gl.program_id(1), H, KV_GROUP)
    v_row0, v_col0 = v_origin(v_desc, bh_kv, H // KV_GROUP, BLOCK_D)
    n_tiles = (NK + BLOCK_N - 1) // BLOCK_N
    for s in gl.static_range(STAGES):
        issue_kv_load(k_desc, v_desc, k_smem, v_smem, full_bars, s, s, bh_kv, v_row0, v_col0, NK, s < n_tiles,
                      BLOCK_N, BLOCK_D)
    if sums_on_mma(TWO_LEVEL, False):
        ones_smem = ones_tile(v_desc, BLOCK_N)
    else:
        ones_smem = q_smem  # a placeholder, never read: P's rows are summed in the softmax
    q_scale = load_q(q_desc, q_bar, q_smem, Q_SCALE, gl.program_id(1), gl.program_id(0), NQ, q_groups, True,
                     BLOCK_M, BLOCK_N, BLOCK_D, Q_GROUP)
    attend_rows(gl.program_id(0), gl.program_id(1), 0, 0, q_scale, -1, 0, q_desc, k_desc, v_desc, q_smem, q_bar,
                k_smem, v_smem, full_bars, ones_smem, 0, Q_SCALE, K_SCALE, V_SCALE, V_SHIFT, OUT, LSE, BAD,
                stride_ob, stride_oh, stride_on, stride_od, H, KV_GROUP, NQ, NK, q_groups, k_groups, 0, n_tiles, -1,
                OUT, LSE, 1.0, Q_SCALE, 0, 0, 0, BLOCK_M, BLOCK_N, BLOCK_D, Q_GROUP, STAGES, TWO_LEVEL,
                0, False, SHIFT_V, RETURN_LSE, MAGIC, False, OUT_STORE, False, False)


@gluon.jit
def work_items(n_items, PERSISTENT: gl.constexpr):
    """This program's work items (groups of query tiles of one batch·head, one per consumer), as a range:
    persistent, the items pid, pid + grid, ... of all n_items, in head order so that the programs at work at once
    share heads' K and V in L2; otherwise one item, the program's grid position."""
    if PERSISTENT:
        return gl.program_id(0), n_items, gl.num_programs(0)
    return 0, 1, 1


@gluon.jit
def work_item(i, n_items, n_tiles, whole, splits, PERSISTENT: gl.constexpr):
    """Work item i as (its index within its batch·head, batch·head, first key tile, end key tile, part); n_items:
    work items per batch·head (groups of the ping-pong kernel's query tiles, one per consumer warpgroup).
    Persistent: item i, all its keys, part -1. Otherwise the grid is 1-D: programs 0 .. whole-1 are items
    0 .. whole-1 whole, and the rest split each later item's key tiles into `splits` ranges, one program each,
    `part` numbering them from 0 (hopper_launch.tail_split: the grid's part-full last wave, done in pieces that
    fill it better)."""
    if PERSISTENT:
        # part -1, made from the grid's arguments: with a constant there (the split's arguments and buffers then
        # unused) Triton 3.6's lowering to LLVM failed on this kernel
        return i % n_items, i // n_items, 0, n_tiles, gl.minimum(whole * splits, 0) - 1
    pid = gl.program_id(0)
    tail = (pid >= whole).to(gl.int32)
    r = gl.maximum(pid - whole, 0)  # the program's place among the split ones (0 for the whole ones)
    item = pid + tail * (r // splits - r)
    s = r % splits
    t0 = tail * (s * n_tiles // splits)
    t1 = n_tiles - tail * (n_tiles - (s + 1) * n_tiles // splits)
    return item % n_items, item // n_items, t0, t1, tail * (r + 1) - 1


@gluon.jit
def consume(meta: gl.constexpr, consumer, q_smem, q_bar, q_desc, k_desc, v_desc, k_smem, v_smem,
            full_bars, ones_smem, Q_SCALE, K_SCALE, V_SCALE, V_SHIFT, OUT, LSE, BAD, PART_O, PART_LSE,
            stride_ob, stride_oh, stride_on, stride_od, H, KV_GROUP, NQ, NK, q_groups, k_groups, n_q_tiles, BH, whole,
            splits, q_multiplier, Q, stride_qb, stride_qh, stride_qn):
    """A consumer warpgroup of the ping-pong kernel (meta: the kernel's constants, in its argument order):
    query tile CONSUMERS·item + consumer of each of its program's work items."""
    CONSUMERS: gl.constexpr = meta[11]
    PERSISTENT: gl.constexpr = meta[9]
    n_tiles = (NK + meta[1] - 1) // meta[1]
    n_items = (n_q_tiles + CONSUMERS - 1) // CONSUMERS
    first, end, step = work_items(n_items * BH, PERSISTENT)
    # Q's tile of the first item; persistent, each item issues the next one's (attend_rows, NEXT_Q): a program's
    # Q then waits ~1 µs at its first item only (bench/NOTES.md, "A program's fixed cost, …")
    item, bh, _, _, _ = work_item(first, n_items, n_tiles, whole, splits, PERSISTENT)
    q_scale = load_q(q_desc, q_bar, q_smem, Q_SCALE, bh, CONSUMERS * item + consumer, NQ, q_groups, True, meta[0],
                     meta[1], meta[2], meta[3])
    for i in range(first, end, step):
        done = (i - first) // step  # work items this warpgroup finished before (persistent: each of all keys)
        item, bh, t0, t1, part = work_item(i, n_items, n_tiles, whole, splits, PERSISTENT)
        next_item, next_bh, _, _, _ = work_item(i + step, n_items, n_tiles, whole, splits, PERSISTENT)
        q_scale = attend_rows(
            CONSUMERS * item + consumer, bh, done * n_tiles, done & 1, q_scale, gl.where(i + step < end, next_bh, -1),
            CONSUMERS * next_item + consumer, q_desc, k_desc, v_desc, q_smem, q_bar, k_smem, v_smem,
            full_bars, ones_smem, consumer, Q_SCALE, K_SCALE, V_SCALE, V_SHIFT, OUT, LSE, BAD, stride_ob, stride_oh,
            stride_on, stride_od, H, KV_GROUP, NQ, NK, q_groups, k_groups, t0, t1, part, PART_O, PART_LSE,
            q_multiplier, Q, stride_qb, stride_qh, stride_qn, meta[0],
            meta[1], meta[2], meta[3], meta[4], meta[5], CONSUMERS, meta[10], meta[6], meta[7], meta[8], meta[12],
            meta[13], PERSISTENT, meta[14])


@gluon.jit
def load_kv_ring(k_desc, v_desc, k_smem, v_smem, full_bars, H, KV_GROUP, NK, n_q_tiles, BH, whole, splits,
                 meta: gl.constexpr):
    """The producer warp: every key tile of each work item's head into the ring, a slot as soon as every
    consumer warpgroup is done with the tile it held (for the next work item's tiles while the consumers finish
    the last ones and write their outputs). The consumers free every tile; the producer waits for each of those
    freeings, the last ones after its loop, so that no named barrier is left half-arrived when the program ends."""
    BLOCK_N: gl.constexpr = meta[1]
    BLOCK_D: gl.constexpr = meta[2]
    STAGES: gl.constexpr = meta[4]
    CONSUMERS: gl.constexpr = meta[11]
    gl.static_assert(SLOT_BARRIER + STAGES <= 16, "a ring this deep has no hardware barrier left for its slots")
    n_tiles = (NK + BLOCK_N - 1) // BLOCK_N
    n_items = (n_q_tiles + CONSUMERS - 1) // CONSUMERS
    first, end, step = work_items(n_items * BH, meta[9])
    ring0 = 0
    for i in range(first, end, step):
        _, bh, t0, t1, _ = work_item(i, n_items, n_tiles, whole, splits, meta[9])
        bh_kv = kv_head(bh, H, KV_GROUP)
        v_row0, v_col0 = v_origin(v_desc, bh_kv, H // KV_GROUP, BLOCK_D)
        for t in range(t0, t1):
            g = ring0 + t - t0  # the tile's position in the ring's sequence
            s = g % STAGES
            if g >= STAGES:
                named_sync(SLOT_BARRIER + s, slot_threads(CONSUMERS), 1)
            issue_kv_load(k_desc, v_desc, k_smem, v_smem, full_bars, t, s, bh_kv, v_row0, v_col0, NK, True, BLOCK_N,
                          BLOCK_D)
        ring0 += t1 - t0
    for t in range(gl.maximum(ring0 - STAGES, 0), ring0):
        named_sync(SLOT_BARRIER + t % STAGES, slot_threads(CONSUMERS), 1)


@gluon.jit
def sage_fwd_sm90_pingpong_kernel(
    q_desc, k_desc, v_desc, Q_SCALE, K_SCALE, V_SCALE, V_SHIFT, OUT, LSE, BAD, PART_O, PART_LSE,
    stride_ob, stride_oh, stride_on, stride_od,
    H, KV_GROUP, NQ, NK, q_groups, k_groups, n_q_tiles, BH, whole, splits, q_multiplier, Q, stride_qb, stride_qh,
    stride_qn,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_D: gl.constexpr, Q_GROUP: gl.constexpr,
    STAGES: gl.constexpr, TWO_LEVEL: gl.constexpr, SHIFT_V: gl.constexpr, RETURN_LSE: gl.constexpr,
    MAGIC: gl.constexpr, CONSUMERS: gl.constexpr, CONSUMER_REGS: gl.constexpr, PERSISTENT: gl.constexpr,
    TURNS: gl.constexpr, LAZY_RESCALE: gl.constexpr, OUT_STORE: gl.constexpr, Q_REGS: gl.constexpr,
):
    """CONSUMERS consumer warpgroups (query tiles CONSUMERS·item + c of BLOCK_M rows) sharing one K/V ring that a
    producer warp fills; two of them take turns at the tensor cores (FlashAttention-3's ping-pong schedule).
    Three (no turns, 160 registers a thread) read each K/V tile for 192 query rows, as FlashAttention-3 does at
    head dim 64, where they measured 5-7% faster than the one-warpgroup kernel: its 12 consumer warps per
    multiprocessor with a shorter loop, the producer warp issuing the loads (bench/NOTES.md, "Three consumer
    warpgroups at head dim 64, …").
    PERSISTENT: a grid of at most one program per multiprocessor, each looping over work items (groups of
    CONSUMERS query tiles of one batch·head; see work_items): the producer loads the next item's first key tiles
    while the consumers finish the last ones and store their outputs, and each consumer's next Q tile is on its
    way as soon as its last scores are in (attend_rows, NEXT_Q). Otherwise one program per item, or per part
    of an item for the last (BH·items - whole) items, split in `splits` key ranges (work_item); 1-D grid.
    TURNS: the two warpgroups take turns at the tensor cores; False lets each issue whenever its softmax is done
    (on the H200 faster at 4.6k to 16k and at 118k tokens, slower at Wan2.1's 32k: bench/NOTES.md, "Ping-pong
    without turns, …"). LAZY_RESCALE: see rescale_if_moved. Q_REGS: Q's codes are read into registers once per
    work item (scores_operand), else from shared memory by every Q·Kᵀ (hopper_launch.q_in_registers decides)."""
    k_smem = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, BLOCK_D], k_desc.layout)
    v_smem = v_ring(v_desc, STAGES, BLOCK_N, BLOCK_D)
    gl.static_assert(CONSUMERS == 2 or (CONSUMERS == 3 and not TURNS), "turns are taken by two warpgroups")
    q_smem = q_tiles(q_desc, CONSUMERS, BLOCK_M, BLOCK_D)
    q_bars = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout())
    for c in gl.static_range(CONSUMERS):
        mbarrier.init(q_bars.index(c), count=1)
    full_bars = ring_barriers(STAGES)
    # compile-time values cross into partitions only inside a constexpr tuple (elements of a plain tuple are
    # turned into tensors)
    meta: gl.constexpr = (BLOCK_M, BLOCK_N, BLOCK_D, Q_GROUP, STAGES, TWO_LEVEL, SHIFT_V, RETURN_LSE, MAGIC,
                          PERSISTENT, TURNS, CONSUMERS, LAZY_RESCALE, OUT_STORE, Q_REGS)
    runtime = (q_desc, k_desc, v_desc, k_smem, v_smem, full_bars, ones_tile(v_desc, BLOCK_N))
    scalars = (Q_SCALE, K_SCALE, V_SCALE, V_SHIFT, OUT, LSE, BAD, PART_O, PART_LSE, stride_ob, stride_oh,
               stride_on, stride_od, H, KV_GROUP, NQ, NK, q_groups, k_groups, n_q_tiles, BH, whole, splits,
               q_multiplier, Q, stride_qb, stride_qh, stride_qn)
    # (neither a partition's function nor a tuple holding `meta` can be held in a variable: each list is written out)
    if CONSUMERS == 2:
        gl.warp_specialize([
            (consume, (meta, 0, q_smem.index(0), q_bars.index(0)) + runtime + scalars),
            (consume, (meta, 1, q_smem.index(1), q_bars.index(1)) + runtime + scalars),
            (load_kv_ring, (k_desc, v_desc, k_smem, v_smem, full_bars, H, KV_GROUP, NK, n_q_tiles, BH, whole,
                            splits, meta)),
        ], [4, 1], [CONSUMER_REGS, 24])
    else:
        gl.warp_specialize([
            (consume, (meta, 0, q_smem.index(0), q_bars.index(0)) + runtime + scalars),
            (consume, (meta, 1, q_smem.index(1), q_bars.index(1)) + runtime + scalars),
            (consume, (meta, 2, q_smem.index(2), q_bars.index(2)) + runtime + scalars),
            (load_kv_ring, (k_desc, v_desc, k_smem, v_smem, full_bars, H, KV_GROUP, NK, n_q_tiles, BH, whole,
                            splits, meta)),
        ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, 24])
