"""Which of the softmax's instructions share a pipe on this GPU: chains of MUFU.EX2 (P's exponentials), FP32 pair ->
FP8 e4m3 conversions (P's packing: F2FP, with the PRMT that joins a pair into a register) and FMUL, each alone and
two at a time on separate registers. Two kinds that share a pipe take the sum of their times together; two that do
not take the longer one's.

    python bench/pipe_probe.py [--iters 4096] [--out results.json]
    python bench/pipe_probe.py --sass [--json]    # no GPU needed: each case's instruction mix, compiled for sm90

Every program holds 8 elements per thread in each of two groups; each case runs A operations on the first group's
chain and B on the second's per loop step. The figure per case is the median of 7 timed launches (CUDA events, after
one untimed), in ms.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import triton
import triton.language as tl

EX2 = "ex2.approx.ftz.f32 $0, $1;"
CVT = "{ .reg .b16 h; cvt.rn.satfinite.e4m3x2.f32 h, $1, $1; mov.b32 $0, {h, h}; }"
FMUL = "mul.f32 $0, $1, 0f3F7FFFFF;"
OPS = {"ex2": EX2, "cvt": CVT, "fmul": FMUL}
# name -> (operations on chain A per step, on chain B per step, A's kind, B's kind)
CASES = {
    "ex2_16": (16, 0, "ex2", "ex2"),
    "cvt_16": (16, 0, "cvt", "cvt"),
    "fmul_16": (16, 0, "fmul", "fmul"),
    "ex2_16+cvt_16": (16, 16, "ex2", "cvt"),
    "ex2_16+ex2_16": (16, 16, "ex2", "ex2"),
    "ex2_16+fmul_16": (16, 16, "ex2", "fmul"),
    "cvt_16+cvt_16": (16, 16, "cvt", "cvt"),
}
WARPS = 8
PER_THREAD = 8
BLOCK = 32 * WARPS * PER_THREAD


@triton.jit
def probe(X, Y, ITERS: tl.constexpr, A: tl.constexpr, B: tl.constexpr, OPA: tl.constexpr, OPB: tl.constexpr,
          BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK * 2 + tl.arange(0, BLOCK)
    a = tl.load(X + offs)
    b = tl.load(X + offs + BLOCK)
    for _ in range(ITERS):
        for _ in tl.static_range(A):
            a = tl.inline_asm_elementwise(OPA, "=r,r", [a], dtype=tl.float32, is_pure=True, pack=1)
        for _ in tl.static_range(B):
            b = tl.inline_asm_elementwise(OPB, "=r,r", [b], dtype=tl.float32, is_pure=True, pack=1)
    tl.store(Y + offs, a)
    tl.store(Y + offs + BLOCK, b)


def case_constants(case: str, iters: int) -> dict:
    a, b, kind_a, kind_b = CASES[case]
    return {"ITERS": iters, "A": a, "B": b, "OPA": OPS[kind_a], "OPB": OPS[kind_b], "BLOCK": BLOCK}


def sass_mix(case: str, arch: int = 90) -> collections.Counter:
    """The instruction counts of one case's kernel (one loop step unrolled), compiled without a GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from inspect_sass import instruction_mix, sass_of

    constants = case_constants(case, 64)
    signature = {"X": "*fp32", "Y": "*fp32", **{name: "constexpr" for name in constants}}
    index = {name: (probe.arg_names.index(name),) for name in constants}
    src = ASTSource(probe, signature, constexprs={index[k]: v for k, v in constants.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": WARPS})
    return instruction_mix(sass_of(kernel))


def measure(iters: int) -> dict:
    import torch

    programs = torch.cuda.get_device_properties(0).multi_processor_count * 8
    x = torch.rand(programs * BLOCK * 2, device="cuda") * 0.5
    y = torch.empty_like(x)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "iters": iters, "programs": programs, "warps": WARPS, "elements_per_thread_and_chain": PER_THREAD,
           "ms": {}}
    for case in CASES:
        c = case_constants(case, iters)
        run = lambda: probe[(programs,)](x, y, c["ITERS"], c["A"], c["B"], c["OPA"], c["OPB"], c["BLOCK"],  # noqa: E731
                                         num_warps=WARPS)
        run()
        torch.cuda.synchronize()
        times = []
        for _ in range(7):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        out["ms"][case] = sorted(times)[3]
        print(f"{case:16s} {out['ms'][case]:8.3f} ms", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=4096)
    ap.add_argument("--out", help="write the JSON here")
    ap.add_argument("--sass", action="store_true", help="print each case's instruction mix for sm90 (no GPU)")
    ap.add_argument("--json", action="store_true", help="with --sass: one JSON line, {case: {opcode: count}}")
    args = ap.parse_args(argv)
    if args.sass:
        mixes = {case: sass_mix(case) for case in CASES}
        if args.json:
            print(json.dumps(mixes))
        else:
            for case, mix in mixes.items():
                print(case, dict(mix.most_common(4)))
        return
    out = measure(args.iters)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
