"""Launchers: shapes, buffers, grids and configurations for the Triton kernels.

Every launcher takes [B, H, N, D] views (any strides) and validates nothing: validation happens once,
in sage_core/dispatch.py, before any work is done.
"""
from __future__ import annotations

import math

import torch

from . import carried_stats, head_groups, hopper_launch, tuning
from .call_plan import PLANS, CallPlan
from .direct_launch import launch as run_kernel
from .tuning import interpreting
from .attention_kernel import sage_attention_fwd_kernel
from .repair_kernel import repair_tiles_kernel
from .quant_kernels import quantize_kernel

LOG2E = 1.4426950408889634
STATS_ROWS = 64
MAX_STATS_CHUNKS = 16  # partial-statistics rows per head (a power of two), finished inside each quantization program
# rows per step of the statistics loop, and Q/K rows a program codes at a time (of its QUANT_ROWS). With each
# loop loading its next tile ahead, 16-row statistics steps (128 registers; 32 took 253) and 32-row slices
# measured fastest on the H200 (bench/NOTES.md, "Loads issued ahead")
STATS_TILE = 16
STATS_AHEAD = 1  # with STATS_STAGES 0: tiles the statistics' loop loads ahead of the one it adds up (1 or 2)
# the statistics' loop pipelined by Triton in this many stages (asynchronous copies into shared memory, 8 KB a stage);
# 0: the look-ahead in registers above. On an H100 (bench/NOTES.md, round "V's range by atomics, …") 4 stages took
# the first launch 39.5 -> 38.0 µs at Flux, 22.9 -> 20.0 at SDXL, 247 -> 232 at B2 H32 N16384 D128; 3 and 6 less
# evenly
STATS_STAGES = 4
# a two-pass INT8 group's maximum from its elementwise range (quant_kernels.group_amax), and the inline PTX of the
# coding loops (quant_kernels.widened, range_step, int8_codes): fewer instructions an element, the same bits. On an
# H100 the two took Flux's quantization from 76.9 to 67.9 µs (bench/NOTES.md, round "K's range pass, …"). The inline
# PTX (sm80 on, as every GPU the kernels serve) is left out with the rotary table and in the carried launches: it took
# the carried rotating launch from 168 registers to 176 on sm90 (two programs a multiprocessor, not three), the
# carried one to 144 on sm89
RANGE_PASS = True
INLINE_PTX = True
# registers a quantization program may take (ptxas's cap; None: its own choice). With INLINE_PTX's packed codes ptxas
# gave the statistics-and-Q launch 168 on sm90 (three programs a multiprocessor, not four); capped at 128 it codes Q
# in 608 instructions a loop, without spills, where it took 740 before. FP8 P·V's launches only, and not with the
# rotary table: theirs take more (and spill under 128), FP16 P·V's K launch 162
QUANT_MAX_REGISTERS = 128
# the INT8 codes' ±0.5 taken from the coded value's own sign, not the scaled one's (quant_kernels.int8_codes): the
# same bits, Q's coding loop 545 instructions instead of 608 and a K program 1576 instead of 1704 on sm90. In the
# launches QUANT_MAX_REGISTERS caps only (sign_from_x): uncapped, ptxas took more registers for it (195 on sm100).
# On an H100 the quantization's device time was level with it (Flux 69.1 against 68.8 µs; bench/NOTES.md, round
# "The rounding's sign from the coded value, …"): kept for GPUs bound by instructions, at no measured cost
SIGN_FROM_X = True
# with the rotary table inside the quantization: the look-ahead loop. Pipelined (4 stages) the first launch took 137
# registers and 72 KB of shared memory (the table's loads pipelined too), and on an H100 Wan2.1's rotating
# quantization read 1.745 and 1.748 ms against 1.700 and 1.696, Flux.1's call 0.447 against 0.443-0.444 ms
# (bench/NOTES.md, round "Heads in groups on streams of their own, …")
ROPE_STATS_STAGES = 0
QUANT_ROWS = 128
QUANT_SUB = 32
ROPE_SUB = 64  # Q/K rows a program codes at a time when it rotates them too (slice_rows)
QUANT_WARPS = 4  # per program of every quantization role (V's measured slower with 8 on the H200)
V_ROWS = 128  # keys per program of V's quantization
# channels per V program (v_channels): 64 above head dim 64, 32 up to it (measured on the H200 with the loads issued
# ahead: 64 channels 2-6% faster at head dim 128, 4% slower at 64; 32 was ahead of 64 and 128 before)
V_CHANNELS = 64
V_CHANNELS_SMALL_HEADS = 32
# code sums the output shift adds per step (quant_kernels.finish_v_block; with 32 channels one [32, 32] FP32 tile)
SHIFT_PROGRAMS = 32
V_PAD = 128  # FP8 V rows padded to a multiple of this, so every tile load is in bounds and aligned
FP8_E4M3_MAX = 448.0
# K's mean for its smoothing comes from every `every`-th STATS_TILE of a head's keys (stats_every), at least
# STATS_SAMPLE_KEYS of them: any vector taken off K is exact (softmax ignores a constant per row, and the LSE is
# corrected with the same vector), so the sample only has to be close enough to the mean to take the channels'
# offset off. V's statistics read every key: V's mean is what the in-place FP8 accumulator needs taken off
# (sage_forward), exactly (a sample's mean cost accuracy that grew with the sequence: bench/NOTES.md, round "V's
# statistics from a sample, measured"), and its range bounds the FP8 codes (folded in by atomics: quant_buffers'
# "v_range").
STATS_SAMPLE_KEYS = 512
MAX_STATS_EVERY = 16
# query tiles per program of the exact repair's launch (kernels/repair_kernel.py): a program reads their row flags
# in one load and repairs the flagged ones. One per tile cost a clean call 5.7-5.9 µs at Flux's shape and 50-51 µs
# at B2 H32 N16384 D128 on an H100, 16 cost 2.0-2.3 and 5.0-5.8 (bench/NOTES.md, round "The quantization in one
# launch, …")
REPAIR_TILES = 16
REPAIR_ROWS = 16  # rows of a flagged tile the repair recomputes at a time (repair_rows)
# keys per step of the exact repair (kernels/repair_kernel.py): its FP32 tiles take shared memory with the rows and
# the head dim (32 keys at 64 rows × 256 dims took ~105 KB, over the 99 KB per block of consumer Ampere, Ada and
# Blackwell; tests/test_arch_codegen.py), and with REPAIR_ROWS rows a slice 16 keys kept its registers clear of
# spills on sm90 where 32 did not (bench/NOTES.md, round "Heads in groups on streams of their own, …")
REPAIR_KEYS = 16
# the repair's dots: "tf32x3" (three TF32 products on the tensor cores, FP32's precision) on Hopper, where it took one
# flagged tile at Flux's shape 1.07 -> 0.77 ms and a whole flagged head 11.1 -> 1.5 ms against IEEE dots, the
# repaired rows as close to FP32 attention (2.4e-4 at most, the BF16 output's rounding; bench/NOTES.md, round "Heads
# in groups inside the library, …"); "ieee" (FP32 on the FMA
# pipe) elsewhere, where three TF32 products took 255 registers and spilled 52-72 bytes on sm80 and sm120 (IEEE: 201
# to 255 registers, no spill) and no GPU of those families has measured either
REPAIR_DOT_PRECISION = "ieee"
REPAIR_DOT_PRECISION_SM90 = "tf32x3"
# carried statistics (kernels/carried_stats.py): V's FP8 scale carried to the next call is its range's times this,
# so that V may grow this much between two calls at a site before a code saturates (and its head is repaired).
# FP8 e4m3 keeps its relative precision at any scale down to its smallest normal, 2^-6: only values below
# margin × 3.5e-5 of a channel's largest lose bits
CARRY_MARGIN = 2.0
# whether a carried call also carries this call's K mean to the next (else a site keeps the mean its first call
# measured: exact either way, any vector taken off K is). With K's sums taken in its programs' first pass
# (quant_kernels.quantize_int8_role) and V on CARRY_V_CHANNELS, the carried launch takes 128 registers on sm90.
# Kept off: the site's first mean lets the carried launch take the plain launches' leaner forms (LEAN_CARRIED: K's
# range pass, inline PTX, the register cap, the rounding's sign from x; 126 registers on sm90, at most 128 and no
# spills on sm89, sm100 and sm120), which on an H100 took its device time at Flux's shape from 78.0 to 65.1 µs and at
# Wan2.1's from 883 to 699 (bench/NOTES.md, round "V's codes through a tensor descriptor, and the lean carried
# launch")
CARRY_K_MEAN = False
LEAN_CARRIED = True
# where the lean carried launch takes neither the register cap nor the rounding's sign from x: sm100's ptxas spilled
# 64 bytes in it under the cap (and took 146 registers uncapped with the sign from x, 128 without it)
UNCAPPED_CARRIED_ARCHS = (100,)
# channels per V program in a carried launch (launch_v_channels): V's range and sums of v - mean on a 64-channel
# tile took the launch to 168 registers on sm90 (three programs per multiprocessor), on 32 channels 128 (four)
CARRY_V_CHANNELS = 32
# with the rotary table inside the quantization, the carried launch as measured on an H100 (bench/NOTES.md, round
# "Statistics carried from step to step, …"): the site keeps its first call's K mean and V takes v_channels, 168
# registers on sm90. Carrying the rotated K's mean with V on 32 channels takes 153 (with 64 channels, 234), and
# with Q and K rotated 16 rows a slice (ROPE_CARRY_SUB; slice_rows) 96. On an H100 both were slower at Flux.1 (0.472
# and 0.460 ms against 0.424) and no faster at Wan2.1 (bench/NOTES.md, "The carried launches measured on the H100")
ROPE_CARRY_K_MEAN = False
ROPE_CARRY_V_CHANNELS = 64
ROPE_CARRY_SUB = 64
CARRY_SCRATCH = ("k_parts", "k_tickets", "v_diff_sums")  # quant_buffers that only a carried call writes


def fp16_tile_v_code_max(block_n: int) -> float:
    """The largest FP8 V code where each key tile's P·V lands in an FP16 accumulator (the Hopper kernels' two-level
    accumulation, the portable kernel's fp16_tiles): P ≤ 448, so block_n keys × 448 × 448 / (4 · block_n) = 50176
    stays under FP16's 65504. As 448 / 2^k, the codes are the usual ones times 2^-k (the same rounding) except below
    2^-6, e4m3's smallest normal: for values under 1.8% of a channel's range at 128 keys a tile, 0.9% at 64."""
    return FP8_E4M3_MAX / (4 * block_n)


def repair_rows(block_m: int) -> int:
    """Query rows the exact repair recomputes at a time (of a flagged tile's block_m): a whole 64-row tile at head dim
    128 in FP32 registers made ptxas fall back to 32 registers and a 12.5 KB stack per thread on sm90."""
    return min(REPAIR_ROWS, block_m)


def repair_constants(block_m: int, block_d: int, *, is_causal: bool, has_bias: bool, return_lse: bool,
                     rope: bool, arch: int) -> dict:
    """The exact repair's compile-time arguments and options after a kernel with query tiles of block_m rows, for
    a GPU of compute capability `arch` (90 for sm90; 0 where there is none)."""
    return dict(BLOCK_M=block_m, BLOCK_N=REPAIR_KEYS, BLOCK_D=block_d, IS_CAUSAL=is_causal, HAS_BIAS=has_bias,
                RETURN_LSE=return_lse, ROPE=rope, TILES=REPAIR_TILES, ROWS=repair_rows(block_m),
                DOT_PRECISION=REPAIR_DOT_PRECISION_SM90 if arch == 90 else REPAIR_DOT_PRECISION, num_warps=4,
                num_stages=1)


def device_arch(device: torch.device) -> int:
    """The GPU's compute capability as one number (90 for sm90), 0 off CUDA and in Triton's interpreter."""
    capability = None if interpreting() or device.type != "cuda" else tuning.cuda_capability(device)
    return capability[0] * 10 + capability[1] if capability else 0


def repair_grid(tiles: int, block_m: int) -> tuple[int, int]:
    """The repair's grid for a call of `tiles` query tiles: a program per REPAIR_TILES tiles and row slice."""
    return cdiv(tiles, REPAIR_TILES), block_m // repair_rows(block_m)


def cdiv(a: int, b: int) -> int:
    """Ceiling division of integers (triton.cdiv costs microseconds per host call: it is a Triton function)."""
    return -(-a // b)


def padded_head_dim(d: int) -> int:
    """Head dims run padded to a power of two (≥ 32, the INT8 MMA depth): 40 -> 64, 72/80/96 -> 128,
    160 -> 256."""
    return max(32, 1 << (max(d, 1) - 1).bit_length())


def stats_every(n: int) -> int:
    """Every how many STATS_TILE-key tiles K's statistics read one, for n keys: a power of two up to
    MAX_STATS_EVERY that leaves at least STATS_SAMPLE_KEYS keys sampled (1, all of them, below 1024 keys)."""
    every = 1
    while every < MAX_STATS_EVERY and n // (2 * every) >= STATS_SAMPLE_KEYS:
        every *= 2
    return every


def sampled_key_count(n: int, every: int) -> int:
    """How many of n keys K's statistics read: those in tiles whose index is a multiple of `every`."""
    full, rest = divmod(n, STATS_TILE * every)
    return full * STATS_TILE + min(rest, STATS_TILE)


def stats_chunks(n: int, every: int = 1) -> tuple[int, int]:
    """(chunks, rows per chunk) for the statistics pass: enough programs to fill the GPU, few enough
    partial rows that finishing them inside every quantization program stays cheap. A chunk starts on a
    sampled tile."""
    step = math.lcm(STATS_ROWS, STATS_TILE * every)
    rows = max(step, cdiv(cdiv(max(n, 1), MAX_STATS_CHUNKS), step) * step)
    return cdiv(max(n, 1), rows), rows


def v_channels(block_d: int) -> int:
    """Channels per program of V's quantization for a padded head dim."""
    return min(V_CHANNELS if block_d > 64 else V_CHANNELS_SMALL_HEADS, block_d)


def launch_v_channels(block_d: int, rope: bool, carried: bool) -> int:
    """Channels per program of V's quantization in a launch: v_channels, and in a carried launch (quantize_qkv's
    carry) at most CARRY_V_CHANNELS, or ROPE_CARRY_V_CHANNELS with the rotary table."""
    if not carried:
        return v_channels(block_d)
    return min(ROPE_CARRY_V_CHANNELS if rope else CARRY_V_CHANNELS, v_channels(block_d))


def carry_k_mean(rope: bool) -> bool:
    """Whether a carried call carries its K mean on (else its site keeps the first call's), with or without the
    rotary table."""
    return bool(ROPE_CARRY_K_MEAN if rope else CARRY_K_MEAN)


def stats_stages(rope: bool) -> int:
    """Stages of the statistics' loop (0: the look-ahead loop) for a quantization with or without the rotary table."""
    return ROPE_STATS_STAGES if rope else STATS_STAGES


def slice_rows(group: int, rows: int, rope: bool = False, carried: bool = False) -> int:
    """Rows per slice of an INT8 quantization program: QUANT_SUB, or the group where a group is longer than
    that but shorter than the program (the kernel finds a longer group's maximum before coding its slices). With a
    rotary table, ROPE_SUB and two passes over a longer group: a rotated slice holds four FP32 tiles (the values,
    their partners, two coefficients), 164-167 registers at 64 rows on sm90. Measured on an H100 (bench/NOTES.md,
    "The rotary table in the tile's layout"): 64-row slices as fast as or faster than 16 and 32 at every shape. A
    carried launch (quantize_qkv's carry) with the table: ROPE_CARRY_SUB."""
    if rope:
        return min(ROPE_CARRY_SUB if carried else ROPE_SUB, rows)
    return group if QUANT_SUB < group < rows else min(QUANT_SUB, rows)


def empty_range(rows: int, block_d: int, device) -> torch.Tensor:
    """A [rows, 2, block_d] FP32 range at (-inf, inf) made on the device by two fills: a tensor copied from the
    host would synchronise the host with the GPU on every call whose plan is too large to keep (call_plan)."""
    out = torch.full((rows, 2, block_d), float("inf"), device=device, dtype=torch.float32)
    out[:, 0].fill_(float("-inf"))
    return out


def quant_buffers(q, k, *, q_group: int, k_group: int, block_d: int, smooth_k: bool, smooth_v: bool,
                  pv_fp8: bool, q_in_kernel: bool = False) -> dict:
    """The buffers quantize_qkv writes (see there), and "v_padded", FP8 V's key count padded to V_PAD. With
    q_in_kernel, "q8" has its shape and no memory (the attention kernel codes Q itself)."""
    B, H, NQ = q.shape[:3]
    HK, NK = k.shape[1], k.shape[2]
    dev, f32 = q.device, torch.float32
    v_padded = cdiv(max(NK, 1), V_PAD) * V_PAD if pv_fp8 else 0
    need_v_stats = pv_fp8 or smooth_v
    # V's channels per program in the finest of the launches that may share these buffers (launch_v_channels)
    finest_v_block = min(launch_v_channels(block_d, rope, carried)
                         for rope in (False, True) for carried in (False, True))
    return {
        # per chunk of the statistics, K's sum and V's sum (kv_stats_chunk)
        "parts": torch.empty((B * HK, stats_chunks(NK, stats_every(NK))[0], 2, block_d), device=dev, dtype=f32),
        "q8": torch.empty((1, 1, block_d), device=dev, dtype=torch.int8).expand(B * H, NQ, block_d) if q_in_kernel
        else torch.empty((B * H, NQ, block_d), device=dev, dtype=torch.int8),
        "q_scale": torch.empty((B * H, cdiv(NQ, q_group)), device=dev, dtype=f32),
        "k8": torch.empty((B * HK, NK, block_d), device=dev, dtype=torch.int8),
        "k_scale": torch.empty((B * HK, cdiv(NK, k_group)), device=dev, dtype=f32),
        "k_mean": torch.empty((B * HK, block_d), device=dev, dtype=f32) if smooth_k else None,
        "v_mean": torch.empty((B * HK, block_d), device=dev, dtype=f32) if need_v_stats else None,
        "v8": torch.empty((B * HK, block_d, v_padded), device=dev, dtype=torch.float8_e4m3fn) if pv_fp8 else None,
        "v_scale": torch.empty((B * HK, block_d), device=dev, dtype=f32) if pv_fp8 else None,
        # per program of V's quantization, the per-channel sum of its dequantized FP8 codes (quantize_qkv's v_shift)
        "v_code_sums": torch.empty((B * HK, cdiv(v_padded, V_ROWS), block_d), device=dev, dtype=f32)
        if pv_fp8 else None,
        # a ticket per head and V channel block: the V program that finds it last sets it back to 0, resets V's
        # range and, when quantize_qkv is given where to write it, writes the output shift
        # (as many as the finest launch's channel blocks: every ticket is back at 0 between launches)
        "v_tickets": torch.zeros(B * HK * (block_d // finest_v_block), device=dev, dtype=torch.int32)
        if pv_fp8 else None,
        # V's range per head and channel, (max, min), which the statistics' atomics fold into; the last V program of
        # each head and channel block sets it back to (-inf, inf) for the next call
        "v_range": empty_range(B * HK, block_d, dev) if pv_fp8 else None,
        # a call with carried statistics (quantize_qkv's carry): each K program's sum of k - mean, a ticket per head
        # that the last K program sets back to 0, and each V program's sum of v - mean
        "k_parts": torch.empty((B * HK, cdiv(NK, max(QUANT_ROWS, q_group, k_group)), block_d), device=dev, dtype=f32)
        if pv_fp8 else None,
        "k_tickets": torch.zeros(B * HK, device=dev, dtype=torch.int32) if pv_fp8 else None,
        "v_diff_sums": torch.empty((B * HK, cdiv(v_padded, V_ROWS), block_d), device=dev, dtype=f32)
        if pv_fp8 else None,
        "v_padded": v_padded,
    }


def tensor_signature(t: torch.Tensor) -> tuple:
    """What a call plan's kernels specialise on in a caller's tensor (with shape and strides, which size its
    buffers and grids)."""
    return t.dtype, t.shape, t.stride(), t.data_ptr() % 16 == 0


def rope_table(rope: torch.Tensor | None) -> torch.Tensor | None:
    """The rotary table in the kernels' layout (kernels/rotary.py): [Bp, Hp, N, 2, D] FP32, contiguous, row 0 of a
    token each channel's own coefficient, row 1 its partner's, from ComfyUI's pe [Bp, Hp, N, D/2, 2, 2] (any
    strides, FP32 or the model's dtype: widened exactly). A table already in that layout is returned as it is
    (16-bit ones too: the kernels widen its values as they load them).
    One copy of the table's bytes per call (4.7 MB at Flux.1's 1024 px)."""
    if rope is None or rope.dim() == 5:
        return rope
    matrices = rope.flatten(-2)  # [..., D/2, 4]: pe[i, 0, 0], pe[i, 0, 1], pe[i, 1, 0], pe[i, 1, 1]
    # pe[i, j, j], channel 2i + j's own coefficient, and pe[i, j, 1 - j], its partner's: both views, one copy
    table = torch.stack((matrices[..., 0::3], matrices[..., 1:3]), dim=-3)
    return table.flatten(-2).to(torch.float32).contiguous()


def rope_strides(table: torch.Tensor | None) -> tuple:
    """The rotary table's (rope_table's layout) batch, head and token strides as the kernels take them, a stride
    of 0 along a batch or head axis of size 1 (the table broadcasts there), its layout checked; without a table,
    zeros (a buffer of the call's then takes its place, never read). What a call plan keeps, as the table's shape,
    strides and dtype are in its signature."""
    if table is None:
        return (0, 0, 0)
    if table.dim() != 5 or table.shape[3] != 2 or table.stride()[3:] != (table.shape[4], 1):
        raise ValueError(f"rotary table of shape {tuple(table.shape)} and strides {tuple(table.stride())}: the "
                         "kernels take launch.rope_table's contiguous [B, H, N, 2, D] layout")
    return (0 if table.shape[0] == 1 else table.stride(0), 0 if table.shape[1] == 1 else table.stride(1),
            table.stride(2))


def launch_now(site: str, fn, grid: tuple, args: tuple, kwargs: dict) -> None:
    """A launch outside any call plan (the `run` of quantize_qkv's and hopper_launch's callers without one)."""
    run_kernel(fn, grid, args, kwargs)


def quantize_qkv(q, k, v, *, q_group: int, k_group: int, block_d: int, q_multiplier: float, smooth_k: bool,
                 smooth_v: bool, pv_fp8: bool, pv_key_order: bool = False,
                 v_code_max: float = FP8_E4M3_MAX, buffers: dict | None = None, run=launch_now,
                 v_shift: torch.Tensor | None = None, rope: torch.Tensor | None = None, derive=None,
                 q_in_kernel: bool = False, carry: torch.Tensor | None = None) -> dict:
    """All quantization of one call in at most two launches of quantize_kernel: K's and V's statistics (K's over
    a sample of the keys from 1024 on, stats_every) with Q's INT8 codes, then K's INT8 codes and V's (which need
    the statistics); with nothing to smooth, Q's and K's codes in one. q_in_kernel: Q is left to the attention
    kernel (hopper_launch.codes_q_in_kernel): no Q codes or scales are written.

    q: [B, H, NQ, D], k/v: [B, HK, NK, D] views with any strides. Returns (and writes, where a call plan gives
    them, `buffers`: quant_buffers of the same arguments) a dict of
    q8 [B*H, NQ, block_d] int8, q_scale [B*H, ceil(NQ/q_group)], k8 [B*HK, NK, block_d] int8,
    k_scale [B*HK, ceil(NK/k_group)], k_mean [B*HK, block_d] (the sample's mean taken off K; None when not
    smoothed), v_mean [B*HK, block_d] (V's mean, with FP8 V or V smoothing, else None), and with
    pv_fp8 v8 [B*HK, block_d, v_padded] FP8 e4m3 codes up to ±v_code_max, v_scale [B*HK, block_d] and
    v_code_sums [B*HK, programs, block_d] (each V program's per-channel sums of its dequantized codes) and v_range
    [B*HK, 2, block_d] (V's maximum and minimum while the call runs; back at (-inf, inf) after it);
    pv_key_order stores v8's keys in the order the Hopper kernel's P operand takes them. run: a call plan's
    launcher. rope: None, or a rotary table (ComfyUI's pe, or rope_table's layout) Q and K are coded rotated by.
    derive: a call plan's CallPlan.derive, which keeps what the shapes fix (quant_launches, and the launches'
    arguments from the plan's buffers to the sizes) for the plan's later calls instead of working it out again on
    each.

    v_shift: with pv_fp8, a [B*HK, block_d] FP32 buffer for the output shift, the vector the attention kernels add
    to their output: V's mean minus the mean of its dequantized FP8 codes (the smoothed V's, when it was), so that
    the dequantized V has exactly V's mean. The last V program of each head and channel block writes it, from
    every program's code sums (quant_kernels.finish_v_block); with no buffer it is not made. Long-sequence attention
    is nearly flat (an output row is close to V's mean), so the systematic part of V's rounding error, its mean
    over the keys, does not average out the way its random part does: taking it off cut the relative L1 error at
    32k keys from 0.038 to 0.034 without V smoothing, and from 0.045 to 0.034 with it (exact-arithmetic reference
    on the CPU), where smoothing alone made it worse. A uniform attention row then returns V's mean. Made as a
    launch of its own, and before that with PyTorch's sum and scaled add, it cost a launch per call (11-14 µs of
    a call at SDXL's and Flux's shapes on the H200 for PyTorch's two; bench/NOTES.md, rounds "Chained launches,
    and the output shift in one launch" and "Three cuts to a program's fixed cost and one launch fewer").

    carry: a call site's carried statistics ([B*HK, 3, block_d] FP32: K's mean, V's mean, V's scale with its
    margin; kernels/carried_stats.py), with pv_fp8 and v_shift only: then one launch codes Q, K and V with them
    instead of this call's statistics, and carries this call's to the next (quant_kernels.finish_k_block and
    finish_v_block). k_mean then holds the carried mean the K codes took off, v_mean this call's mean.
    """
    rope = rope_table(rope)
    out = buffers if buffers is not None else quant_buffers(
        q, k, q_group=q_group, k_group=k_group, block_d=block_d, smooth_k=smooth_k, smooth_v=smooth_v,
        pv_fp8=pv_fp8, q_in_kernel=q_in_kernel)
    need_v_stats = pv_fp8 or smooth_v
    finish_shift = pv_fp8 and v_shift is not None
    carried = carry is not None
    if carried and not finish_shift:
        raise ValueError("quantize_qkv: carried statistics need FP8 P·V and an output shift buffer")

    def layout():
        return quant_launches(q, k, q_group=q_group, k_group=k_group, block_d=block_d, smooth_k=smooth_k,
                              smooth_v=smooth_v, pv_fp8=pv_fp8, pv_key_order=pv_key_order, finish_shift=finish_shift,
                              rope=rope is not None, v_padded=out["v_padded"], q_in_kernel=q_in_kernel,
                              carried=carried)

    def fixed_arguments():
        """The launches, and their arguments from the buffers to the sizes: all fixed by a plan's signature (its
        buffers, the inputs' strides and shapes)."""
        sizes, tail, launches = layout()
        dummy = out["q_scale"]  # stands in for buffers a launch does not write
        middle = (out["parts"], out["v_range"] if pv_fp8 else dummy, out["q8"], out["q_scale"], out["k8"],
                  out["k_scale"], out["k_mean"] if smooth_k else dummy, out["v8"] if pv_fp8 else dummy,
                  out["v_scale"] if pv_fp8 else dummy, out["v_mean"] if need_v_stats else dummy,
                  out["v_code_sums"] if pv_fp8 else dummy, v_shift if finish_shift else dummy,
                  out["v_tickets"] if pv_fp8 else dummy, out["k_parts"] if pv_fp8 else dummy,
                  out["k_tickets"] if pv_fp8 else dummy, out["v_diff_sums"] if pv_fp8 else dummy, *q.stride(),
                  *k.stride(), *v.stride(), *sizes)
        return middle, tail, launches, rope_strides(rope)

    middle, tail, launches, table_strides = derive("quant_launches_carried" if carried else "quant_launches",
                                                   fixed_arguments) if derive is not None else fixed_arguments()
    args = (q, k, v, carry if carried else out["q_scale"], *middle, float(q_multiplier), out["v_padded"],
            float(v_code_max), *tail, rope if rope is not None else out["q_scale"], *table_strides)
    for site, grid, kwargs in launches:
        run(site, quantize_kernel, grid, args, kwargs)
    return out


def lean_launch(rope: bool, carried: bool) -> bool:
    """Whether a launch takes the leaner coding forms (inline PTX, the register cap, the rounding's sign from x): the
    plain two launches, and with LEAN_CARRIED the carried launch without the rotary table that keeps its site's K
    mean (its K programs then take the range pass, as the plain K launch does)."""
    if rope:
        return False
    return not carried or (LEAN_CARRIED and not carry_k_mean(rope))


def inline_ptx(rope: bool, carried: bool) -> bool:
    """Whether the quantization's launches take INLINE_PTX's forms (never under the interpreter, which runs no PTX;
    not with the rotary table nor in the carried launches but lean_launch's, where they cost registers)."""
    return INLINE_PTX and lean_launch(rope, carried) and not interpreting()


def capped_launch(pv_fp8: bool, rope: bool, carried: bool, arch: int) -> bool:
    """Whether a launch is one QUANT_MAX_REGISTERS may cap: lean_launch's with FP8 P·V, but the carried one on
    UNCAPPED_CARRIED_ARCHS."""
    return pv_fp8 and lean_launch(rope, carried) and not (carried and arch in UNCAPPED_CARRIED_ARCHS)


def capped_quantization(pv_fp8: bool, rope: bool, carried: bool, arch: int = 0) -> bool:
    """Whether the quantization's launches take QUANT_MAX_REGISTERS as ptxas's cap (never under the interpreter;
    capped_launch's: the full carried launch spilled under it for sm100)."""
    return bool(QUANT_MAX_REGISTERS) and capped_launch(pv_fp8, rope, carried, arch) and not interpreting()


def sign_from_x(pv_fp8: bool, rope: bool, carried: bool, arch: int = 0) -> bool:
    """Whether the INT8 codes take their rounding's sign from the coded value (SIGN_FROM_X): in the launches that
    QUANT_MAX_REGISTERS caps on the GPU, and under the interpreter in the same launches, so that the CPU's tests run
    the form the GPU runs."""
    return SIGN_FROM_X and capped_launch(pv_fp8, rope, carried, arch) and (bool(QUANT_MAX_REGISTERS) or interpreting())


def quant_launches(q, k, *, q_group: int, k_group: int, block_d: int, smooth_k: bool, smooth_v: bool, pv_fp8: bool,
                   pv_key_order: bool, finish_shift: bool, rope: bool, v_padded: int,
                   q_in_kernel: bool = False, carried: bool = False) -> tuple[tuple, tuple, list]:
    """What the shapes and switches of quantize_qkv's call fix: quantize_kernel's size arguments (BH .. k_groups),
    its (n_v_programs, inv_keys, carry_margin), and its launches [(site, grid, compile-time arguments)], statistics'
    first; with `carried` (quantize_qkv's carry) one launch of Q's, K's and V's codes."""
    B, H, NQ, D = q.shape
    HK, NK = k.shape[1], k.shape[2]
    k_every = stats_every(NK)
    arch = device_arch(q.device)
    n_chunks, chunk_rows = stats_chunks(NK, k_every)
    need_v_stats = pv_fp8 or smooth_v
    stats = smooth_k or need_v_stats
    rows = max(QUANT_ROWS, q_group, k_group)
    n_v_programs = cdiv(v_padded, V_ROWS) if pv_fp8 else 1
    sizes = (B * H, B * HK, H, HK, NQ, NK, D, n_chunks, chunk_rows, k_every, sampled_key_count(NK, k_every),
             cdiv(NQ, q_group), cdiv(NK, k_group))
    tail = (n_v_programs, 1.0 / max(NK, 1), CARRY_MARGIN)
    constants = dict(ROWS=rows, Q_SUB=slice_rows(q_group, rows, rope, carried),
                     K_SUB=slice_rows(k_group, rows, rope, carried),
                     Q_GROUP=q_group, K_GROUP=k_group, BLOCK_D=block_d, STATS_TILE=STATS_TILE,
                     STATS_CHUNKS=MAX_STATS_CHUNKS, SMOOTH_K=smooth_k, V_STATS=need_v_stats, V_ROWS=V_ROWS,
                     CHANNELS=launch_v_channels(block_d, rope, carried),
                     SMOOTH_V=smooth_v, PV_FP8=pv_fp8,
                     INTERPRETING=interpreting(), PV_KEY_ORDER=pv_key_order, FINISH_SHIFT=finish_shift,
                     SHIFT_PROGRAMS=SHIFT_PROGRAMS, ROPE=rope, STATS_AHEAD=STATS_AHEAD, STATS_STAGES=stats_stages(rope),
                     CARRIED=carried, CARRY_K=carried and smooth_k and carry_k_mean(rope), RANGE_PASS=RANGE_PASS,
                     INLINE_PTX=inline_ptx(rope, carried),
                     SIGN_FROM_X=sign_from_x(pv_fp8, rope, carried, arch),
                     WARPS=QUANT_WARPS, num_warps=QUANT_WARPS,  # WARPS: quantize_v_tile's layout steer
                     **({"maxnreg": QUANT_MAX_REGISTERS} if capped_quantization(pv_fp8, rope, carried, arch) else {}))
    # the statistics' chunks first: they are the longest programs, and blocks are dispatched in grid order
    do_q = int(not q_in_kernel)
    v_blocks = block_d // constants["CHANNELS"] if need_v_stats else 0
    if carried:
        passes = [dict(DO_STATS=0, DO_Q=do_q, DO_K=1, V_BLOCKS=v_blocks)]
    elif stats:
        passes = [dict(DO_STATS=1, DO_Q=do_q, DO_K=0, V_BLOCKS=0), dict(DO_STATS=0, DO_Q=0, DO_K=1, V_BLOCKS=v_blocks)]
    else:
        passes = [dict(DO_STATS=0, DO_Q=do_q, DO_K=1, V_BLOCKS=0)]
    launches = []
    for roles in passes:
        role_programs = [(n_chunks, roles["DO_STATS"]), (cdiv(NQ, rows), roles["DO_Q"]),
                         (cdiv(NK, rows), roles["DO_K"]), (n_v_programs, roles["V_BLOCKS"])]
        grid = (max(max(n, 1) for n, count in role_programs if count), max(B * H, B * HK) if roles["DO_Q"] else B * HK,
                sum(count for _, count in role_programs))
        site = "quantize_" + "_".join(name for name, on in (("stats", roles["DO_STATS"]), ("q", roles["DO_Q"]),
                                                             ("k", roles["DO_K"]), ("v", roles["V_BLOCKS"]),
                                                             ("carried", carried)) if on)
        launches.append((site, grid, {**constants, **roles}))
    return sizes, tail, launches


def quantize_int8(x: torch.Tensor, group: int, block_d: int, multiplier: float = 1.0):
    """INT8 codes [B, H, N, block_d] and FP32 scales [B, H, ceil(N/group)] of x * multiplier (the Q path of
    the fused quantization kernel on its own)."""
    B, H, N, D = x.shape
    out = quantize_qkv(x, x[:, :, :0], x[:, :, :0], q_group=group, k_group=group, block_d=block_d,
                       q_multiplier=multiplier, smooth_k=False, smooth_v=False, pv_fp8=False)
    return out["q8"].view(B, H, N, block_d), out["q_scale"].view(B, H, -1)


def quant_groups(q_group: int, k_group: int, config: tuning.LaunchConfig) -> tuple[int, int]:
    """Rows per INT8 scale as the kernels take them: Q groups never straddle a Q tile, and k_group 0 means
    one K scale per key tile."""
    return min(q_group, config.block_m), k_group or config.block_n


def portable_fp16_tiles(config: tuning.LaunchConfig, pv_fp8: bool) -> bool:
    """Whether the portable kernel runs this configuration's FP8 P·V with FP16 tile accumulators (fp16_tiles; an
    in-place accumulation, pv_direct, takes precedence)."""
    return pv_fp8 and config.fp16_tiles and not config.pv_direct


def runs_hopper_kernel(q, k, v, *, config: tuning.LaunchConfig, k_group: int, pv_fp8: bool, is_causal: bool,
                       has_bias: bool) -> bool:
    """Whether sage_forward runs this call on the Hopper Gluon kernel (k_group as quant_groups gives it); FP16
    P·V where it reads the call's V as it is (hopper_launch.v_tiles)."""
    D = q.shape[-1]
    block_d = padded_head_dim(D)
    v_tiles = not pv_fp8 and hopper_launch.v_tiles(v, block_d)
    return hopper_launch.serves(q.device, config=config, pv_fp8=pv_fp8, is_causal=is_causal, has_bias=has_bias,
                                head_dim=D, block_d=block_d, k_group=k_group, kv_len=k.shape[2], v_tiles=v_tiles)


def hopper_paths(q, k, v, *, config: tuning.LaunchConfig, k_group: int, pv_fp8: bool, is_causal: bool,
                 has_bias: bool, rope: bool) -> tuple[bool, bool]:
    """(whether sage_forward runs this call on the Hopper kernel, whether that kernel codes Q itself: then no
    quantization pass writes Q's codes, and the kernel reads the call's Q; hopper_launch.codes_q_in_kernel)."""
    pipelined = runs_hopper_kernel(q, k, v, config=config, k_group=k_group, pv_fp8=pv_fp8, is_causal=is_causal,
                                   has_bias=has_bias)
    return pipelined, pipelined and hopper_launch.codes_q_in_kernel(q, config=config, block_d=padded_head_dim(
        q.shape[-1]), pv_fp8=pv_fp8, rope=rope)


def sage_forward(q, k, v, out, *, sm_scale: float, is_causal: bool, bias, q_group: int, k_group: int,
                 pv_fp8: bool, smooth_k: bool, smooth_v: bool, return_lse: bool, config: tuning.LaunchConfig,
                 repair_counter=None, rope=None, carry_key=None):
    """Run quantization and attention; writes `out` ([B, H, Nq, D] view) and returns (lse, bad): bad holds a
    flag per query row ([B·H·Nq] int8, 1 where the row's output came out non-finite), valid until the next call
    of this shape.

    q_group: query rows per INT8 scale (capped at the Q tile); k_group: keys per scale, 0 for one per tile.
    repair_counter: a 1-element int32 device tensor: tiles with a non-finite output are then recomputed
    exactly on the device (no host synchronisation) and counted into it; None skips the guard.

    bias: None or an FP32 [Bb, Hb, Nk] additive bias in log2 units, Bb in {1, B}, Hb in {1, H}.
    rope: None or a rotary table Q and K are rotated by (quantize_qkv's rope; the repair rotates them too). The
    LSE's correction for K's smoothing reads the caller's Q: with a table, return_lse is not taken.

    Where kernels/head_groups.py allows it, the call runs as groups of heads on streams of their own, each with
    the plan its call plan keeps for it.

    carry_key: a hashable name of the call site (e.g. a model's block and call) whose statistics carry from one
    call to the next (kernels/carried_stats.py): taken with FP8 P·V, the guard on (repair_counter), no LSE and no
    head groups, else ignored.
    """
    if rope is not None and return_lse:
        raise ValueError("sage_forward: return_lse with a rotary table is not supported (rotate Q and K first)")
    rope = rope_table(rope)  # once for the quantization and the repair
    q_group, k_group = quant_groups(q_group, k_group, config)
    # FP8 P·V accumulated in place runs in the tensor cores' reduced-precision accumulator: with a per-channel
    # offset in V (projections with a bias) the output lost 0.26 relative L1 at 16k keys. V smoothing (exact:
    # the mean is added back) removes the offset, and with it the loss (0.0014, as two-level accumulation).
    smooth_v = smooth_v or (pv_fp8 and config.pv_direct)
    # FP16 P·V multiplies an FP16/BF16 V as it is: subtracting V's mean would only add a rounding of V - mean to
    # V's own type (relative L1 0.0122 -> 0.0152 against exact attention in the reference, 0.013 -> 0.022 in the
    # portable kernel, bench/NOTES.md). An FP32 V keeps the option (its products run in TF32).
    smooth_v = smooth_v and (pv_fp8 or v.dtype == torch.float32)
    switches = dict(sm_scale=sm_scale, is_causal=is_causal, bias=bias, q_group=q_group, k_group=k_group,
                    pv_fp8=pv_fp8, smooth_k=smooth_k, smooth_v=smooth_v, return_lse=return_lse, config=config,
                    repair_counter=repair_counter, rope=rope)
    signature = (q.device, tensor_signature(q), tensor_signature(k), tensor_signature(v), tensor_signature(out),
                 tensor_signature(bias) if bias is not None else None,
                 tensor_signature(repair_counter) if repair_counter is not None else None,
                 tensor_signature(rope) if rope is not None else None,
                 config, q_group, k_group, pv_fp8, smooth_k, smooth_v, return_lse, is_causal, interpreting(),
                 head_groups.GROUPS, head_groups.ANY_PATH)
    plan = PLANS.plan(q.device, signature, lambda: call_buffers(q, k, v, split=True, **switches))
    groups = plan.buffers.get("head_groups")
    if groups is None:
        carry = None
        if carry_key is not None and pv_fp8 and repair_counter is not None and not return_lse and \
                carried_stats.serves(rope is not None):
            carry = carried_stats.SITES.site((carry_key, signature), q.shape[0] * k.shape[1],
                                             padded_head_dim(q.shape[-1]), q.device)
        return run_plan(plan, q, k, v, out, carry=carry, **switches)

    def call_group(group):
        h0, h1, kh0, kh1, group_plan = group
        run_plan(group_plan, q[:, h0:h1], k[:, kh0:kh1], v[:, kh0:kh1], out[:, h0:h1], **switches)

    head_groups.run(q.device, groups, call_group)
    return None, plan.buffers["bad"]


def call_buffers(q, k, v, *, split: bool, bad: torch.Tensor | None = None, **switches) -> dict:
    """A call plan's buffers for sage_forward's call (switches: run_plan's keyword arguments), decided once per
    plan: whether the Hopper kernel serves (with the share of the tail split it needs) and whether it codes Q
    itself. With `split`, where head_groups.bounds splits the call: {"head_groups": [(h0, h1, kh0, kh1, the group's
    CallPlan)], "bad": the call's row flags}, the groups' own plans writing their rows' flags into parts of it and
    splitting no tail. bad: the flags' buffer to use (a group's part of its call's)."""
    B, H, NQ, D = q.shape
    HK, NK = k.shape[1], k.shape[2]
    block_d = padded_head_dim(D)
    config, pv_fp8, has_bias, rope = switches["config"], switches["pv_fp8"], switches["bias"] is not None, \
        switches["rope"]
    pipelined, q_in_kernel = hopper_paths(q, k, v, config=config, k_group=switches["k_group"], pv_fp8=pv_fp8,
                                          is_causal=switches["is_causal"], has_bias=has_bias, rope=rope is not None)
    groups = head_groups.bounds(q, k, pipelined=pipelined, ping_pong=config.ping_pong, pv_fp8=pv_fp8,
                                return_lse=switches["return_lse"], has_bias=has_bias,
                                is_causal=switches["is_causal"], rope=rope) if split else None
    if groups is not None:
        bad = torch.empty(B * H * NQ, device=q.device, dtype=torch.int8)
        return {"bad": bad, "head_groups": [
            (h0, h1, kh0, kh1, CallPlan(call_buffers(q[:, h0:h1], k[:, kh0:kh1], v[:, kh0:kh1], split=False,
                                                     bad=bad[h0 * NQ:h1 * NQ], **switches)))
            for h0, h1, kh0, kh1 in groups]}
    buffers = quant_buffers(q, k, q_group=switches["q_group"], k_group=switches["k_group"], block_d=block_d,
                            smooth_k=switches["smooth_k"], smooth_v=switches["smooth_v"], pv_fp8=pv_fp8,
                            q_in_kernel=q_in_kernel)
    buffers["v_shift"] = torch.empty((B * HK, block_d), device=q.device, dtype=torch.float32) if pv_fp8 else None
    buffers["bad"] = bad if bad is not None else torch.empty(B * H * NQ, device=q.device, dtype=torch.int8)
    buffers["pipelined"], buffers["q_in_kernel"] = pipelined, q_in_kernel
    buffers.update(hopper_launch.tail_buffers(config, B * H, NQ, NK, block_d, q.device) if pipelined and split
                   else {"tail_split": None, "tail_o": None, "tail_lse": None})
    return buffers


def run_plan(plan: CallPlan, q, k, v, out, *, sm_scale: float, is_causal: bool, bias, q_group: int, k_group: int,
             pv_fp8: bool, smooth_k: bool, smooth_v: bool, return_lse: bool, config: tuning.LaunchConfig,
             repair_counter, rope, carry: carried_stats.CarriedSite | None = None):
    """sage_forward's call on one plan (call_buffers' without groups): the quantization, the attention and the
    repair; q_group, k_group and smooth_v as sage_forward settles them, rope in rope_table's layout. carry: the
    call site's carried statistics: the quantization codes with them once primed, and the first call primes
    them."""
    B, H, NQ, D = q.shape
    HK, NK = k.shape[1], k.shape[2]
    block_d = padded_head_dim(D)
    block_m, block_n = config.block_m, config.block_n
    grid = (cdiv(NQ, block_m), B * H)
    pipelined = plan.buffers["pipelined"]
    fp16_tiles = hopper_launch.two_level(config, pv_fp8) if pipelined else portable_fp16_tiles(config, pv_fp8)
    qz = quantize_qkv(q, k, v, q_group=q_group, k_group=k_group, block_d=block_d, q_multiplier=sm_scale * LOG2E,
                      smooth_k=smooth_k, smooth_v=smooth_v, pv_fp8=pv_fp8, pv_key_order=pipelined,
                      v_code_max=fp16_tile_v_code_max(block_n) if fp16_tiles else FP8_E4M3_MAX,
                      buffers=plan.buffers, run=plan.run, v_shift=plan.buffers["v_shift"], rope=rope,
                      derive=plan.derive, q_in_kernel=plan.buffers["q_in_kernel"],
                      carry=carry.values if carry is not None and carry.primed else None)
    if carry is not None and not carry.primed:
        carry.prime(qz["k_mean"], qz["v_mean"], qz["v_scale"], CARRY_MARGIN)
    k_scale, k_mean = qz["k_scale"], qz["k_mean"]
    # FP8 P·V: the shift was written by the quantization's last launch; FP16 P·V: V's mean where V was smoothed
    # (quantize_qkv gives v_mean only then), else None
    v_shift = qz["v_shift"] if pv_fp8 else qz["v_mean"]
    v8, v_scale = (qz["v8"], qz["v_scale"]) if pv_fp8 else (k_scale, k_scale)

    lse = torch.empty((B, H, NQ), device=q.device, dtype=torch.float32) if return_lse else k_scale
    bad = qz["bad"]
    if bias is not None:
        bias_strides = (bias.stride(0) if bias.shape[0] > 1 else 0, bias.stride(1) if bias.shape[1] > 1 else 0)
    else:
        bias_strides = (0, 0)
    if pipelined:
        hopper_launch.launch(qz, out, lse, bad, heads=H, kv_heads=HK, q_group=q_group, v_shift=v_shift,
                             return_lse=return_lse, config=config, run=plan.run,
                             tma=plan.derive("tma", lambda: hopper_launch.descriptors(qz, config)),
                             v=None if pv_fp8 else v, derive=plan.derive,
                             q=q if plan.buffers["q_in_kernel"] else None, q_multiplier=sm_scale * LOG2E)
    else:
        def attention_launch():
            """The portable launch's arguments after the flags (strides and sizes) and its compile-time ones."""
            return (*v.stride(), *out.stride(), *bias_strides, H, H // HK, NQ, NK, D, qz["q_scale"].shape[-1],
                    k_scale.shape[-1], qz["v_padded"]), dict(
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, Q_GROUP=q_group, K_GROUP=k_group,
                PV_FP8=pv_fp8, SHIFT_V=v_shift is not None, IS_CAUSAL=is_causal, HAS_BIAS=bias is not None,
                RETURN_LSE=return_lse, BF16_DOT_IN_FP32=interpreting() and v.dtype == torch.bfloat16,
                FP8_ROUND_IN_FP32=interpreting(), EVEN_D=D == block_d, WARP_SPECIALIZE=config.warp_specialize,
                MAGIC_CONVERT=config.magic_convert, PV_DIRECT=config.pv_direct, PV_FP16_TILES=fp16_tiles,
                num_warps=config.num_warps, num_stages=config.num_stages,
                **({"maxnreg": config.max_registers} if config.max_registers and not interpreting() else {}))

        after, constants = plan.derive("attention_launch", attention_launch)
        plan.run("attention", sage_attention_fwd_kernel, grid, (
            qz["q8"], qz["q_scale"], qz["k8"], k_scale, v, v8, v_scale, v_shift if v_shift is not None else k_scale,
            bias if bias is not None else k_scale, out, lse, bad, *after), constants)
    if return_lse and k_mean is not None:
        # K smoothing shifted every score of a row by q·mean(K)·scale: add it back for the true LSE
        km = k_mean[:, :D].view(B, HK, D).repeat_interleave(H // HK, dim=1)
        lse += torch.einsum("bhnd,bhd->bhn", q.float(), km) * sm_scale
    if repair_counter is not None:  # after the LSE correction: repaired rows get their exact LSE
        def repair_launch():
            """The repair launch's strides and sizes, the rotary table's strides, and its compile-time arguments."""
            return (*q.stride(), *k.stride(), *v.stride(), *out.stride(), *bias_strides, H, H // HK, NQ, NK, D), \
                rope_strides(rope), repair_constants(block_m, block_d, is_causal=is_causal, has_bias=bias is not None,
                                                     return_lse=return_lse, rope=rope is not None,
                                                     arch=device_arch(q.device))

        sizes, table_strides, constants = plan.derive("repair_launch", repair_launch)
        tiles = grid[0] * grid[1]
        plan.run("repair", repair_tiles_kernel, repair_grid(tiles, block_m), (
            q, k, v, bias if bias is not None else k_scale, out, lse, bad, repair_counter, *sizes,
            sm_scale * LOG2E, rope if rope is not None else k_scale, *table_strides, grid[0], tiles), constants)
    return (lse if return_lse else None), bad


__all__ = ["padded_head_dim", "quant_groups", "quantize_qkv", "quantize_int8", "runs_hopper_kernel",
           "sage_forward", "LOG2E"]
