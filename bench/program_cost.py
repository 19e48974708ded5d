"""What a program of the attention kernel costs whatever its keys: one shape's query rows and heads (Flux's rows at
22 heads by default: 792 ping-pong programs, six whole waves on a 132-multiprocessor H100/H200), against key
sequences of several lengths, the device time of the attention kernel alone (PyTorch's profiler, as in
bench/breakdown.py) for each named launch configuration, the tail split off and the rounds interleaved.

The kernel's time per wave is then fitted as `fixed + per_tile · key tiles` (least squares): `fixed_us` is what a
program pays for its prologue and epilogue (Q's load, the ring's first tiles, the first tile's unoverlapped
softmax, the output's store) and for starting after the program before it on its multiprocessor; `per_tile_us`
the steady loop. At Flux's 36 key tiles the fixed part's share says whether the kernel's start and end (what
persistent scheduling or an earlier next program would hide) or its loop is where a short call's time is.

    python bench/program_cost.py [--shape flux_1024px] [--heads 22] [--keys 1152 2304 4608 9216 18432]
                                 [--configs KEY ...] [--rounds 5] [--out program_cost.json]
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # breakdown.py, grid_waves.py, beside this script

from breakdown import kernel_ms  # noqa: E402
from grid_waves import kernel_parts  # noqa: E402

from sage_attention_pack.kernels import hopper_launch, launch, tuning  # noqa: E402
from sage_attention_pack.kernels.call_plan import PLANS  # noqa: E402
from sage_attention_pack.sage_core import backend, bench  # noqa: E402
from sage_attention_pack.sage_core.config import SageConfig  # noqa: E402
from sage_attention_pack.sage_core.progress import progress  # noqa: E402

DEFAULT_KEYS = (1152, 2304, 4608, 9216, 18432)


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through the points."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def summarize(rows: list[dict], nq: int, multiprocessors: int, batch_heads: int) -> dict:
    """Per configuration: the median kernel time per key length, the time per wave, and the fitted fixed and
    per-tile costs (µs per program), with the fixed part's share of a program at as many keys as query rows."""
    out = {}
    for key in dict.fromkeys(r["config"] for r in rows):
        config = tuning.LaunchConfig.from_key(key)
        items = hopper_launch.work_items_per_head(config, nq)
        n_waves = math.ceil(batch_heads * items / multiprocessors)
        per_keys = {}
        for nk in sorted({r["keys"] for r in rows if r["config"] == key}):
            ms = statistics.median(r["attention_ms"] for r in rows if r["config"] == key and r["keys"] == nk)
            per_keys[nk] = {"attention_ms": ms, "key_tiles": -(-nk // config.block_n),
                            "us_per_wave": 1e3 * ms / n_waves}
        fixed, per_tile = fit_line([e["key_tiles"] for e in per_keys.values()],
                                   [e["us_per_wave"] for e in per_keys.values()])
        tiles_at_nq = -(-nq // config.block_n)
        out[key] = {"waves": n_waves, "programs": batch_heads * items, "keys": per_keys, "fixed_us": fixed,
                    "per_tile_us": per_tile,
                    "fixed_share_at_nq": fixed / (fixed + per_tile * tiles_at_nq)}
    sdpa = {}
    for nk in sorted({r["keys"] for r in rows}):
        sdpa[nk] = statistics.median(r["sdpa_ms"] for r in rows if r["keys"] == nk)
    return {"configs": out, "sdpa_ms": sdpa}


def measure(shape: tuple, heads: int, keys: list[int], config_keys: list[str], rounds: int) -> list[dict]:
    b, _, nq, d = shape
    repairs = torch.zeros(1, device="cuda", dtype=torch.int32)  # the non-finite guard runs, as in a workflow
    fp8 = SageConfig(kernel="int8_fp8")
    q = bench.model_shaped_inputs(b, heads, nq, d, torch.bfloat16, "cuda")[0]
    kv = {nk: bench.model_shaped_inputs(b, heads, nk, d, torch.bfloat16, "cuda", seed=1)[1:] for nk in keys}
    hopper_launch.TAIL_SPLIT = "off"  # plain grids: every program has all of its item's keys
    rows = []
    steps = [(r, key, nk) for r in range(rounds) for key in config_keys for nk in keys]
    try:
        for rnd, key, nk in progress(steps, desc="configurations x key lengths", unit="call"):
            config = tuning.LaunchConfig.from_key(key)
            k, v = kv[nk]
            ours = functools.partial(backend.run, q, k, v, layout="HND", sm_scale=d ** -0.5, is_causal=False,
                                     bias=None, config=fp8, pv_fp8=True, return_lse=False, launch_config=config,
                                     repair_counter=repairs)
            served = bench.kernel_served(q, k, v, fp8, config, True)
            sdpa = functools.partial(torch.nn.functional.scaled_dot_product_attention, q, k, v)
            per_kernel = kernel_ms(ours)
            rows.append({"round": rnd, "config": key, "kernel": served, "keys": nk, "kernel_ms": per_kernel,
                         **kernel_parts(per_kernel), "sdpa_ms": sum(kernel_ms(sdpa).values())})
    finally:
        hopper_launch.TAIL_SPLIT = "policy"
        PLANS.clear()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="flux_1024px", help="its batch, query rows and head dim: " +
                    ", ".join(sorted(bench.GPU_SHAPES)))
    ap.add_argument("--heads", type=int, default=22)
    ap.add_argument("--keys", type=int, nargs="+", default=list(DEFAULT_KEYS))
    ap.add_argument("--configs", nargs="+", help="launch configuration keys (default: the tuning table's)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="program_cost.json")
    args = ap.parse_args(argv)
    if args.shape not in bench.GPU_SHAPES:
        ap.error(f"unknown shape {args.shape!r}; known: {', '.join(sorted(bench.GPU_SHAPES))}")
    if args.heads < 1 or args.rounds < 1 or len(set(args.keys)) < 2 or min(args.keys) < 1:
        ap.error("heads and rounds must be at least 1, and at least two key lengths are needed for the fit")
    for key in args.configs or []:
        tuning.LaunchConfig.from_key(key)  # a malformed key stops here, before any GPU work
    if not torch.cuda.is_available():
        raise SystemExit("program_cost times the attention kernel on a CUDA GPU; none is available")
    b, _, nq, d = bench.GPU_SHAPES[args.shape]
    multiprocessors = torch.cuda.get_device_properties(0).multi_processor_count
    configs = args.configs or [backend.tuning_for(torch.device("cuda"), "fp8", launch.padded_head_dim(d), None, nq,
                                                  nq, "torch.bfloat16", False).key()]
    with torch.inference_mode():
        rows = measure(bench.GPU_SHAPES[args.shape], args.heads, sorted(set(args.keys)), configs, args.rounds)
    summary = summarize(rows, nq, multiprocessors, b * args.heads)
    result = {"environment": bench.environment(), "shape": args.shape, "heads": args.heads,
              "multiprocessors": multiprocessors, "rounds": args.rounds, **summary, "calls": rows}
    for key, e in summary["configs"].items():
        times = ", ".join(f"{nk}: {x['attention_ms']:.4f}" for nk, x in e["keys"].items())
        print(f"{key}: {e['programs']} programs, {e['waves']} waves; attention ms by keys {times}; per program "
              f"fixed {e['fixed_us']:.2f} us + {e['per_tile_us']:.3f} us per key tile (fixed "
              f"{100 * e['fixed_share_at_nq']:.1f}% at {nq} keys)", flush=True)
    print("SDPA ms by keys: " + ", ".join(f"{nk}: {ms:.4f}" for nk, ms in summary["sdpa_ms"].items()))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
