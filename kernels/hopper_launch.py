"""Launcher of the Hopper (sm90) Gluon kernel: which calls it serves, its TMA descriptors and its grid.

It takes the buffers of launch.quantize_qkv (made with pv_key_order=True) and, for FP16 P·V, the call's own V
(read as it is: v_tiles), and writes the same outputs as the portable kernel: the output, the per-program
non-finite flags and, on request, the LSE.
"""
from __future__ import annotations

import functools

import torch

from .tuning import LaunchConfig, cuda_capability, interpreting

try:  # Gluon's Hopper API (Triton ≥ 3.5); without it every call runs the portable kernel
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from .hopper_attention_kernel import sage_fwd_sm90_kernel, sage_fwd_sm90_pingpong_kernel
    from .tail_merge_kernel import sage_fwd_tail_merge_kernel
    AVAILABLE = True
except Exception:  # noqa: BLE001 - an older or newer Triton whose Gluon differs: the portable path serves
    AVAILABLE = False

HEAD_DIMS = (64, 128)
WARPGROUP_ROWS = 64  # query rows per consumer warpgroup (four warps of 16 rows)
# ping-pong: registers per thread of each consumer warpgroup, by their number; the producer warp keeps 24. Three
# warpgroups and the producer's (padded to four warps) share the multiprocessor's 64K: 3·128·160 + 128·24.
CONSUMER_REGISTERS = {2: 240, 3: 160}


def serves(device: torch.device, *, config: LaunchConfig, pv_fp8: bool, is_causal: bool, has_bias: bool,
           head_dim: int, block_d: int, k_group: int, kv_len: int, v_tiles: bool = False) -> bool:
    """True when this call can run the Hopper kernel: an sm90 GPU, a pipelined configuration (64 query rows
    per warpgroup), FP8 P·V or (v_tiles: TMA reads the call's FP16/BF16 V as it is) FP16 P·V, no causal mask
    and no key mask, a head dim of 64 or 128, one K scale per key tile, at least one full key tile (shorter key
    sequences are launch-bound: the portable kernel serves them); only the ping-pong kernel runs persistent or
    without turns; three consumer warpgroups only without turns, at head dim 64 and with FP8 P·V (at head dim 128,
    or with FP16 P·V's wider operand in Triton 3.9, their 160 registers a thread spill and serialise the wgmma);
    the skipped rescale (lazy_rescale) only in the ping-pong kernel accumulating in place.
    """
    return (AVAILABLE and config.pipelined and kv_len >= config.block_n and (pv_fp8 or v_tiles) and not is_causal
            and not has_bias
            and head_dim == block_d and block_d in HEAD_DIMS and k_group == config.block_n
            and config.block_m == WARPGROUP_ROWS and config.num_warps == 4
            and (config.ping_pong or not (config.persistent or config.no_turns))
            and (config.consumers == 2 or config.consumers == 3 and config.ping_pong and config.no_turns
                 and block_d == 64 and pv_fp8)
            and (not config.lazy_rescale or config.ping_pong and not two_level(config, pv_fp8))
            and not interpreting() and cuda_capability(device) == (9, 0))


# Whether the ping-pong kernel codes Q itself where it can (codes_q_in_kernel). Off: the kernel ran slower by more
# than the quantization saved (the H100 at Flux: 0.366-0.386 ms against 0.323, for 0.011 ms less quantization; the
# prologue costs ~7 µs a program; bench/NOTES.md, "Q coded inside the attention kernel, measured and not kept"). The
# benchmarks set it (bench/settings_ab.py); a call plan keeps what it was made with, until the plans are cleared.
Q_IN_KERNEL = False


def codes_q_in_kernel(q: torch.Tensor, *, config: LaunchConfig, block_d: int, pv_fp8: bool, rope: bool) -> bool:
    """Whether the Hopper kernel serving this call (serves) codes Q's INT8 tiles itself from the call's Q
    (hopper_attention_kernel.quantize_q) instead of reading codes a quantization pass wrote: the ping-pong kernel
    with FP8 P·V (where it was built and measured), no rotary table (Q is coded rotated by the quantization pass),
    and a Q with contiguous channels and aligned rows (v_tiles' conditions: 16-byte loads, and the descriptor that
    carries Q's type). The codes and scales are the pass's, bit for bit."""
    return (Q_IN_KERNEL and config.ping_pong and pv_fp8 and not rope and AVAILABLE and v_tiles(q, block_d))


def two_level(config: LaunchConfig, pv_fp8: bool = True) -> bool:
    """Whether the Gluon kernel of this configuration accumulates P·V per tile in FP16 (its FP8 V codes then
    stay within launch.fp16_tile_v_code_max), else in place (always with a 16-bit V: its products are FP32-exact)."""
    return pv_fp8 and not config.pv_direct


def aligned_16bit_rows(t: torch.Tensor) -> bool:
    """Whether `t` is FP16 or BF16 with contiguous channels and every other stride a positive multiple of 16 bytes
    (a dimension of size 1 aside) from a 16-byte aligned start: what TMA needs to read it as it is (v_tiles) and
    what the wide output stores promise the compiler (out_store)."""
    if t.dtype not in (torch.float16, torch.bfloat16) or t.stride(-1) != 1:
        return False
    return t.data_ptr() % 16 == 0 and all(s > 0 and s % 8 == 0 for n, s in zip(t.shape[:-1], t.stride()[:-1])
                                          if n > 1)


def v_tiles(v: torch.Tensor, block_d: int) -> bool:
    """Whether TMA reads the call's V ([B, HK, NK, D] in any layout: HND, NHD, a fused QKV projection's slice) as
    it is, in a 4-D descriptor (v_descriptor): an unpadded head dim, in aligned_16bit_rows."""
    return v.shape[-1] == block_d and aligned_16bit_rows(v)


def out_store(config: LaunchConfig, pv_fp8: bool = True, out: torch.Tensor | None = None) -> int:
    """How the Gluon kernel of this configuration writes its output tile (hopper_attention_kernel.store_output): 2,
    16-byte stores through shared memory; 1, 4-byte stores of channel pairs: with three consumer warpgroups (the
    round trip through shared memory read 1% slower than the pairs at head dim 64) and in the one-warpgroup kernel
    with FP16 P·V (there it spilled 16-24 bytes under the 168-register cap); 0, as the accumulator lays it out, for
    an `out` that is not 16-bit with contiguous channels and 16-byte aligned rows. Measured on the H200 against 0
    (docs/performance.md, "The output's store"): Flux 4.5% faster a call, B2 H32 N8192 D128 1.3-3.4%, Wan2.1 1.6%, SDXL
    1%; head dim 64 at 16k tokens 0.7% (pairs)."""
    if out is not None and not aligned_16bit_rows(out):
        return 0
    if config.ping_pong:
        return 1 if config.consumers == 3 else 2
    return 2 if pv_fp8 else 1


def kernel_constants(config: LaunchConfig, block_d: int, q_group: int, shift_v: bool, return_lse: bool,
                     pv_fp8: bool = True, out: torch.Tensor | None = None, q_in_kernel: bool = False) -> dict:
    """The compile-time arguments a configuration gives its Gluon kernel (the launch, with the call's `out`, and
    compile_for_sm90, without: an aligned output)."""
    constants = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=block_d, Q_GROUP=q_group,
                     STAGES=config.num_stages, TWO_LEVEL=two_level(config, pv_fp8), SHIFT_V=shift_v,
                     RETURN_LSE=return_lse, MAGIC=config.magic_convert,
                     OUT_STORE=out_store(config, pv_fp8, out))
    if config.ping_pong:
        constants["CONSUMERS"] = config.consumers
        constants["CONSUMER_REGS"] = CONSUMER_REGISTERS[config.consumers]
        constants["PERSISTENT"] = config.persistent
        constants["TURNS"] = not config.no_turns
        constants["LAZY_RESCALE"] = config.lazy_rescale
        constants["Q_REGS"] = q_in_registers(config, pv_fp8, q_in_kernel)
    return constants


# Where the kernel codes Q itself, its codes are read into registers in every configuration (rather than only with
# turns and FP8 P·V, q_in_registers); bench/settings_ab.py times both
IN_KERNEL_Q_REGISTERS = False


def q_in_registers(config: LaunchConfig, pv_fp8: bool, q_in_kernel: bool = False) -> bool:
    """Whether the ping-pong kernel reads Q's codes into registers once per work item (scores_operand): with turns
    and FP8 P·V (each turn is shorter; Wan2.1 2-4% faster), and where it codes Q itself with
    IN_KERNEL_Q_REGISTERS."""
    return (not config.no_turns and pv_fp8) or (q_in_kernel and IN_KERNEL_Q_REGISTERS)


@functools.lru_cache(maxsize=None)
def shared_layout(block: tuple[int, int], dtype) -> "gl.NVMMASharedLayout":
    """The swizzled shared-memory layout of a TMA tile: made once per tile shape (6 µs of host time each, three
    per call, where a short call's device time is a few hundred µs)."""
    return gl.NVMMASharedLayout.get_default_for(list(block), dtype)


def descriptor(t: torch.Tensor, block: list[int], dtype) -> "TensorDescriptor":
    """A TMA descriptor over `t` (contiguous in its last dimension) in tiles of `block`. A dimension of size 1
    takes any stride in PyTorch; TMA is given a valid one (16 bytes)."""
    strides = [s if n > 1 or i == t.dim() - 1 else 16 // t.element_size()
               for i, (n, s) in enumerate(zip(t.shape, t.stride()))]
    return TensorDescriptor(t, list(t.shape), strides, block, shared_layout(tuple(block), dtype))


GL_TYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}


def descriptors(qz: dict, config: LaunchConfig) -> tuple:
    """The TMA descriptors of Q's, K's and (FP8 P·V) V's codes (launch.quantize_qkv's buffers) in this
    configuration's tiles: made once per call plan, whose buffers stay put. Q's is None where the kernel codes Q
    itself (qz's "q_in_kernel": `launch` then gives the call's Q, q_descriptor)."""
    q8, k8, v8 = qz["q8"], qz["k8"], qz["v8"]
    block_d = q8.shape[-1]
    codes = (None if qz.get("q_in_kernel") else descriptor(q8.view(-1, block_d), [config.block_m, block_d], gl.int8),
             descriptor(k8.view(-1, block_d), [config.block_n, block_d], gl.int8))
    if v8 is None:
        return codes
    return (*codes, descriptor(v8.view(-1, v8.shape[-1]), [block_d, config.block_n], gl.float8e4nv))


def q_descriptor(q: torch.Tensor, config: LaunchConfig):
    """A TMA descriptor of the call's own Q [B, H, NQ, D] (v_tiles' conditions) in tiles of one head's query tile,
    made per call, in q_desc's place where the ping-pong kernel codes Q itself (launch's `q`): its 16-bit type tells
    the kernel so (hopper_attention_kernel.quantize_q reads Q by pointer)."""
    return descriptor(q, [1, 1, config.block_m, q.shape[-1]], getattr(gl, GL_TYPES[q.dtype]))


def v_descriptor(v: torch.Tensor, config: LaunchConfig):
    """The TMA descriptor of the call's own V [B, HK, NK, D] (v_tiles) in tiles of one head's key tile, made per
    call: its address is the caller's, where a plan's buffers stay put. Its bounds are each head's: a ragged
    last tile's keys past NK arrive as zeros, whatever lies in memory there."""
    return descriptor(v, [1, 1, config.block_n, v.shape[-1]], getattr(gl, GL_TYPES[v.dtype]))


def launch(qz: dict, out: torch.Tensor, lse: torch.Tensor, bad: torch.Tensor, *, heads: int, kv_heads: int,
           q_group: int, v_shift, return_lse: bool, config: LaunchConfig, run, tma: tuple, v=None,
           derive=None, q=None, q_multiplier: float = 1.0) -> None:
    """One warpgroup per (query tile of 64 rows, batch·head), as the portable kernel's grid with BLOCK_M = 64;
    the ping-pong kernel puts `consumers` of them in a program, and splits its grid's last items as qz's
    "tail_split" says (tail_buffers, made with the call plan; the parts in its "tail_o" and "tail_lse", joined by a
    second launch). v_shift: None or the [B·HK, D] vector added to the output (launch.quantize_qkv's v_shift);
    run: the call plan's launcher; tma: `descriptors` of qz; v: None (FP8 P·V: V's codes in qz) or the call's V
    (FP16 P·V, v_tiles); derive: the call plan's CallPlan.derive, which keeps the launches' fixed parts
    (launch_parts) for the plan's later calls: only the call's own tensors (out, lse, bad, V's descriptor) are new.
    q: None (Q's codes in qz) or the call's Q, which the ping-pong kernel then codes itself (codes_q_in_kernel),
    times q_multiplier, with Q groups of q_group rows; qz's codes of Q then go unused."""
    def parts():
        return launch_parts(qz, out, heads=heads, kv_heads=kv_heads, q_group=q_group, v_shift=v_shift,
                            return_lse=return_lse, config=config, pv_fp8=v is None)

    attention, merge = derive("hopper_launch", parts) if derive is not None else parts()
    descs = tma if v is None else (*tma, v_descriptor(v, config))
    if q is not None:
        descs = (q_descriptor(q, config), *descs[1:])
    fn, grid, before, after, kwargs = attention
    # the ping-pong kernel's, used with q: the multiplier, and Q's pointer and its batch, head and row strides
    per_call = ((float(q_multiplier), *((q, *q.stride()[:3]) if q is not None else (qz["q_scale"], 0, 0, 0)))
                if config.ping_pong else ())
    run("attention", fn, grid, (*descs, *before, out, lse, bad, *after, *per_call), kwargs)
    if merge is not None:
        fn, grid, before, after, kwargs = merge
        run("tail merge", fn, grid, (*before, out, lse, bad, *after), kwargs)


def launch_parts(qz: dict, out: torch.Tensor, *, heads: int, kv_heads: int, q_group: int,
                 v_shift, return_lse: bool, config: LaunchConfig, pv_fp8: bool) -> tuple:
    """What `launch` launches, less the call's own tensors: for the attention and, where the grid's tail is split,
    the join (else None), each (kernel, grid, the arguments before the output, the LSE and the flags, those after
    them, the compile-time arguments). Everything here is fixed by a call plan's signature (its buffers stay put; the
    output's strides and alignment are in the signature), so a plan works it out once."""
    bh, nq, block_d = qz["q8"].shape
    nk = qz["k8"].shape[1]
    q_tiles = -(-nq // config.block_m)
    v_scale = qz["v_scale"] if pv_fp8 else qz["q_scale"]  # FP16 P·V: a placeholder, never read
    scales = (qz["q_scale"], qz["k_scale"], v_scale, v_shift if v_shift is not None else v_scale)
    sizes = (heads, heads // kv_heads, nq, nk, qz["q_scale"].shape[-1], qz["k_scale"].shape[-1])
    kwargs = {**kernel_constants(config, block_d, q_group, v_shift is not None, return_lse, pv_fp8, out,
                                 bool(qz.get("q_in_kernel"))),
              **compile_options(config)}
    items = work_items_per_head(config, nq)
    if not config.ping_pong:
        return (sage_fwd_sm90_kernel, (items, bh), scales, (*out.stride(), *sizes), kwargs), None
    whole, splits = qz.get("tail_split") or (items * bh, 1)
    grid = (min(items * bh, multiprocessors(out.device)),) if config.persistent else \
        (whole + (items * bh - whole) * splits,)
    # without split items the parts' buffers are never touched: any FP32 buffers keep one signature
    part_o, part_lse = (qz["tail_o"], qz["tail_lse"]) if splits > 1 else (qz["q_scale"], qz["q_scale"])
    attention = (sage_fwd_sm90_pingpong_kernel, grid, scales,
                 (part_o, part_lse, *out.stride(), *sizes, q_tiles, bh, whole, splits), kwargs)
    if splits == 1:
        return attention, None
    merge_programs = config.consumers * (items * bh - whole) * config.block_m // MERGE_ROWS
    merge = (sage_fwd_tail_merge_kernel, (merge_programs,), (part_o, part_lse),
             (*out.stride(), heads, nq, items, whole),
             dict(SPLITS=splits, TILES=config.consumers, BLOCK_M=config.block_m, ROWS=MERGE_ROWS, BLOCK_D=block_d,
                  RETURN_LSE=return_lse, num_warps=4))
    return attention, merge


# The grid's tail (bench/NOTES.md, "The grid's tail at Flux, measured"): a ping-pong program fills a
# multiprocessor, so the grid runs in waves of one program per multiprocessor, and a part-full last wave takes
# nearly as long as a full one (90% at Flux's shape on the H200, where it is 72 programs of 132). Split in
# `splits` key ranges, the last wave's items become programs of 1/splits the work that fill the machine better;
# a second launch joins their parts. Measured on the H200 (bench/NOTES.md, "The grid's tail, split"): 26 heads
# at Flux's length (7.09 waves, the 8th's 12 items in quarters) 3.8% faster a call, Flux at batch 2 2.7%; Flux
# itself (its 7th wave in thirds: a third of a 0.05 ms wave) level or 0.8% slower, the join's launch costing about
# what the split saved; Wan2.1 (a third of a 0.32 ms wave) 0.5% faster.
MAX_TAIL_SPLITS = 4  # more parts: more partial outputs to write and join, and shorter pipelines
MIN_TAIL_TILES = 4  # key tiles per part at least: the ring's depth, so that every part still pipelines
MERGE_ROWS = 32  # query rows per program of the join
# A wave's time per key of its items (head dim 128, the H200: 0.0496 ms a wave at Flux's 4608 keys,
# bench/results/h200_flux_grid_waves.json), and the least saving at that rate that pays for the join: Flux's
# predicted 0.0165 ms took 0.006 off the kernel, against 0.004 for the join and the gap before it.
WAVE_MS_PER_KEY = 0.0496 / 4608
MIN_TAIL_MS = 0.02
# "policy": split where split_last_wave says; "off": never; "forced": wherever a split ends the grid sooner, the
# threshold aside. The benchmarks set it to time calls both ways (bench/grid_waves.py --unsplit-too,
# bench/tail_split_ab.py); a call plan keeps the split it was made with (tail_buffers), until the plans are cleared.
TAIL_SPLIT = "policy"


def tail_split(config: LaunchConfig, items: int, kv_len: int, device: torch.device) -> tuple[int, int]:
    """(whole, splits): the ping-pong grid's first `whole` work items run whole, each later one as `splits`
    programs over key ranges (splits 1: no split). Persistent grids are never split. TAIL_SPLIT decides."""
    if TAIL_SPLIT == "off" or not config.ping_pong or config.persistent:
        return items, 1
    return split_last_wave(items, multiprocessors(device), kv_len, -(-kv_len // config.block_n),
                           TAIL_SPLIT == "forced")


@functools.lru_cache(maxsize=4096)
def split_last_wave(items: int, slots: int, kv_len: int, key_tiles: int, forced: bool = False) -> tuple[int, int]:
    """tail_split for `items` equal programs over kv_len keys in key_tiles tiles, on `slots` places at once:
    the last wave's items split in the number of parts (2 .. MAX_TAIL_SPLITS, at least MIN_TAIL_TILES key tiles
    each) that ends the grid soonest, if the time saved (by the count of programs, at WAVE_MS_PER_KEY) is at
    least MIN_TAIL_MS (forced: if it saves anything)."""
    tail = items % slots
    best_time, best = 1.0, 1  # the last wave's time, in waves
    for splits in range(2, min(MAX_TAIL_SPLITS, key_tiles // MIN_TAIL_TILES) + 1):
        time = -(-tail * splits // slots) / splits
        if time < best_time:
            best_time, best = time, splits
    saved_ms = (1.0 - best_time) * kv_len * WAVE_MS_PER_KEY
    if tail == 0 or best == 1 or not forced and saved_ms < MIN_TAIL_MS:
        return items, 1
    return items - tail, best


def tail_buffers(config: LaunchConfig, batch_heads: int, nq: int, kv_len: int, block_d: int,
                 device: torch.device) -> dict:
    """A call plan's share of the split: "tail_split", the (whole, splits) that tail_split gives this call, and
    the parts of its split items (FP32 outputs of every query tile of each part, and their LSE), None where it
    splits nothing."""
    items = work_items_per_head(config, nq) * batch_heads
    whole, splits = tail_split(config, items, kv_len, device)
    rows = (items - whole) * splits * config.consumers * config.block_m
    if splits == 1:
        return {"tail_split": None, "tail_o": None, "tail_lse": None}
    return {"tail_split": (whole, splits), "tail_o": torch.empty((rows, block_d), device=device, dtype=torch.float32),
            "tail_lse": torch.empty(rows, device=device, dtype=torch.float32)}


def work_items_per_head(config: LaunchConfig, nq: int) -> int:
    """The Gluon kernels' work items per batch·head for nq query rows: query tiles of block_m rows, one warpgroup
    each, `consumers` to a program in the ping-pong kernel. Without `persistent` each item is a program of the grid
    (bench/grid_waves.py counts the grid's waves with it)."""
    q_tiles = -(-nq // config.block_m)
    return -(-q_tiles // config.consumers) if config.ping_pong else q_tiles


@functools.lru_cache(maxsize=None)
def multiprocessors(device: torch.device) -> int:
    """The persistent kernel's grid: one program per multiprocessor (a ping-pong program fills one)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def compile_options(config: LaunchConfig) -> dict:
    """The compiler options of a configuration's Gluon kernel (the launch and compile_for_sm90): its warps, and
    its register cap where it has one (the ping-pong kernel sets its partitions' registers itself)."""
    options = {"num_warps": config.num_warps}
    if config.max_registers and not config.ping_pong:
        options["maxnreg"] = config.max_registers
    return options


POINTER_ARGS = ("Q_SCALE", "K_SCALE", "V_SCALE", "V_SHIFT", "OUT", "LSE", "BAD", "PART_O", "PART_LSE")


def compile_for_sm90(config: LaunchConfig, head_dim: int, pv_fp8: bool = True, shift_v: bool = False,
                     q_in_kernel: bool = False):
    """Compile the kernel a pipelined configuration launches, for sm90, on any machine (no GPU needed): what
    `bench/inspect_sass.py` disassembles and the code-generation tests check (bf16 output, no LSE; pv_fp8 False:
    FP16 P·V on a BF16 V; shift_v: V's mean added back, as every call accumulating FP8 P·V in place has it;
    q_in_kernel: the ping-pong kernel coding a BF16 Q itself)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    fn = sage_fwd_sm90_pingpong_kernel if config.ping_pong else sage_fwd_sm90_kernel
    m, n, d = config.block_m, config.block_n, head_dim
    descs = {"q_desc": ("bf16", [1, 1, m, d], gl.bfloat16) if q_in_kernel else ("i8", [m, d], gl.int8),
             "k_desc": ("i8", [n, d], gl.int8),
             "v_desc": ("fp8e4nv", [d, n], gl.float8e4nv) if pv_fp8 else ("bf16", [1, 1, n, d], gl.bfloat16)}
    consts = {**kernel_constants(config, d, 16, shift_v=shift_v, return_lse=False, pv_fp8=pv_fp8,
                                 q_in_kernel=q_in_kernel), "stride_od": 1}
    sig, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in descs:
            ty, shape, dtype = descs[name]
            layout = shared_layout(tuple(shape), dtype)
            sig[name] = f"tensordesc<{ty}[{', '.join(map(str, shape))}],{layout!r}>"
        elif name in consts:
            sig[name], constexprs[(i,)] = "constexpr", consts[name]
        elif name == "q_multiplier":
            sig[name] = "fp32"
        elif name == "Q":
            sig[name] = "*bf16" if q_in_kernel else "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in POINTER_ARGS:
            sig[name] = {"OUT": "*bf16", "BAD": "*i8"}.get(name, "*fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:  # integers; strides are multiples of 16 at run time, as the launcher's tensors give
            sig[name] = "i32"
            if name.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = GluonASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=compile_options(config))
