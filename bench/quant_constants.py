"""Time one call's quantization (kernels/launch.quantize_qkv, with the arguments the in-place Hopper path gives it,
or with --path fp16 the portable FP16-P·V path's) under overrides of the launch module's quantization constants,
side by side on model shapes.

    python bench/quant_constants.py --variants base "sub16:QUANT_SUB=16" "tile16:STATS_TILE=16,MAX_STATS_CHUNKS=32" \
        [--shapes flux_1024px wan21_480p_81f] [--rounds 7] [--path fp8|fp16] [--out F.json]

A variant is NAME or NAME:CONST=VALUE[,CONST=VALUE...] over the constants in TUNABLE; `base` (no overrides) is the
shipped setting. Each variant runs as a CUDA graph of GRAPH_CALLS calls into buffers of its own, the graphs timed
by the benchmark's interleaved timing (sage_core/timing.py: every variant in turn for --rounds rounds, each visit
settled first, so that the machine's drift reaches all alike); the report is the median per call. Every
variant's outputs (codes, scales, means, code sums) are compared with the first variant's, bit for bit: a
constant that changed what the quantization writes would show there (on the GPU, V_CHANNELS and the statistics'
chunking change the order in which V's mean is summed, so a code may differ in its last bit; V_ROWS changes how
V's code sums are split over programs).
"""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sage_attention_pack.kernels import launch  # noqa: E402
from sage_attention_pack.sage_core.bench import GPU_SHAPES, environment, model_shaped_inputs  # noqa: E402
from sage_attention_pack.sage_core.progress import progress  # noqa: E402
from sage_attention_pack.sage_core.timing import interleaved_median_ms  # noqa: E402

# the constants of kernels/launch.py that shape the quantization launches without changing what they write, and
# MAX_STATS_EVERY, whose 1 reads every key for K's mean (its codes then differ from the sampled mean's)
TUNABLE = ("STATS_ROWS", "MAX_STATS_CHUNKS", "STATS_TILE", "STATS_AHEAD", "QUANT_ROWS", "QUANT_SUB", "QUANT_WARPS",
           "V_ROWS", "V_CHANNELS", "V_CHANNELS_SMALL_HEADS", "MAX_STATS_EVERY", "STATS_STAGES",
           "ROPE_STATS_STAGES")
GRAPH_CALLS = 20
# per path, what sizes the quantization's buffers (launch.quant_buffers): fp8, the in-place Hopper path
# (kernels/launch.sage_forward for an FP8 call with a pipelined key); fp16, the portable FP16-P·V path as Ampere and
# Ada run it (per-warp Q scales, K smoothed alone in 64-key groups, the tables' BLOCK_N at head dim 128 there);
# fp8_q_in_kernel, the in-place Hopper path where the attention kernel codes Q (hopper_launch.codes_q_in_kernel)
PATHS = {
    "fp8": dict(q_group=64, k_group=128, smooth_k=True, smooth_v=True, pv_fp8=True),
    "fp8_q_in_kernel": dict(q_group=64, k_group=128, smooth_k=True, smooth_v=True, pv_fp8=True, q_in_kernel=True),
    "fp16": dict(q_group=16, k_group=64, smooth_k=True, smooth_v=False, pv_fp8=False),
}


def quant_args(path: str) -> dict:
    """quantize_qkv's arguments on a path: its buffers' and the key order, which is the Hopper kernel's P order
    exactly where P·V is FP8 (with FP16 P·V the Hopper kernels read V itself: no V codes, no key order)."""
    return dict(PATHS[path], pv_key_order=PATHS[path]["pv_fp8"])


def parse_variant(text: str) -> tuple[str, dict]:
    """"NAME" or "NAME:CONST=VALUE,..." -> (NAME, {CONST: int}); an unknown constant or a bad value is named."""
    name, _, spec = text.partition(":")
    if not name:
        raise ValueError(f"variant {text!r} has no name")
    overrides = {}
    for item in filter(None, spec.split(",")):
        const, eq, value = item.partition("=")
        if const not in TUNABLE:
            raise ValueError(f"variant {name!r}: {const!r} is not a tunable constant (one of {', '.join(TUNABLE)})")
        if not eq or not value.strip().isdigit() or int(value) <= 0:
            raise ValueError(f"variant {name!r}: {const} needs a positive integer, got {value!r}")
        overrides[const] = int(value)
    return name, overrides


@contextmanager
def constants(overrides: dict):
    """The launch module's constants set to `overrides` inside the block, restored after it."""
    saved = {k: getattr(launch, k) for k in overrides}
    try:
        for k, v in overrides.items():
            setattr(launch, k, v)
        yield
    finally:
        for k, v in saved.items():
            setattr(launch, k, v)


def quantize(q, k, v, buffers=None, path: str = "fp8") -> dict:
    return launch.quantize_qkv(q, k, v, block_d=launch.padded_head_dim(q.shape[-1]), q_multiplier=0.1275,
                               buffers=buffers, **quant_args(path))


def same_outputs(a: dict, b: dict) -> dict:
    """Per output tensor, whether the two quantizations wrote the same bits (the statistics' partial rows left out:
    their chunking is what some constants change; and the scratch only carried calls write)."""
    return {key: bool(torch.equal(a[key].float(), b[key].float())) for key, val in a.items()
            if torch.is_tensor(val) and key != "parts" and key not in launch.CARRY_SCRATCH}


def measure_shape(shape, variants: dict, rounds: int, path: str = "fp8") -> dict:
    b, h, n, d = shape
    q, k, v = model_shaped_inputs(b, h, n, d, torch.bfloat16, "cuda")
    graphs, kept, rows, first = {}, {}, {}, None
    for name, overrides in variants.items():
        with constants(overrides):
            out = quantize(q, k, v, path=path)
            first = first or out
            rows[name] = {"overrides": overrides, "same_bits_as_first": same_outputs(first, out)}
            buffers = launch.quant_buffers(q, k, block_d=launch.padded_head_dim(d), **PATHS[path])
            quantize(q, k, v, buffers, path)  # compiled and warm before the capture
            torch.cuda.synchronize()
            graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
            with torch.cuda.stream(stream):
                quantize(q, k, v, buffers, path)  # once more on the capturing stream, as PyTorch asks first
                with torch.cuda.graph(graph, stream=stream):
                    for _ in range(GRAPH_CALLS):
                        quantize(q, k, v, buffers, path)
            torch.cuda.synchronize()
            graphs[name], kept[name] = graph, buffers  # the graph writes into these buffers
    for name, ms in interleaved_median_ms({name: graph.replay for name, graph in graphs.items()},
                                          rounds=rounds).items():
        if isinstance(ms, str):  # the replay raised: its message
            rows[name]["error"] = ms
        else:
            rows[name]["us"] = ms * 1000.0 / GRAPH_CALLS
    return {"shape": {"B": b, "H": h, "N": n, "D": d}, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=["base"], help="NAME or NAME:CONST=VALUE,...")
    ap.add_argument("--shapes", nargs="+", default=["flux_1024px", "sdxl_1024px", "wan21_480p_81f"],
                    choices=sorted(GPU_SHAPES))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--path", choices=sorted(PATHS), default="fp8", help="which call path's quantization (see PATHS)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    try:
        variants = dict(parse_variant(text) for text in args.variants)
    except ValueError as e:
        ap.error(str(e))
    if len(variants) != len(args.variants):
        ap.error("two variants share a name")
    if not torch.cuda.is_available():
        raise SystemExit("bench/quant_constants.py times CUDA graphs: it needs an NVIDIA GPU")
    result = {"environment": environment(), "graph_calls": GRAPH_CALLS, "path": args.path,
              "quant_args": quant_args(args.path), "shapes": {}}
    for shape in progress(args.shapes, desc="shapes", unit="shape"):
        row = measure_shape(GPU_SHAPES[shape], variants, args.rounds, args.path)
        result["shapes"][shape] = row
        for name, r in row["rows"].items():
            differ = [key for key, same in r["same_bits_as_first"].items() if not same]
            timing = f"{r['us']:9.1f} us" if "us" in r else r["error"]
            print(f"{shape:18s} {name:20s} {timing}"
                  + (f"  differs from the first in {', '.join(differ)}" if differ else ""), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
