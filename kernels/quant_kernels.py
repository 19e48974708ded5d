"""Triton quantization kernels (device code only; launchers live in kernels/launch.py).

All kernels read a [B, H, N, D] tensor through explicit strides, so NHD, HND and non-contiguous
views need no copy. Rounding is half away from zero, the same as sage_core/reference.py.
"""
import triton
import triton.language as tl

from .rotary import rotated

FP8_E4M3_MAX = tl.constexpr(448.0)


@triton.jit
def nan_max(a, b):
    """The larger of a and b, NaN where either is NaN (one FMNMX.NAN): a group's absolute maximum carries its NaN
    to the scale without a NaN test of its own per element."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def nan_min(a, b):
    """The smaller of a and b, NaN where either is NaN (nan_max's partner)."""
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def range_step(a, b, MIN: tl.constexpr, PAIRS: tl.constexpr):
    """The elementwise maximum (or with MIN minimum) of a and b in their own dtype, NaN where either is NaN. With
    PAIRS (BF16 or FP16 tiles on the GPU) two elements an instruction (max.NaN.bf16x2 and its kin, sm80 on): Triton
    widens a 16-bit maximum to FP32, a conversion per element and one instruction per element more."""
    if PAIRS:
        OP: tl.constexpr = "min" if MIN else "max"
        TYPE: tl.constexpr = "bf16x2" if a.dtype == tl.bfloat16 else "f16x2"
        return tl.inline_asm_elementwise(OP + ".NaN." + TYPE + " $0, $1, $2;", "=r,r,r", [a, b], dtype=a.dtype,
                                         is_pure=True, pack=2)
    elif MIN:
        return nan_min(a, b)
    else:
        return nan_max(a, b)


@triton.jit
def abs_max(x, axis, EXPLICIT_NAN: tl.constexpr):
    """The absolute maximum of x along axis (all of it with None), NaN where x holds a NaN. On the GPU one
    FMNMX.NAN per element (nan_max). Triton's interpreter runs a reduction with a combine function of its own some
    ten times slower than its own maximum, so there (EXPLICIT_NAN) it is the plain maximum and a NaN test: the same
    value."""
    if EXPLICIT_NAN:
        return tl.where(tl.max(tl.where(x == x, 0.0, 1.0), axis=axis) > 0, float("nan"), tl.max(tl.abs(x), axis=axis))
    else:
        return tl.reduce(tl.abs(x), axis, nan_max)


@triton.jit
def widened(raw, INLINE_PTX: tl.constexpr):
    """A loaded tile as FP32. With INLINE_PTX a BF16 pair widens in two instructions (a shift and a mask): the
    compiler's own widening took three, a byte permute and a multiply for the pair's upper half."""
    if INLINE_PTX and raw.dtype == tl.bfloat16:
        # two elements an instance: $2 holds the pair, element 0 in its lower half
        return tl.inline_asm_elementwise("{ shl.b32 $0, $2, 16; and.b32 $1, $2, 0xffff0000; }", "=r,=r,r", [raw],
                                         dtype=tl.float32, is_pure=True, pack=2)
    else:
        return raw.to(tl.float32)


@triton.jit
def int8_codes(x, r, INLINE_PTX: tl.constexpr, SIGN_FROM_X: tl.constexpr):
    """INT8 codes of x * r (r > 0, a group's reciprocal scale), rounded half away from zero by truncating
    x * r ± 0.5, the ±0.5 taking the product's sign by a bit operation (copysign) where a compare and a select
    took two; on the GPU the add still fuses with the product into one FMA, so the codes are those of the test.
    With the NaN test abs_max replaces, Q's coding loop went from 1020 to 729 instructions on sm90 (bench/NOTES.md,
    round "Fewer instructions per coded element, …"). With SIGN_FROM_X the sign is x's own (x * r has it, r > 0):
    the product is then only the FMA's, one instruction fewer an element (Q's loop 545 instead of 608 on sm90), but
    uncapped Triton 3.9's ptxas gave the launch 195 registers on sm100 instead of 128, so the launches take it under
    QUANT_MAX_REGISTERS's cap only (launch.sign_from_x). With INLINE_PTX four codes are truncated and packed into
    one register by two saturating packs (cvt.pack.sat.s8): the compiler's narrowing took a mask per code and three
    byte permutes for four (the values never leave [-127.5, 127.5], so saturation changes nothing)."""
    y = x * r
    sign_of = x if SIGN_FROM_X else y  # the same sign: an underflow to 0 keeps it
    half = ((sign_of.to(tl.uint32, bitcast=True) & 0x80000000) | 0x3F000000).to(tl.float32, bitcast=True)
    if INLINE_PTX:
        # four elements an instance: $1..$4 the values, $0 their codes, element 0 in the lowest byte
        return tl.inline_asm_elementwise(
            "{ .reg .s32 c0, c1, c2, c3, hi; cvt.rzi.s32.f32 c0, $1; cvt.rzi.s32.f32 c1, $2; cvt.rzi.s32.f32 c2, $3; "
            "cvt.rzi.s32.f32 c3, $4; cvt.pack.sat.s8.s32.b32 hi, c3, c2, c3; cvt.pack.sat.s8.s32.b32 $0, c1, c0, hi; }",
            "=r,r,r,r,r", [y + half], dtype=tl.int8, is_pure=True, pack=4)
    else:
        return (y + half).to(tl.int8)


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
def in_bounds(offs_n, offs_d, N, D):
    """Which elements of a [rows, channels] tile lie inside an [N, D] head."""
    return (offs_n[:, None] < N) & (offs_d[None, :] < D)


@triton.jit
def load_raw(X, b, h, offs_n, offs_d, stride_b, stride_h, stride_n, stride_d, N, D):
    """A [rows, BLOCK_D] tile of a strided [B, H, N, D] tensor in its own dtype, zero outside it. Nothing waits
    for the load until its value is used, and ptxas leaves loads where Triton emits them, each right before its
    first use: so the loops below load their next tile before they use this one (two tiles' reads in flight
    instead of one), and K's and V's programs issue their first load before they finish the statistics (measured
    on the H200: the quantization 22% faster at Flux's and Wan2.1's shapes; bench/NOTES.md, "Loads issued
    ahead")."""
    valid = in_bounds(offs_n, offs_d, N, D)
    ptrs = X + b * stride_b + h * stride_h + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d
    return tl.load(ptrs, mask=valid, other=0.0)


@triton.jit
def reciprocal(scale):
    """1 / scale, correctly rounded (as PyTorch's, so the reference codes the same), once per group or channel:
    every element is then coded with a multiplication instead of a division."""
    return tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)


@triton.jit
def int8_scale(amax):
    """The INT8 scale of a group from its absolute maximum (abs_max): NaN where that is NaN, as nan_max keeps it."""
    return nan_max(amax, 1e-30) / 127.0


@triton.jit
def quantize_rows_int8(x, ROWS: tl.constexpr, GROUP: tl.constexpr, BLOCK_D: tl.constexpr, EXPLICIT_NAN: tl.constexpr,
                       INLINE_PTX: tl.constexpr, SIGN_FROM_X: tl.constexpr):
    """INT8 codes, the scale of each GROUP of rows, and that scale repeated per row, for a [ROWS, BLOCK_D]
    FP32 tile. A group holding NaN gets a NaN scale and one holding Inf an infinite one (its codes 0): either way
    the attention output turns non-finite and the guard recomputes it exactly instead of returning finite
    garbage."""
    scale = int8_scale(abs_max(tl.reshape(x, (ROWS // GROUP, GROUP * BLOCK_D)), 1, EXPLICIT_NAN))
    # coded in the tile's own layout, each row with its group's reciprocal: coded as [groups, group's elements] and
    # reshaped back, the packed codes (int8_codes' INLINE_PTX) took Q's programs from 121 registers to 168 on sm90
    row_r = tl.reshape(tl.broadcast_to(reciprocal(scale)[:, None], (ROWS // GROUP, GROUP)), (ROWS,))
    q = int8_codes(x, row_r[:, None], INLINE_PTX, SIGN_FROM_X)
    row_scale = tl.reshape(tl.broadcast_to(scale[:, None], (ROWS // GROUP, GROUP)), (ROWS,))
    return q, scale, row_scale


@triton.jit
def add_k_tile(k_sum, k_raw, offs_n, offs_d, k_end, D, PE, stride_pn, ROPE: tl.constexpr, INLINE_PTX: tl.constexpr):
    """kv_stats_chunk's step for K: one tile's rows (loaded up to k_end: none where the tile is not sampled) into
    K's sum, rotated with ROPE (the K that is coded)."""
    if ROPE:
        k_sum += rotated(widened(k_raw, INLINE_PTX), offs_n, offs_d, k_end, D, PE, stride_pn)
    else:
        k_sum += widened(k_raw, INLINE_PTX)
    return k_sum


@triton.jit
def add_v_tile(v_sum, v_max, v_min, v_raw, row_ok, V_RANGE_ON: tl.constexpr, INLINE_PTX: tl.constexpr):
    """kv_stats_chunk's step for V: one tile's rows into V's sum and, with V_RANGE_ON, those in the chunk (row_ok)
    into its maximum and minimum."""
    v = widened(v_raw, INLINE_PTX)
    v_sum += v
    if V_RANGE_ON:
        v_max = tl.maximum(v_max, tl.where(row_ok[:, None], v, float("-inf")))
        v_min = tl.minimum(v_min, tl.where(row_ok[:, None], v, float("inf")))
    return v_sum, v_max, v_min


@triton.jit
def kv_stats_chunk(
    K, V, PARTS, V_RANGE, bh, chunk, n_chunks,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    HK, N, D, rows_per_chunk, k_every, PE, stride_pn,
    TILE: tl.constexpr, BLOCK_D: tl.constexpr, K_STATS: tl.constexpr, V_STATS: tl.constexpr, ROPE: tl.constexpr,
    AHEAD: tl.constexpr, V_RANGE_ON: tl.constexpr, STAGES: tl.constexpr, INLINE_PTX: tl.constexpr,
):
    """Partial per-channel statistics of K and V over one chunk of tokens, for one (batch, KV head):
    PARTS[bh, chunk] = (sum of K, sum of V), each [BLOCK_D] in FP32 (padded channels read as 0). K's sum covers a
    sample: the tiles whose index is a multiple of k_every (chunks start on one; launch.stats_every); K's loads in
    the tiles between are masked off, which issues no memory access. V's statistics cover every key. The
    quantization programs of the next pass finish the sums (finish_stats), so no PyTorch reduction runs in between.
    With V_RANGE_ON (FP8 V, whose codes' scales need it) V's per-channel maximum and minimum fold straight into the
    head's range V_RANGE [BHK, 2, BLOCK_D] by atomic maximum and minimum: exact and independent of the order, so
    the same bits on every run, and each V program then loads two finished rows where it reduced two [chunks,
    channels] tiles of partial ranges (bench/NOTES.md, round "V's range by atomics, …"). A chunk is a chain of
    dependent steps, and the loads in flight per program bound how fast it reads: with STAGES (launch.STATS_STAGES)
    Triton's pipeliner keeps STAGES - 1 tiles in flight as asynchronous copies into shared memory; with STAGES 0
    each step loads the tile AHEAD (1 or 2) tiles on, in registers, before it adds up this one (load_raw). The
    same tiles are added in the same order either way. With ROPE, K's sample is summed rotated (rotary.rotated; PE
    this head's table), the K that is coded."""
    b = bh // HK
    h = bh % HK
    offs_d = tl.arange(0, BLOCK_D)
    rows = tl.arange(0, TILE)
    # elementwise accumulators, reduced across rows once at the end: a reduction per tile would put
    # shuffles and barriers between every load and the next
    k_sum = tl.zeros((TILE, BLOCK_D), tl.float32)
    v_sum = tl.zeros((TILE, BLOCK_D), tl.float32)
    v_max = tl.full((TILE, BLOCK_D), float("-inf"), tl.float32)
    v_min = tl.full((TILE, BLOCK_D), float("inf"), tl.float32)
    lo = chunk * rows_per_chunk
    hi = tl.minimum(N, lo + rows_per_chunk)
    if STAGES > 0:
        # Triton's pipeliner: STAGES - 1 tiles in flight as asynchronous copies into shared memory
        for start in tl.range(lo, hi, TILE, num_stages=STAGES):
            offs_n = start + rows
            if K_STATS:  # none loaded where the tile is not sampled
                k_end = tl.where(((start - lo) // TILE) % k_every == 0, hi, 0)
                k_raw = load_raw(K, b, h, offs_n, offs_d, stride_kb, stride_kh, stride_kn, stride_kd, k_end, D)
                k_sum = add_k_tile(k_sum, k_raw, offs_n, offs_d, k_end, D, PE, stride_pn, ROPE, INLINE_PTX)
            if V_STATS:
                v_raw = load_raw(V, b, h, offs_n, offs_d, stride_vb, stride_vh, stride_vn, stride_vd, hi, D)
                v_sum, v_max, v_min = add_v_tile(v_sum, v_max, v_min, v_raw, offs_n < hi, V_RANGE_ON, INLINE_PTX)
    else:
        # the first tile is sampled (a chunk starts on one); a later tile's K rows end at hi where it is sampled, else
        # at 0 (none loaded: a masked load issues no memory access)
        if K_STATS:
            k_next = load_raw(K, b, h, lo + rows, offs_d, stride_kb, stride_kh, stride_kn, stride_kd, hi, D)
            if AHEAD == 2:
                k_end = tl.where(1 % k_every == 0, hi, 0)
                k_after = load_raw(K, b, h, lo + TILE + rows, offs_d, stride_kb, stride_kh, stride_kn, stride_kd, k_end,
                                   D)
        if V_STATS:
            v_next = load_raw(V, b, h, lo + rows, offs_d, stride_vb, stride_vh, stride_vn, stride_vd, hi, D)
            if AHEAD == 2:
                v_after = load_raw(V, b, h, lo + TILE + rows, offs_d, stride_vb, stride_vh, stride_vn, stride_vd, hi, D)
        for start in range(lo, hi, TILE):
            offs_n = start + rows
            row_ok = offs_n < hi
            # the loads AHEAD tiles on issued before this step's tiles are waited for
            if K_STATS:
                k_raw = k_next
                k_end = tl.where(((start + AHEAD * TILE - lo) // TILE) % k_every == 0, hi, 0)
                if AHEAD == 2:
                    k_next = k_after
                    k_after = load_raw(K, b, h, offs_n + 2 * TILE, offs_d, stride_kb, stride_kh, stride_kn, stride_kd,
                                       k_end, D)
                else:
                    k_next = load_raw(K, b, h, offs_n + TILE, offs_d, stride_kb, stride_kh, stride_kn, stride_kd, k_end,
                                      D)
            if V_STATS:
                v_raw = v_next
                if AHEAD == 2:
                    v_next = v_after
                    v_after = load_raw(V, b, h, offs_n + 2 * TILE, offs_d, stride_vb, stride_vh, stride_vn, stride_vd,
                                       hi, D)
                else:
                    v_next = load_raw(V, b, h, offs_n + TILE, offs_d, stride_vb, stride_vh, stride_vn, stride_vd, hi, D)
            if K_STATS:  # the same rows as this tile's load: none where the tile is not sampled
                k_sum = add_k_tile(k_sum, k_raw, offs_n, offs_d, tl.where(((start - lo) // TILE) % k_every == 0, hi, 0),
                                   D, PE, stride_pn, ROPE, INLINE_PTX)
            if V_STATS:
                v_sum, v_max, v_min = add_v_tile(v_sum, v_max, v_min, v_raw, row_ok, V_RANGE_ON, INLINE_PTX)
    out = PARTS + (bh * n_chunks + chunk) * 2 * BLOCK_D + offs_d
    tl.store(out, tl.sum(k_sum, axis=0))
    tl.store(out + BLOCK_D, tl.sum(v_sum, axis=0))
    if V_RANGE_ON:  # relaxed: the next launch reads the range, and the launches' order orders it
        v_range = V_RANGE + bh * 2 * BLOCK_D + offs_d
        tl.atomic_max(v_range, tl.max(v_max, axis=0), sem="relaxed")
        tl.atomic_min(v_range + BLOCK_D, tl.min(v_min, axis=0), sem="relaxed")


@triton.jit
def finish_stats(PARTS, bh, n_chunks, N, offs_d, BLOCK_D: tl.constexpr, CHUNKS: tl.constexpr, WHICH: tl.constexpr):
    """The mean of K (WHICH 0) or of V (1) from the partial sums of kv_stats_chunk (n_chunks <= CHUNKS); N the keys
    the sums cover. All chunks load at once: a loop over them would be a chain of dependent L2 round trips in every
    quantization program."""
    offs_c = tl.arange(0, CHUNKS)
    ptrs = PARTS + ((bh * n_chunks + offs_c[:, None]) * 2 + WHICH) * BLOCK_D + offs_d[None, :]
    present = offs_c[:, None] < n_chunks
    return tl.sum(tl.load(ptrs, mask=present, other=0.0), axis=0) / tl.maximum(N, 1).to(tl.float32)


@triton.jit
def carried_row(ROW, offs_d, CHUNKS: tl.constexpr):
    """ROW[offs_d], one per-channel row of the carried statistics, in the layout finish_stats gives its vectors: a
    [CHUNKS, channels] tile of which only the first row is read (the masked rows issue no memory access), summed.
    Loaded as a vector of its own, Triton gave it another layout and the carried launch took 244 registers on sm90
    where one of the same roles without it took 128."""
    first = tl.arange(0, CHUNKS)[:, None] == 0
    return tl.sum(tl.load(ROW + tl.zeros((CHUNKS, 1), tl.int32) + offs_d[None, :], mask=first, other=0.0), axis=0)


@triton.jit
def fp8_scale(top, bottom, centre, code_max):
    """The per-channel FP8 scale of V's codes of v - centre for a range [bottom, top]: the largest distance from the
    centre reaches code_max."""
    return tl.maximum(tl.maximum(top - centre, centre - bottom), 1e-30) / code_max


@triton.jit
def last_to_arrive(TICKET, n_programs):
    """Count this program in on a ticket shared by n_programs; True in the last to arrive, which sets the ticket
    back to 0 for the next call. The barrier puts every thread's loads and stores before the ticket's release; the
    acquire makes the other programs' visible to the last."""
    tl.debug_barrier()
    last = tl.atomic_add(TICKET, 1, sem="acq_rel") == n_programs - 1
    if last:
        tl.store(TICKET, 0)
    return last


@triton.jit
def pv_key_source(s):
    """Which key goes to position s within its 32: the Hopper kernel's P operand takes keys relabelled by bits
    (h u q t) -> (h q u t) (kernels/hopper_attention_kernel.to_pv_operand), so position (h q u t) holds key
    (h u q t). Gathering the source rows on load (whole rows, as coalesced as in order) lets the transposed
    FP8 store run along contiguous positions instead of scattering single bytes."""
    return (s & ~15) | (((s >> 1) & 1) << 3) | (((s >> 2) & 3) << 1) | (s & 1)


@triton.jit
def shifted(x, offs_n, offs_d, N, D, shift, multiplier, SHIFT: tl.constexpr, MASK: tl.constexpr):
    """(x - shift) * multiplier of an FP32 tile (without SHIFT the shift is known to be zero and not taken), with
    MASK zero outside the tensor. Without MASK the caller knows that what lies outside does not count: a select per
    element less."""
    if SHIFT:
        x = x - shift[None, :]
    x = x * multiplier
    if MASK:
        x = tl.where(in_bounds(offs_n, offs_d, N, D), x, 0.0)
    return x


@triton.jit
def clamped_rows(offs_n, end, CLAMP: tl.constexpr):
    """With CLAMP, offs_n with the rows past a program's end (the last row it codes, end - 1) read as that row: a
    duplicate row changes no maximum or minimum, where the zeros of a masked load would (its shifted value is
    -shift), and the rows past the end are neither stored nor summed (quantize_int8_role's RANGES). Without, offs_n
    (loaded masked at the end): the programs that mask every value they take a maximum of, where the clamp cost
    registers (the carried rotating launch spilled on sm90, the carried one took 140 on sm100)."""
    if CLAMP:
        return tl.minimum(offs_n, end - 1)
    else:
        return offs_n


@triton.jit
def next_slice(X, b, h, offs_n, offs_d, stride_b, stride_h, stride_n, stride_d, N, D, nxt, end, PE, stride_pn,
               SUB: tl.constexpr, ROPE: tl.constexpr, INLINE_PTX: tl.constexpr, CLAMP: tl.constexpr):
    """The slice offs_n of a program's rows, which came loaded in `nxt`, as FP32, rotated with ROPE
    (rotary.rotated by the head's table PE), and the next slice's load (clamped_rows with CLAMP), issued before
    this one is used."""
    raw = nxt
    nxt = load_raw(X, b, h, clamped_rows(offs_n + SUB, end, CLAMP), offs_d, stride_b, stride_h, stride_n, stride_d, end,
                   D)
    x = widened(raw, INLINE_PTX)
    if ROPE:
        x = rotated(x, offs_n, offs_d, N, D, PE, stride_pn)
    return x, nxt


@triton.jit
def first_slice(X, b, h, row0, stride_b, stride_h, stride_n, stride_d, N, D, ROWS: tl.constexpr,
                SUB: tl.constexpr, BLOCK_D: tl.constexpr, CLAMP: tl.constexpr):
    """The load of the first SUB rows of quantize_int8_role's program (its `first`; clamped_rows)."""
    end = tl.minimum(N, row0 + ROWS)
    return load_raw(X, b, h, clamped_rows(row0 + tl.arange(0, SUB), end, CLAMP), tl.arange(0, BLOCK_D), stride_b,
                    stride_h, stride_n, stride_d, end, D)


@triton.jit
def group_amax(top, bottom, shift, multiplier, EXPLICIT_NAN: tl.constexpr):
    """max |(x - shift) * multiplier| over a group of rows from its elementwise maximum `top` and minimum `bottom`
    (FP32 [rows, channels], each element the extreme of its row position across the group's slices): the farthest
    value from a channel's shift is its maximum or its minimum. Exact, the same value as the maximum over every
    shifted element (FP32 rounding is monotone, so the largest rounded difference is the rounded largest
    difference), NaN where the group holds one. The distances are taken elementwise and reduced once: reduced to
    per-channel rows first, across threads and warps, the K programs took 554 instructions a group for it."""
    dist = nan_max(top - shift[None, :], shift[None, :] - bottom)
    return abs_max(dist * multiplier, None, EXPLICIT_NAN)


@triton.jit
def code_slice(X, b, h, offs_n, offs_d, stride_b, stride_h, stride_n, stride_d, N, D, nxt, end, PE, stride_pn, shift,
               multiplier, scale, OUT8, SUB: tl.constexpr, BLOCK_D: tl.constexpr, ROPE: tl.constexpr,
               SHIFTED: tl.constexpr, INLINE_PTX: tl.constexpr, CLAMP: tl.constexpr, SIGN_FROM_X: tl.constexpr):
    """The second pass of a two-pass group over one slice (quantize_int8_role): its INT8 codes with the group's
    scale stored, and the next slice's load returned (next_slice). No mask but with the rotary table (without it
    the rotating K-and-V launch took 170 registers on sm89, not 168): rows past N are not stored, and padded
    channels hold 0 - 0 (their shift is 0)."""
    x, nxt = next_slice(X, b, h, offs_n, offs_d, stride_b, stride_h, stride_n, stride_d, N, D, nxt, end, PE, stride_pn,
                        SUB, ROPE, INLINE_PTX, CLAMP)
    codes = int8_codes(shifted(x, offs_n, offs_d, N, D, shift, multiplier, SHIFTED, ROPE), reciprocal(scale)[:, None],
                       INLINE_PTX, SIGN_FROM_X)
    tl.store(OUT8 + offs_n[:, None] * BLOCK_D + offs_d[None, :], codes, mask=offs_n[:, None] < N)
    return nxt


@triton.jit
def quantize_int8_role(X, b, h, row0, stride_b, stride_h, stride_n, stride_d, N, D, shift, multiplier,
                       OUT8, SCALE, n_groups, first, PE, stride_pn, SUMS,
                       ROWS: tl.constexpr, SUB: tl.constexpr, GROUP: tl.constexpr, BLOCK_D: tl.constexpr,
                       ROPE: tl.constexpr, SHIFTED: tl.constexpr, EXPLICIT_NAN: tl.constexpr,
                       SUM_ROWS: tl.constexpr, RANGES: tl.constexpr, INLINE_PTX: tl.constexpr,
                       SIGN_FROM_X: tl.constexpr):
    """INT8 codes of (rot(x) - shift) * multiplier (rot: the rotary table PE's rotation with ROPE, else none) for
    rows [row0, row0 + ROWS) of one head, SUB rows at a time, into OUT8 [N, BLOCK_D] and one scale per GROUP rows
    into SCALE [n_groups]. Slices keep the FP32 tile small (a whole 128-row tile took 255 registers and spilled in
    4 warps), so more programs share a multiprocessor. A group longer than a slice takes two passes: its maximum is
    found first, then its rows are read again (from the cache) and coded. With RANGES (quantize_kernel's) the first
    pass takes the group's elementwise range (group_amax), rows past the program's end loaded as its last row
    (clamped_rows, also for `first`, which the caller issues with first_slice ahead of whatever else it waits for);
    on sm90 a K program's instructions went from 2660 to 1704 with it, the second pass unrolled and the inline PTX
    (bench/NOTES.md, round "K's range pass, …"). Otherwise the first pass takes the maximum of the shifted values,
    zero outside the tensor. Every slice's load is issued one step ahead (next_slice). A group within a slice is
    coded from its slice's values, zero outside the tensor where they are shifted or rotated. With SUM_ROWS the
    program also stores the per-channel sum of the coded values (rot(x) - shift) * multiplier over its rows into
    SUMS [BLOCK_D] (carried statistics: the next call's K mean, finish_k_block). Where a group takes two passes the
    sums are taken in the first, which holds no codes: taken in the coding pass, they took the carried launch's K
    programs from 64 registers to 128 on sm90, in the first pass to 115 (the same slices in the same order, so the
    same bits)."""
    offs_d = tl.arange(0, BLOCK_D)
    rows = tl.arange(0, SUB)
    end = tl.minimum(N, row0 + ROWS)
    nxt = first
    # in the layout of a slice's sums (a vector of its own layout cost a conversion per slice: 166 registers on sm90
    # where the launch takes 128 without the sums)
    total = tl.sum(tl.zeros((SUB, BLOCK_D), tl.float32), axis=0)
    if GROUP > SUB:
        for g in tl.static_range(0, ROWS, GROUP):
            if RANGES:
                # in the input's own dtype: a 16-bit pair's maximum is one instruction and needs no conversion
                # (range_step), and the conversion of the maximum is exact
                RANGE_DTYPE: tl.constexpr = tl.float32 if EXPLICIT_NAN else nxt.dtype
                PAIRS: tl.constexpr = INLINE_PTX and RANGE_DTYPE.primitive_bitwidth == 16
                top = tl.full((SUB, BLOCK_D), float("-inf"), RANGE_DTYPE)
                bottom = tl.full((SUB, BLOCK_D), float("inf"), RANGE_DTYPE)
                for s in tl.static_range(0, GROUP, SUB):
                    tile = nxt.to(RANGE_DTYPE)
                    nxt = load_raw(X, b, h, clamped_rows(row0 + g + s + rows + SUB, end, True), offs_d, stride_b,
                                   stride_h, stride_n, stride_d, N, D)
                    top = range_step(top, tile, False, PAIRS)
                    bottom = range_step(bottom, tile, True, PAIRS)
                amax = nan_max(tl.zeros([1], tl.float32),
                               group_amax(top.to(tl.float32), bottom.to(tl.float32), shift, multiplier, EXPLICIT_NAN))
            else:  # every shifted value (the sums need them), zero outside the tensor
                amax = tl.zeros([1], tl.float32)
                for s in range(0, GROUP, SUB):
                    offs_n = row0 + g + s + rows
                    x, nxt = next_slice(X, b, h, offs_n, offs_d, stride_b, stride_h, stride_n, stride_d, N, D, nxt,
                                        end, PE, stride_pn, SUB, ROPE, INLINE_PTX, RANGES)
                    x = shifted(x, offs_n, offs_d, N, D, shift, multiplier, SHIFTED, True)
                    amax = nan_max(amax, abs_max(x, None, EXPLICIT_NAN))
                    if SUM_ROWS:
                        total += tl.sum(x, axis=0)
            scale = int8_scale(amax)
            nxt = first_slice(X, b, h, row0 + g, stride_b, stride_h, stride_n, stride_d, N, D, ROWS - g, SUB,
                              BLOCK_D, RANGES)
            # unrolled with the range pass (straight-line code: 11% fewer instructions a K program on sm90); rolled
            # elsewhere, where unrolled it took the rotating launches to 232 registers and the carried one to 138 on
            # sm100
            if RANGES:
                for s in tl.static_range(0, GROUP, SUB):
                    nxt = code_slice(X, b, h, row0 + g + s + rows, offs_d, stride_b, stride_h, stride_n, stride_d, N,
                                     D, nxt, end, PE, stride_pn, shift, multiplier, scale, OUT8, SUB, BLOCK_D, ROPE,
                                     SHIFTED, INLINE_PTX, RANGES, SIGN_FROM_X)
            else:
                for s in range(0, GROUP, SUB):
                    nxt = code_slice(X, b, h, row0 + g + s + rows, offs_d, stride_b, stride_h, stride_n, stride_d, N,
                                     D, nxt, end, PE, stride_pn, shift, multiplier, scale, OUT8, SUB, BLOCK_D, ROPE,
                                     SHIFTED, INLINE_PTX, RANGES, SIGN_FROM_X)
            offs_g = (row0 + g) // GROUP + tl.arange(0, 1)
            tl.store(SCALE + offs_g, scale, mask=offs_g < n_groups)
    else:
        for s in range(0, ROWS, SUB):
            offs_n = row0 + s + rows
            x, nxt = next_slice(X, b, h, offs_n, offs_d, stride_b, stride_h, stride_n, stride_d, N, D, nxt, end, PE,
                                stride_pn, SUB, ROPE, INLINE_PTX, False)
            x = shifted(x, offs_n, offs_d, N, D, shift, multiplier, SHIFTED, SHIFTED or ROPE)
            codes, scale, _ = quantize_rows_int8(x, SUB, GROUP, BLOCK_D, EXPLICIT_NAN, INLINE_PTX, SIGN_FROM_X)
            tl.store(OUT8 + offs_n[:, None] * BLOCK_D + offs_d[None, :], codes, mask=offs_n[:, None] < N)
            offs_g = (row0 + s) // GROUP + tl.arange(0, SUB // GROUP)
            tl.store(SCALE + offs_g, scale, mask=offs_g < n_groups)
            if SUM_ROWS:
                total += tl.sum(x, axis=0)
    if SUM_ROWS:
        tl.store(SUMS + offs_d, total)


@triton.jit
def quantize_v_tile(
    V, PARTS, V_RANGE, V8, V_SCALE, V_MEAN, V_CODE_SUM, V_SHIFT, V_TICKETS, CARRY, V_DIFF_SUM, pid, bh,
    channel_block, n_programs,
    stride_vb, stride_vh, stride_vn, stride_vd,
    HK, NK, D, n_chunks, v_padded, v_code_max, inv_keys, carry_margin,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, CHANNELS: tl.constexpr, STATS_CHUNKS: tl.constexpr,
    SMOOTH_V: tl.constexpr, PV_FP8: tl.constexpr, FP8_ROUND_IN_FP32: tl.constexpr, PV_KEY_ORDER: tl.constexpr,
    WARPS: tl.constexpr, FINISH_SHIFT: tl.constexpr, SHIFT_PROGRAMS: tl.constexpr, CARRIED: tl.constexpr,
    INLINE_PTX: tl.constexpr,
):
    """V's part of one call's quantization: ROWS keys (program pid of n_programs) and CHANNELS of the BLOCK_D
    channels (channel_block) of one head: a whole 128-channel tile took 255 registers and spilled. The first
    program of each head and channel block writes those channels' mean (finished from kv_stats_chunk's partial
    sums).

    With PV_FP8: FP8 e4m3 codes stored transposed [BHK, BLOCK_D, v_padded] (the K-major operand FP8
    tensor-core dots want) with per-channel scales from V's range (V_RANGE, which the statistics' atomics
    finished), of v - mean(v) with SMOOTH_V; the same first programs write the scales. PV_KEY_ORDER stores
    the keys of every 32 in the order the Hopper kernel's P operand comes in (pv_key_source). Every program
    writes the per-channel sums of its dequantized codes into its channels of V_CODE_SUM [BHK, n_programs,
    BLOCK_D] (see launch.quantize_qkv's v_shift). A sum of the codes alone, not of their rounding errors: the rounding
    errors' dequantize-and-subtract per element measured slower.

    Layouts (Triton picks them; these choices steer it): V loads 8 bytes (4 channels) per thread rather than 16, so
    the tile arrives in the layout the statistics' loads have (finish_stats), where with 16-byte loads Triton
    converted the BF16 tile to that layout through shared memory first. And the tile's rows are loaded out of
    order, so that each thread's rows (R apart in that layout) are A consecutive stored positions: the codes then
    cross shared memory in 4- and 16-byte accesses to the store's layout instead of two bytes at a time. Both
    steer only speed (every code goes to the address it belongs at): one call's quantization 2-3% faster on the
    H200 from Flux's shape to HunyuanVideo's, the same bits (bench/NOTES.md, round "V's tile layout, and
    statistics finished once per head").

    The last of a head's and channel block's programs to store its code sums (an atomic ticket per block in
    V_TICKETS, which that program sets back to 0 for the next call) sets those channels of V_RANGE back and, with
    FINISH_SHIFT, writes their output shift into V_SHIFT (finish_v_block).

    CARRIED (PV_FP8 with FINISH_SHIFT only): V's mean and scale come from the call before at this site (CARRY
    [BHK, 3, BLOCK_D]: K's mean, V's mean, V's scale with its margin; kernels/carried_stats.py) instead of this
    call's statistics, which no launch before this one makes. The program folds its rows' range into V_RANGE by
    atomics and stores the sum of v - (carried mean) into V_DIFF_SUM [BHK, n_programs, BLOCK_D]; the last
    program finishes this call's mean, the exact output shift and the next call's scale from them. A value past
    the carried scale's reach would saturate its FP8 code: the program then writes NaN into its channel's code
    sum, so that the head's shift, and with it every output row of the head, turns non-finite, and the guard's
    repair recomputes those rows exactly (the caller runs this mode only with the guard on)."""
    # rows per repetition of that layout: WARPS warps (the launch's num_warps) of 32 threads, CHANNELS // 4 along the
    # channels
    REPEAT: tl.constexpr = WARPS * 32 // (CHANNELS // 4)
    R: tl.constexpr = REPEAT if REPEAT < ROWS else ROWS
    A: tl.constexpr = ROWS // R
    i = tl.arange(0, ROWS)
    offs_n = pid * ROWS + (i % R) * A + i // R  # the stored position of load row i
    offs_d = channel_block * CHANNELS + tl.max_contiguous(tl.arange(0, CHANNELS), 4)
    src_n = pv_key_source(offs_n) if PV_KEY_ORDER else offs_n
    if PV_FP8:  # in flight while the statistics are finished: nothing in it waits for them
        v_raw = load_raw(V, bh // HK, bh % HK, src_n, offs_d, stride_vb, stride_vh, stride_vn, stride_vd, NK, D)
    if CARRIED:
        mean = carried_row(CARRY + (bh * 3 + 1) * BLOCK_D, offs_d, STATS_CHUNKS)
    else:
        mean = finish_stats(PARTS, bh, n_chunks, NK, offs_d, BLOCK_D, STATS_CHUNKS, 1)
        if pid == 0:
            tl.store(V_MEAN + bh * BLOCK_D + offs_d, mean)
    if PV_FP8:
        v_mean = mean  # V's own (CARRIED: the call before's): the output shift restores this call's
        if not SMOOTH_V:
            mean = tl.zeros((CHANNELS,), tl.float32)
        if CARRIED:
            scale = carried_row(CARRY + (bh * 3 + 2) * BLOCK_D, offs_d, STATS_CHUNKS)
        else:
            vmax = tl.load(V_RANGE + bh * 2 * BLOCK_D + offs_d)  # finished by the statistics' atomics
            vmin = tl.load(V_RANGE + (bh * 2 + 1) * BLOCK_D + offs_d)
            scale = fp8_scale(vmax, vmin, mean, v_code_max)
        v = widened(v_raw, INLINE_PTX)
        valid = in_bounds(src_n, offs_d, NK, D)
        r = reciprocal(scale)
        codes = to_fp8_e4m3(tl.where(valid, v - mean[None, :], 0.0) * r[None, :], FP8_ROUND_IN_FP32)
        # [A, R, CHANNELS]: load row i = a * R + r at position r * A + a, contiguous along a
        pos = pid * ROWS + tl.arange(0, R)[None, :, None] * A + tl.arange(0, A)[:, None, None]
        tl.store(V8 + (bh * BLOCK_D + offs_d[None, None, :]) * v_padded + pos, tl.reshape(codes, (A, R, CHANNELS)),
                 mask=pos < v_padded)
        code_sum = tl.sum(codes.to(tl.float32), axis=0) * scale
        if CARRIED:
            # rows outside V read as the carried mean: no deviation, no share of the sums, no false saturation.
            # (Taken from the scaled tile the codes are made of instead, the launch took 230 registers on sm90, not
            # 168)
            v_in = tl.where(valid, v, v_mean[None, :])
            top = tl.max(v_in, axis=0)
            bottom = tl.min(v_in, axis=0)
            code_sum = tl.where(tl.maximum(top - mean, mean - bottom) * r > v_code_max, float("nan"), code_sum)
            tl.store(V_DIFF_SUM + (bh * n_programs + pid) * BLOCK_D + offs_d, tl.sum(v_in - v_mean[None, :], axis=0))
            tl.atomic_max(V_RANGE + bh * 2 * BLOCK_D + offs_d, top, sem="relaxed")
            tl.atomic_min(V_RANGE + (bh * 2 + 1) * BLOCK_D + offs_d, bottom, sem="relaxed")
        tl.store(V_CODE_SUM + (bh * n_programs + pid) * BLOCK_D + offs_d, code_sum)
        if pid == 0:
            tl.store(V_SCALE + bh * BLOCK_D + offs_d, scale)
        finish_v_block(V_CODE_SUM, V_SHIFT, V_TICKETS, V_RANGE, v_mean, bh, channel_block, n_programs, inv_keys,
                       offs_d, CARRY, V_DIFF_SUM, V_MEAN, scale, v_code_max, carry_margin, BLOCK_D, CHANNELS,
                       SHIFT_PROGRAMS, FINISH_SHIFT, CARRIED, SMOOTH_V)


@triton.jit
def code_sums_total(SUMS, bh, n_programs, offs_d, BLOCK_D: tl.constexpr, CHANNELS: tl.constexpr,
                    PROGRAMS: tl.constexpr):
    """The sum over a head's n_programs programs of their per-channel sums (SUMS [BHK, n_programs, BLOCK_D]: V's
    code sums, V's or K's sums of x - mean) at channels offs_d, PROGRAMS rows at a time: one fixed order, the same
    bits on every run. The loads skip L1 (".cg"): the sums were just written by other programs of the running
    launch."""
    offs_p = tl.arange(0, PROGRAMS)
    total = tl.zeros((PROGRAMS, CHANNELS), tl.float32)
    for start in range(0, n_programs, PROGRAMS):
        rows = start + offs_p
        total += tl.load(SUMS + (bh * n_programs + rows[:, None]) * BLOCK_D + offs_d[None, :],
                         mask=rows[:, None] < n_programs, other=0.0, cache_modifier=".cg")
    return tl.sum(total, axis=0)


@triton.jit
def finish_v_block(V_CODE_SUM, V_SHIFT, V_TICKETS, V_RANGE, mean, bh, channel_block, n_programs, inv_keys, offs_d,
                   CARRY, V_DIFF_SUM, V_MEAN, scale, v_code_max, carry_margin,
                   BLOCK_D: tl.constexpr, CHANNELS: tl.constexpr, SHIFT_PROGRAMS: tl.constexpr, SHIFT: tl.constexpr,
                   CARRIED: tl.constexpr, SMOOTH_V: tl.constexpr):
    """The end of a V program: count itself in on its head's and channel block's ticket once its code sums are
    stored and V's range read. The last to arrive sets those channels of the range V_RANGE back to (-inf, inf) for
    the next call's atomics (kv_stats_chunk) and, with SHIFT, adds every program's code sums up (in a fixed order,
    SHIFT_PROGRAMS rows at a time: the same bits on every run) and writes V_SHIFT = mean - inv_keys · their sum
    (last_to_arrive).

    CARRIED (quantize_v_tile): `mean` is the carried one and `scale` the carried scale the codes used. The last
    program finishes this call's mean from the programs' sums of v - mean (V_DIFF_SUM), writes it to V_MEAN and
    the shift from it, and carries this call's mean and the scale its range gives (times carry_margin) to the next
    call in CARRY; a non-finite one (a NaN or Inf in V) carries the old values instead."""
    if last_to_arrive(V_TICKETS + bh * (BLOCK_D // CHANNELS) + channel_block, n_programs):
        if CARRIED:
            current = mean + code_sums_total(V_DIFF_SUM, bh, n_programs, offs_d, BLOCK_D, CHANNELS,
                                             SHIFT_PROGRAMS) * inv_keys
            tl.store(V_MEAN + bh * BLOCK_D + offs_d, current)
            top = tl.load(V_RANGE + bh * 2 * BLOCK_D + offs_d, cache_modifier=".cg")
            bottom = tl.load(V_RANGE + (bh * 2 + 1) * BLOCK_D + offs_d, cache_modifier=".cg")
            centre = current if SMOOTH_V else tl.zeros((CHANNELS,), tl.float32)
            carried = fp8_scale(top, bottom, centre, v_code_max) * carry_margin
            kept = (tl.abs(current) < float("inf")) & (carried < float("inf"))  # False for NaN too
            tl.store(CARRY + (bh * 3 + 1) * BLOCK_D + offs_d, tl.where(kept, current, mean))
            tl.store(CARRY + (bh * 3 + 2) * BLOCK_D + offs_d, tl.where(kept, carried, scale))
        else:
            current = mean
        if SHIFT:
            total = code_sums_total(V_CODE_SUM, bh, n_programs, offs_d, BLOCK_D, CHANNELS, SHIFT_PROGRAMS)
            tl.store(V_SHIFT + bh * BLOCK_D + offs_d, current - total * inv_keys)
        tl.store(V_RANGE + bh * 2 * BLOCK_D + offs_d, tl.full((CHANNELS,), float("-inf"), tl.float32))
        tl.store(V_RANGE + (bh * 2 + 1) * BLOCK_D + offs_d, tl.full((CHANNELS,), float("inf"), tl.float32))


# K programs' sums a step of finish_k_block adds up: a [32, 128] step took the carried launch's K programs from 115
# registers to 151 on sm90, [16, 128] to 116
K_FINISH_ROWS = tl.constexpr(16)


@triton.jit
def finish_k_block(K_PARTS, K_TICKETS, CARRY, mean, bh, n_programs, inv_keys, offs_d, BLOCK_D: tl.constexpr):
    """The end of a K program in a CARRIED launch: count itself in on its head's ticket once its sum of k - mean
    (quantize_int8_role's SUMS, in K_PARTS [BHK, n_programs, BLOCK_D]) is stored; the last to arrive sets the
    ticket back to 0 and carries this call's K mean (mean + their sum / keys, a fixed order) to the next call in
    CARRY, the old one where it is not finite. Every program of the head read the old mean before it arrived."""
    if last_to_arrive(K_TICKETS + bh, n_programs):
        current = mean + code_sums_total(K_PARTS, bh, n_programs, offs_d, BLOCK_D, BLOCK_D, K_FINISH_ROWS) * inv_keys
        tl.store(CARRY + bh * 3 * BLOCK_D + offs_d, tl.where(tl.abs(current) < float("inf"), current, mean))


@triton.jit
def quantize_kernel(
    Q, K, V, CARRY, PARTS, V_RANGE, Q8, Q_SCALE, K8, K_SCALE, K_MEAN, V8, V_SCALE, V_MEAN, V_CODE_SUM, V_SHIFT,
    V_TICKETS, K_PARTS, K_TICKETS, V_DIFF_SUM,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    BH, BHK, H, HK, NQ, NK, D, n_chunks, chunk_rows, k_every, k_sampled, q_groups, k_groups, q_multiplier,
    v_padded, v_code_max, n_v_programs, inv_keys, carry_margin,
    PE, stride_pb, stride_ph, stride_pn,
    DO_STATS: tl.constexpr, DO_Q: tl.constexpr, DO_K: tl.constexpr, V_BLOCKS: tl.constexpr,
    ROWS: tl.constexpr, Q_SUB: tl.constexpr, K_SUB: tl.constexpr, Q_GROUP: tl.constexpr, K_GROUP: tl.constexpr,
    BLOCK_D: tl.constexpr, STATS_TILE: tl.constexpr, STATS_CHUNKS: tl.constexpr, SMOOTH_K: tl.constexpr,
    V_STATS: tl.constexpr, V_ROWS: tl.constexpr, CHANNELS: tl.constexpr, SMOOTH_V: tl.constexpr,
    PV_FP8: tl.constexpr, INTERPRETING: tl.constexpr, PV_KEY_ORDER: tl.constexpr, WARPS: tl.constexpr,
    FINISH_SHIFT: tl.constexpr, SHIFT_PROGRAMS: tl.constexpr, ROPE: tl.constexpr, STATS_AHEAD: tl.constexpr,
    STATS_STAGES: tl.constexpr, CARRIED: tl.constexpr, CARRY_K: tl.constexpr, RANGE_PASS: tl.constexpr,
    INLINE_PTX: tl.constexpr, SIGN_FROM_X: tl.constexpr,
):
    """One launch of a call's quantization: the roles it is given (DO_STATS, DO_Q, DO_K, V_BLOCKS), one per
    program_id(2), in that order; program_id(0) is the role's chunk or row block, program_id(1) its head. Roles
    that need no statistics share a launch with those that make them, so that the short passes fill the GPU
    together (the statistics alone were under one wave at Flux's shape) and a call has two launches, not three.

    statistics (role 0): K's sums (SMOOTH_K; every k_every-th tile, k_sampled keys per head in all) and V's sums
       (V_STATS) over chunk program_id(0) of chunk_rows tokens into PARTS, and with PV_FP8 V's range into V_RANGE
       (kv_stats_chunk), for the next launch's K and V codes.
    Q: INT8 codes [BH, NQ, BLOCK_D] of q * q_multiplier, one scale per Q_GROUP rows.
    K: INT8 codes [BHK, NK, BLOCK_D] of k - mean(k) (SMOOTH_K, the sample's mean finished from the statistics),
       one scale per K_GROUP rows; the first program of each head also writes the mean (for the LSE correction).
    V (V_BLOCKS roles, one per CHANNELS channels): quantize_v_tile, n_v_programs programs per head; the last of
       them sets V's range back for the next call and, with FINISH_SHIFT, writes the output shift (finish_v_block).
    INTERPRETING: under Triton's interpreter, where FP8 codes are rounded in FP32 first (to_fp8_e4m3) and a
       group's NaN found by a test of its own (abs_max), for the GPU's results at the interpreter's speed.
    RANGE_PASS: a K (or Q) group longer than a slice finds its maximum from its elementwise range (group_amax), not
       from every shifted value. INLINE_PTX (never under the interpreter): BF16 widened, 16-bit ranges taken and
       INT8 codes packed by inline PTX (widened, range_step, int8_codes). SIGN_FROM_X: the INT8 rounding's ±0.5 from
       the coded value's sign, not the scaled one's (int8_codes). All give the same bits as without.

    ROPE: Q and K are coded (and K's sample summed) rotated by the rotary table PE [B, H, N, 2, D] (strides 0
    where it broadcasts; kernels/rotary.py, launch.rope_table), so that a model's rotation costs no pass of its
    own.

    CARRIED: one launch without statistics: K's and V's codes take the means and V's scale from the call before at
    this site (CARRY [BHK, 3, BLOCK_D]; kernels/carried_stats.py), and the last K and V programs of each head carry
    this call's to the next (finish_k_block, finish_v_block; K's only with CARRY_K, else the site keeps the K mean
    its first call measured). K_PARTS, K_TICKETS and V_DIFF_SUM are their scratch."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    role = tl.program_id(2)
    offs_d = tl.arange(0, BLOCK_D)
    Q_ROLE: tl.constexpr = DO_STATS
    K_ROLE: tl.constexpr = DO_STATS + DO_Q
    V_ROLE: tl.constexpr = DO_STATS + DO_Q + DO_K
    if DO_STATS:
        if (role == 0) & (pid < n_chunks) & (bh < BHK):
            kv_stats_chunk(K, V, PARTS, V_RANGE, bh, pid, n_chunks, stride_kb, stride_kh, stride_kn, stride_kd,
                           stride_vb, stride_vh, stride_vn, stride_vd, HK, NK, D, chunk_rows, k_every,
                           PE + (bh // HK) * stride_pb + (bh % HK) * stride_ph, stride_pn, STATS_TILE, BLOCK_D,
                           SMOOTH_K, V_STATS, ROPE, STATS_AHEAD, PV_FP8, STATS_STAGES, INLINE_PTX)
    if DO_Q:
        if (role == Q_ROLE) & (bh < BH) & (pid * ROWS < NQ):
            # the range pass (quantize_int8_role's RANGES) for two-pass groups, not with the rotary table (a rotated
            # range in FP32 over 64-row slices took the rotating launches to 255 registers and spills on sm90) nor
            # where K's sums are carried (they need every shifted value)
            Q_RANGES: tl.constexpr = Q_GROUP > Q_SUB and RANGE_PASS and not ROPE
            first = first_slice(Q, bh // H, bh % H, pid * ROWS, stride_qb, stride_qh, stride_qn, stride_qd, NQ, D, ROWS,
                                Q_SUB, BLOCK_D, Q_RANGES)
            quantize_int8_role(Q, bh // H, bh % H, pid * ROWS, stride_qb, stride_qh, stride_qn, stride_qd, NQ, D,
                               tl.zeros((BLOCK_D,), tl.float32), q_multiplier, Q8 + bh * NQ * BLOCK_D,
                               Q_SCALE + bh * q_groups, q_groups, first,
                               PE + (bh // H) * stride_pb + (bh % H) * stride_ph, stride_pn, K_PARTS, ROWS, Q_SUB,
                               Q_GROUP, BLOCK_D, ROPE, False, INTERPRETING, False, Q_RANGES, INLINE_PTX,
                               SIGN_FROM_X)
    if DO_K:
        if (role == K_ROLE) & (bh < BHK) & (pid * ROWS < NK):
            # K's first rows in flight while the mean is finished from the statistics
            K_RANGES: tl.constexpr = K_GROUP > K_SUB and RANGE_PASS and not (ROPE or CARRY_K)
            first = first_slice(K, bh // HK, bh % HK, pid * ROWS, stride_kb, stride_kh, stride_kn, stride_kd, NK, D,
                                ROWS, K_SUB, BLOCK_D, K_RANGES)
            if SMOOTH_K:
                if CARRIED:
                    mean = carried_row(CARRY + bh * 3 * BLOCK_D, offs_d, STATS_CHUNKS)
                else:
                    mean = finish_stats(PARTS, bh, n_chunks, k_sampled, offs_d, BLOCK_D, STATS_CHUNKS, 0)
                if pid == 0:
                    tl.store(K_MEAN + bh * BLOCK_D + offs_d, mean)
            else:
                mean = tl.zeros((BLOCK_D,), tl.float32)
            k_programs = tl.cdiv(NK, ROWS)
            quantize_int8_role(K, bh // HK, bh % HK, pid * ROWS, stride_kb, stride_kh, stride_kn, stride_kd, NK, D,
                               mean, 1.0, K8 + bh * NK * BLOCK_D, K_SCALE + bh * k_groups, k_groups, first,
                               PE + (bh // HK) * stride_pb + (bh % HK) * stride_ph, stride_pn,
                               K_PARTS + (bh * k_programs + pid) * BLOCK_D, ROWS, K_SUB, K_GROUP, BLOCK_D, ROPE,
                               SMOOTH_K, INTERPRETING, CARRY_K, K_RANGES, INLINE_PTX, SIGN_FROM_X)
            if CARRY_K:
                finish_k_block(K_PARTS, K_TICKETS, CARRY, mean, bh, k_programs, inv_keys, offs_d, BLOCK_D)
    if V_BLOCKS > 0:
        if (role >= V_ROLE) & (bh < BHK) & (pid < n_v_programs):
            quantize_v_tile(V, PARTS, V_RANGE, V8, V_SCALE, V_MEAN, V_CODE_SUM, V_SHIFT, V_TICKETS, CARRY, V_DIFF_SUM,
                            pid, bh, role - V_ROLE, n_v_programs, stride_vb, stride_vh, stride_vn, stride_vd, HK, NK,
                            D, n_chunks, v_padded, v_code_max, inv_keys, carry_margin, V_ROWS, BLOCK_D, CHANNELS,
                            STATS_CHUNKS, SMOOTH_V, PV_FP8, INTERPRETING, PV_KEY_ORDER, WARPS, FINISH_SHIFT,
                            SHIFT_PROGRAMS, CARRIED, INLINE_PTX)
