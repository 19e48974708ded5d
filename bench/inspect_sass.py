"""Compile the attention kernel for a GPU target on any machine (no GPU needed) and report what the
compiler made of it: registers, spills, shared memory, wgmma serialisation, and the instruction mix of the
SASS, whole and in the main loop.

    python bench/inspect_sass.py --pv fp8 --d 128 --m 128 --n 128 --warps 8 --stages 3 [--arch 90] [--dump F]
    python bench/inspect_sass.py --config m64n128w4s4mcpdgppp --d 128      # a launch key; gp = the Gluon kernels
    python bench/inspect_sass.py --quant stats_q --d 128 STATS_TILE=16     # a quantization launch
    python bench/inspect_sass.py --repair --m 64 --d 256 --arch 86           # the exact repair of flagged tiles

The per-element work of the inner loop is what bounds an attention kernel on Hopper: the counts of MUFU
(exp2), I2F/F2F/F2FP (conversions, on the same quarter-rate pipe) and FFMA/FMUL/FADD tell a change's
effect before any GPU time is spent.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path


# integer arguments that are multiples of 16 at run time (Triton specialises on that): padded lengths and D
ALIGNED_INTS = ("v_padded", "D")


def compile_attention(pv: str, d: int, m: int, n: int, warps: int, stages: int, arch: int, maxnreg=None, **flags):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sage_attention_pack.kernels.attention_kernel import sage_attention_fwd_kernel as fn

    fp8 = pv == "fp8"
    sig, constexprs = {}, {}
    pointers = ["Q8", "Q_SCALE", "K8", "K_SCALE", "V", "V8", "V_SCALE", "V_SHIFT", "BIAS", "OUT", "LSE", "BAD"]
    # FP16 P·V passes an FP32 tensor where V8 goes (kernels/launch.py): FP8 e4m3 does not exist before sm89
    ptypes = {"Q8": "*i8", "K8": "*i8", "V": "*bf16", "V8": "*fp8e4nv" if fp8 else "*fp32", "OUT": "*bf16",
              "BAD": "*i32"}
    for name in fn.arg_names:
        if name in pointers:
            sig[name] = ptypes.get(name, "*fp32")
        elif fn.params[fn.arg_names.index(name)].is_constexpr:
            continue
        else:
            sig[name] = "i32"
    const_values = dict(BLOCK_M=m, BLOCK_N=n, BLOCK_D=d, Q_GROUP=16, K_GROUP=n, PV_FP8=fp8, SHIFT_V=False,
                        IS_CAUSAL=False, HAS_BIAS=False, RETURN_LSE=False, BF16_DOT_IN_FP32=False,
                        FP8_ROUND_IN_FP32=False, EVEN_D=True, WARP_SPECIALIZE=False, MAGIC_CONVERT=True,
                        PV_DIRECT=False, PV_FP16_TILES=False)
    # unit strides: Triton specialises an integer argument equal to 1 into a constant
    const_values.update({name: 1 for name in fn.arg_names if re.fullmatch(r"stride_[a-z]d", name)})
    const_values.update(flags)
    for k, val in const_values.items():
        if k in fn.arg_names:
            sig[k] = "constexpr"
            constexprs[(fn.arg_names.index(k),)] = val
    # pointers and strides 16-byte aligned / divisible, as the launcher's tensors are (unit strides excepted)
    attrs = {}
    for i, name in enumerate(fn.arg_names):
        if sig.get(name, "").startswith("*") or name in ALIGNED_INTS or name.startswith("stride"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": warps, "num_stages": stages, "maxnreg": maxnreg})


def compile_quantize(which: str, d: int, arch: int, pv_fp8: bool = True, maxnreg=None, rope: bool = False,
                     **overrides):
    """One of the quantization's launches (kernels/launch.quantize_qkv) compiled for `arch`: the statistics with
    Q's codes ("stats_q"), K's codes with V's ("k_v"), or with carried statistics Q's, K's and V's codes in one
    ("carried", FP8 P·V only). pv_fp8: as the in-place Hopper path launches it (FP8 P·V, both
    smoothings, Q in groups of 64 rows, K of 128); otherwise as the portable kernel's FP16 P·V does by default (K
    smoothed alone, groups of 16 and 64 rows, no V codes). rope: with the rotary table (Q and K coded rotated).
    `overrides` replace the launch module's constants (STATS_TILE=16, ...)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sage_attention_pack.kernels import launch
    from sage_attention_pack.kernels.quant_kernels import quantize_kernel as fn

    from quant_constants import PATHS, constants  # bench/, beside this script

    ptypes = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Q8": "*i8", "K8": "*i8", "V8": "*fp8e4nv" if pv_fp8 else "*i8",
              "V_TICKETS": "*i32", "K_TICKETS": "*i32", "PE": "*fp32"}
    floats = ("q_multiplier", "v_code_max", "inv_keys", "carry_margin")
    stats_pass, carried = which == "stats_q", which == "carried" and pv_fp8
    path = PATHS["fp8" if pv_fp8 else "fp16"]  # the groups each call path quantizes in
    q_group, k_group = path["q_group"], path["k_group"]
    with constants(overrides):  # slice_rows and v_channels read them too
        rows = launch.QUANT_ROWS
        q_sub, k_sub = (launch.slice_rows(group, rows, rope, carried) for group in (q_group, k_group))
        channels = launch.launch_v_channels(d, rope, carried)
        stats_tile, stats_chunks = launch.STATS_TILE, launch.MAX_STATS_CHUNKS
        v_rows, warps, ahead = launch.V_ROWS, launch.QUANT_WARPS, launch.STATS_AHEAD
        stages = launch.stats_stages(rope)
        carry_k = carried and launch.carry_k_mean(rope)
        range_pass, inline_ptx = launch.RANGE_PASS, launch.inline_ptx(rope, carried)
        sign_from_x = launch.sign_from_x(pv_fp8, rope, carried, arch)
        maxnreg = maxnreg or (launch.QUANT_MAX_REGISTERS if launch.capped_quantization(pv_fp8, rope, carried, arch)
                              else None)
    const_values = dict(ROWS=rows, Q_SUB=q_sub, K_SUB=k_sub, Q_GROUP=q_group, K_GROUP=k_group, BLOCK_D=d,
                        STATS_TILE=stats_tile, STATS_CHUNKS=stats_chunks, SMOOTH_K=True,
                        V_STATS=pv_fp8, V_ROWS=v_rows, CHANNELS=channels, SMOOTH_V=pv_fp8, PV_FP8=pv_fp8,
                        INTERPRETING=False, PV_KEY_ORDER=pv_fp8, WARPS=warps, DO_STATS=int(stats_pass),
                        FINISH_SHIFT=pv_fp8 and not stats_pass, SHIFT_PROGRAMS=launch.SHIFT_PROGRAMS,
                        DO_Q=int(stats_pass or carried), DO_K=int(not stats_pass), ROPE=rope, STATS_AHEAD=ahead,
                        V_BLOCKS=d // channels if pv_fp8 and not stats_pass else 0, STATS_STAGES=stages,
                        CARRIED=carried, CARRY_K=carry_k, RANGE_PASS=range_pass, INLINE_PTX=inline_ptx,
                        SIGN_FROM_X=sign_from_x)
    const_values.update({name: 1 for name in fn.arg_names if re.fullmatch(r"stride_[a-z]d", name)})
    sig, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const_values:
            sig[name] = "constexpr"
            constexprs[(i,)] = const_values[name]
            continue
        is_ptr = i < fn.arg_names.index("stride_qb") or name == "PE"  # the buffers come first, the table last
        sig[name] = ptypes.get(name, "*fp32") if is_ptr else ("fp32" if name in floats else "i32")
        if is_ptr or name.startswith("stride") or name in ("D", "v_padded"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "maxnreg": maxnreg})


def compile_repair(block_m: int, d: int, arch: int, rope: bool = False):
    """The exact repair of flagged tiles (kernels/repair_kernel.py) as the launcher runs it after a kernel with
    query tiles of block_m rows (rope: Q and K rotated by a rotary table)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sage_attention_pack.kernels.launch import repair_constants
    from sage_attention_pack.kernels.repair_kernel import repair_tiles_kernel as fn

    consts = repair_constants(block_m, d, is_causal=False, has_bias=False, return_lse=False, rope=rope, arch=arch)
    options = {name: consts.pop(name) for name in ("num_warps", "num_stages")}
    types = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "OUT": "*bf16", "BIAS": "*fp32", "LSE": "*fp32",
             "BAD": "*i8", "REPAIRED": "*i32", "qk_multiplier": "fp32", "PE": "*fp32"}
    sig = {name: "constexpr" if name in consts else types.get(name, "i32") for name in fn.arg_names}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def sass_of(kernel) -> str:
    import triton

    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        Path(cubin).write_bytes(kernel.asm["cubin"])
        return subprocess.run([str(bindir / "cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout


def resource_report(kernel, arch: int) -> str:
    """ptxas's own line: registers, spill stores/loads, stack frame."""
    import triton

    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        Path(ptx).write_text(kernel.asm["ptx"])
        for name in ("ptxas", "ptxas-blackwell"):  # newer Tritons emit PTX only their second ptxas reads
            # the arch-specific target where there is one (sm_90a, sm_100a, sm_120a), as Triton compiles for
            gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
            res = subprocess.run([str(bindir / name), "-v", f"--gpu-name={gpu}", ptx, "-o", os.path.join(tmp, "k.o")],
                                 capture_output=True, text=True)
            if res.returncode == 0:
                break
    # C7514 and its kin: ptxas serialised the asynchronous wgmma (each one waited for), a silent slowdown
    lines = [ln.split("info    : ")[-1] for ln in res.stderr.splitlines()
             if "Used" in ln or "spill" in ln or "serialized" in ln]
    return "; ".join(lines) or res.stderr.strip()[-300:]


def sass_instructions(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode with its modifiers, operands) of each instruction in cuobjdump's listing (modifiers may hold
    lower case: a wgmma's shape, QGMMA.64x8x32)."""
    ins = []
    for line in sass.splitlines():
        hit = re.match(r"\s*/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*)", line)
        if hit:
            ins.append((int(hit.group(1), 16), hit.group(3), hit.group(4).strip()))
    return ins


def instruction_mix(sass: str) -> collections.Counter:
    return collections.Counter(op for _, op, _ in sass_instructions(sass))


def opcode_counts(mix) -> dict:
    """A listing's instruction counts by opcode, modifiers left out (HMNMX2.BF16_V2.NAN counts as HMNMX2)."""
    counts = collections.Counter()
    for op, n in mix:
        counts[op.split(".")[0]] += n
    return dict(counts)


def global_stores(sass: str) -> dict:
    """The kernel's global stores by width (STG.E.U16: 2 bytes, STG.E: 4, STG.E.64, STG.E.128): how its output tile
    leaves (hopper_attention_kernel.store_output)."""
    return {op: n for op, n in sorted(instruction_mix(sass).items()) if op.startswith("STG")}


TENSOR_CORE_OPS = ("IGMMA", "QGMMA", "HGMMA", "IMMA", "QMMA", "HMMA")


def tensor_core_ops(sass: str) -> dict:
    """The kernel's tensor-core instructions by opcode and modifiers (QMMA.16832.F16.E4M3.E4M3: FP8 operands into
    an FP16 accumulator)."""
    return {op: n for op, n in sorted(instruction_mix(sass).items()) if op.split(".")[0] in TENSOR_CORE_OPS}


def main_loop_span(ins: list[tuple[int, str, str]]) -> tuple[int, int] | None:
    """(first, last) address, in sass_instructions' listing, of the innermost loop that issues tensor-core products:
    the backward branch with the shortest span that contains a wgmma (IGMMA, QGMMA, HGMMA) or, before Hopper and on
    consumer Blackwell, an mma.sync (IMMA, QMMA, HMMA). One pass of it is one key tile for one warp."""
    best = None
    for addr, op, rest in ins:
        target = re.search(r"0x([0-9a-f]+)", rest) if op.split(".")[0] == "BRA" else None
        if target and int(target.group(1), 16) < addr:
            lo = int(target.group(1), 16)
            has_mma = any(lo <= a <= addr and o.split(".")[0] in TENSOR_CORE_OPS for a, o, _ in ins)
            if has_mma and (best is None or addr - lo < best[1] - best[0]):
                best = (lo, addr)
    return best


def loop_lines(ins: list[tuple[int, str, str]], span: tuple[int, int] | None) -> list[str]:
    """The instructions (opcode and operands) within `span`; none without one."""
    return [] if span is None else [f"{op} {rest}".strip() for a, op, rest in ins if span[0] <= a <= span[1]]


def main_loop(sass: str) -> list[str]:
    """The instructions (opcode and operands) of the main loop (main_loop_span)."""
    ins = sass_instructions(sass)
    return loop_lines(ins, main_loop_span(ins))


def code_bytes(ins: list[tuple[int, str, str]], span: tuple[int, int] | None) -> dict:
    """Bytes of machine code: the whole kernel and its main loop `span` (on sm90 every instruction is 16 bytes).
    What a multiprocessor's instruction cache must hold while its programs run at different points of the loop."""
    return {"code_bytes": ins[-1][0] + 16 - ins[0][0] if ins else 0,
            "loop_bytes": span[1] + 16 - span[0] if span else 0}


def main_loop_mix(sass: str) -> tuple[int, collections.Counter]:
    """(instructions, opcode counts) of main_loop(sass)."""
    body = main_loop(sass)
    return len(body), collections.Counter(line.split()[0].split(".")[0] for line in body)


def overlap_report(sass: str) -> dict:
    """Whether the main loop keeps its softmax under P·V: the exp2s between the wait that leaves P·V (and the row
    sums) in flight, the scores done, and the next wait; whether the loop touches local memory; how many barriers
    its warps wait at per key tile (BAR.SYNC: named or whole-program); its FADDs and its m64n8 products (P's row
    sums on the tensor cores, in place of a FADD per score); its warp votes (the skipped rescale's); in ping-pong,
    the turn: the instructions from the barrier wait before the tile's first wgmma to the arrive after its last,
    which the two warpgroups run one after the other, and how far into it the first wgmma comes; where the
    scores' products read Q from."""
    ins = sass_instructions(sass)
    span = main_loop_span(ins)  # found once: it pairs every backward branch with the listing
    loop = loop_lines(ins, span)
    ops = [line.split()[0] for line in loop]
    mmas = [i for i, op in enumerate(ops) if "GMMA" in op]
    turn_sync = turn_arrive = None
    if mmas:  # the last barrier wait before the first wgmma, the first arrive after the last
        turn_sync = max((i for i in range(mmas[0]) if ops[i].startswith("BAR.SYNC")), default=None)
        turn_arrive = next((i for i in range(mmas[-1], len(ops)) if ops[i].startswith("BAR.ARV")), None)
    in_turn = turn_sync is not None and turn_arrive is not None
    waits = [i for i, line in enumerate(loop) if line.startswith("WARPGROUP.DEPBAR")]
    first = next((i for i in waits if loop[i].endswith(("0x1", "0x2"))), None)
    second = next((i for i in waits if first is not None and i > first), None)
    between = ops[first:second] if first is not None and second is not None else []
    return {"loop_instructions": len(loop), "loop_spills": any(op.startswith(("STL", "LDL")) for op in ops),
            "loop_barrier_syncs": sum(op.startswith("BAR.SYNC") for op in ops),
            "exp2_between_waits": sum(op.startswith("MUFU.EX2") for op in between),
            "second_wait": loop[second] if second is not None else None,
            "first_wait": loop[first] if first is not None else None,
            "loop_fadds": sum(op.startswith("FADD") for op in ops),
            "loop_votes": sum(op.startswith("VOTE.") for op in ops),
            "row_sum_mmas": sum(op.startswith(("QGMMA.64x8x", "HGMMA.64x8x")) for op in ops),
            "turn_instructions": turn_arrive - turn_sync if in_turn else None,
            "first_mma_into_turn": mmas[0] - turn_sync if in_turn else None,
            "scores_a_operand": scores_a_operand(loop), **code_bytes(ins, span)}


def scores_a_operand(loop: list[str]) -> str | None:
    """Where the loop's Q·Kᵀ products (IGMMA) take Q from: "registers" (IGMMA D, R.., gdesc[..]), "shared"
    (IGMMA D, gdesc[..]: a descriptor for each operand), "mixed", or None without one."""
    sources = {"registers" if re.match(r"IGMMA\S* R\d+, R\d+, gdesc", line) else "shared"
               for line in loop if line.startswith("IGMMA")}
    return None if not sources else sources.pop() if len(sources) == 1 else "mixed"


def load_loops(sass: str) -> list[dict]:
    """Every loop of the listing that loads from global memory: its global loads, and how many of them issue
    before the loop's first FP32 add or min/max (where the quantization's loops use what they loaded). A loop whose
    loads all come first keeps them in flight together; one that adds after each load waits for each in turn."""
    ins = sass_instructions(sass)
    loops = []
    for i, (addr, op, operands) in enumerate(ins):
        target = re.search(r"0x([0-9a-f]+)", operands) if op.startswith("BRA") else None
        if target is None or int(target.group(1), 16) >= addr:
            continue
        body = [o for a, o, _ in ins if int(target.group(1), 16) <= a <= addr]
        loads = [j for j, o in enumerate(body) if o.startswith("LDG")]
        if loads:
            uses = [j for j, o in enumerate(body) if o.split(".")[0] in ("FADD", "FMNMX")]
            first_use = uses[0] if uses else len(body)
            loops.append({"instructions": len(body), "loads": len(loads),
                          "loads_before_first_add": sum(j < first_use for j in loads)})
    return loops


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pv", default="fp8", choices=["fp8", "fp16"],
                    help="P·V's precision (with a gp --config: fp16 compiles the Gluon kernel on a BF16 V)")
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--m", type=int, default=128)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--warps", type=int, default=8)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--maxnreg", type=int, default=None,
                    help="cap registers per thread (more programs per SM); with --quant too")
    ap.add_argument("--i2f", action="store_true", help="convert scores with I2F instead of the FP32 bit trick")
    ap.add_argument("--pv-direct", action="store_true", help="FP8 P·V accumulated straight into the output")
    ap.add_argument("--shift-v", action="store_true",
                    help="with a gp --config: V's mean added back to the output (every FP8 call accumulating in place)")
    ap.add_argument("--q-in-kernel", action="store_true",
                    help="with a ping-pong --config: the kernel codes a BF16 Q itself (codes_q_in_kernel)")
    ap.add_argument("--fp16-tiles", action="store_true",
                    help="FP8 P·V of each key tile in an FP16 accumulator (the portable kernel's fp16_tiles)")
    ap.add_argument("--config", help="a LaunchConfig key (overrides --m/--n/--warps/--stages and the flags); "
                                     "keys with gp compile the Hopper Gluon kernels")
    ap.add_argument("--dump", help="write the SASS here")
    ap.add_argument("--ptx", help="write the PTX here")
    ap.add_argument("--json", action="store_true", help="print only a JSON summary (resources, main-loop overlap)")
    ap.add_argument("--quant", choices=["stats_q", "k_v", "carried"],
                    help="compile a quantization launch instead (its constants as CONST=VALUE after it)")
    ap.add_argument("--repair", action="store_true",
                    help="compile the exact repair of flagged tiles instead (query tiles of --m rows)")
    ap.add_argument("--rope", action="store_true",
                    help="with --quant or --repair: with a rotary table (Q and K rotated inside the kernel)")
    ap.add_argument("overrides", nargs="*", help="with --quant: CONST=VALUE overrides of kernels/launch.py")
    args = ap.parse_args(argv)
    if args.repair:
        k = compile_repair(args.m, args.d, args.arch, args.rope)
        print(json.dumps({"resources": resource_report(k, args.arch), "shared": k.metadata.shared}) if args.json
              else f"{resource_report(k, args.arch)}  shared {k.metadata.shared} B")
        return 0
    if args.quant:
        k = compile_quantize(args.quant, args.d, args.arch, args.pv == "fp8", args.maxnreg, args.rope,
                             **{c: int(v) for c, v in (o.split("=") for o in args.overrides)})
        sass = sass_of(k)
        if args.dump:
            Path(args.dump).write_text(sass)
        if args.ptx:
            Path(args.ptx).write_text(k.asm["ptx"])
        if args.json:
            mix = sorted(instruction_mix(sass).items())
            print(json.dumps({"resources": resource_report(k, args.arch), "shared": k.metadata.shared,
                              "load_loops": load_loops(sass),
                              "shared_accesses": {op: n for op, n in mix if op.startswith(("STS", "LDS"))},
                              # LDGDEPBAR is the asynchronous copies' commit, not a load
                              "global_loads": {op: n for op, n in mix if op.startswith("LDG") and op != "LDGDEPBAR"},
                              "opcodes": opcode_counts(mix), "instructions": sum(n for _, n in mix)}))
            return 0
        print(f"{resource_report(k, args.arch)}  shared {k.metadata.shared} B")
        for loop in load_loops(sass):
            print(f"  loop of {loop['instructions']} instructions: {loop['loads']} global loads, "
                  f"{loop['loads_before_first_add']} of them before its first add")
        return 0
    from sage_attention_pack.kernels import launch
    from sage_attention_pack.kernels.tuning import LaunchConfig

    # a launch key, or the tile and flags given one by one (the portable kernel)
    cfg = LaunchConfig.from_key(args.config) if args.config else LaunchConfig(
        args.m, args.n, args.warps, args.stages, magic_convert=not args.i2f, pv_direct=args.pv_direct,
        max_registers=args.maxnreg, fp16_tiles=args.fp16_tiles)
    if cfg.pipelined:
        from sage_attention_pack.kernels.hopper_launch import compile_for_sm90

        k = compile_for_sm90(cfg, args.d, pv_fp8=args.pv == "fp8", shift_v=args.shift_v, q_in_kernel=args.q_in_kernel)
    else:
        k = compile_attention(args.pv, args.d, cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, args.arch,
                              cfg.max_registers, MAGIC_CONVERT=cfg.magic_convert, PV_DIRECT=cfg.pv_direct,
                              PV_FP16_TILES=launch.portable_fp16_tiles(cfg, args.pv == "fp8"))
    sass = sass_of(k)
    if args.dump:
        Path(args.dump).write_text(sass)
    if args.ptx:
        Path(args.ptx).write_text(k.asm["ptx"])
    overlap = overlap_report(sass)
    if args.json:
        print(json.dumps({"resources": resource_report(k, args.arch), "shared": k.metadata.shared, **overlap,
                          "global_stores": global_stores(sass), "tensor_core_ops": tensor_core_ops(sass)}))
        return 0
    print(f"{resource_report(k, args.arch)}  shared {k.metadata.shared} B")
    n_loop, loop = main_loop_mix(sass)
    if n_loop:
        print(f"main loop: {n_loop} instructions per key tile per warp: "
              + ", ".join(f"{op} {c}" for op, c in loop.most_common(12)))
    print(f"code: {overlap['code_bytes']} bytes, the main loop {overlap['loop_bytes']}")
    print("global stores: " + ", ".join(f"{op} {n}" for op, n in global_stores(sass).items()))
    if overlap["turn_instructions"] is not None:
        print(f"turn: {overlap['turn_instructions']} instructions from the turn's barrier wait to its arrive, the "
              f"first wgmma {overlap['first_mma_into_turn']} in")
    mix = instruction_mix(sass)
    watch = ("MUFU", "I2F", "F2F", "F2FP", "FFMA", "FMUL", "FADD", "HADD2", "FMNMX", "IMAD", "IADD3", "MOV",
             *TENSOR_CORE_OPS, "WARPGROUP", "SHFL", "LDS", "LDSM", "STS", "LDG", "LDGSTS", "UTMALDG", "SYNCS", "BAR")
    for w in watch:
        total = sum(c for op, c in mix.items() if op.split(".")[0] == w)
        if total:
            print(f"  {w:10s} {total}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
