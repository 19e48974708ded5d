"""Host time per attention call: how long the Python side of one call takes to hand its work to the GPU, against
the call's wall time. In a model's forward the host issues every kernel of the model; where its work per block
takes longer than the GPU's (short calls, small models), each microsecond the attention spends on the host adds to
the forward, whatever its kernels save on the device.

    python bench/host_time.py [--shapes ltxv_768x512_97f flux_1024px] [--calls 60] [--rounds 3] [--out F.json]

For each shape of bench/rope_call.py and each way of calling (Sage with the model's table handed over, as the
hand-off calls it; Sage on Q and K already rotated; PyTorch's SDPA on the same Q, K and V, no rotation), --calls
calls are issued back to back: the time until the last one returns to Python is the host's, divided by the calls
(well under the launch queue's depth, so the host never waits on the GPU), and the time until the GPU finishes
them is the wall time. The ways alternate over --rounds rounds; the report is the median per way. Without a GPU it
runs the calls through Triton's interpreter at a few heads and tokens (for the tests: the figures then say nothing
of a GPU host).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sage_attention_pack.sage_core import bench
from sage_attention_pack.sage_core.config import SageConfig
from sage_attention_pack.sage_core.dispatch import DispatchStats, attention
from sage_attention_pack.sage_core.progress import progress

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ itself: rope_call's shapes and tables
import rope_call  # noqa: E402

SMALL_GRID = (2, 3, 4)  # the interpreter's size of every shape, with 2 query heads (Lumina 2: 6, 2 K/V heads)


def ways(c: rope_call.Call, config: SageConfig, stats: DispatchStats) -> dict:
    """The calls compared, each a function of no arguments."""
    qh, kh, vh = c.hnd(c.q), c.hnd(c.k), c.hnd(c.v)
    return {
        "sage_rotation_fused": lambda: attention(c.q, c.k, c.v, tensor_layout=c.layout, config=config, stats=stats,
                                                 rope=c.handed_table()),
        "sage_prerotated": lambda: attention(c.q, c.k, c.v, tensor_layout=c.layout, config=config, stats=stats),
        "sdpa": lambda: F.scaled_dot_product_attention(qh, kh, vh, enable_gqa=c.group > 1),
    }


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def host_and_wall_us(fn, calls: int, device: str) -> tuple[float, float]:
    """(host µs, wall µs) per call of `calls` calls issued back to back, after the GPU is idle."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    issued = time.perf_counter()
    synchronize(device)
    done = time.perf_counter()
    return (issued - start) / calls * 1e6, (done - start) / calls * 1e6


def measure(shape: str, device: str, calls: int, rounds: int, config: SageConfig) -> dict:
    small = {}
    if device == "cpu":
        small = {"heads": 6 if rope_call.SHAPES[shape][0] == "lumina2" else 2, "grid": SMALL_GRID}
    c = rope_call.call_inputs(shape, device, **small)
    stats = DispatchStats()
    fns = ways(c, config, stats)
    for fn in fns.values():  # compile, plan and warm every way first
        fn()
        fn()
    samples = {name: [] for name in fns}
    for r in range(rounds):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))  # no way always follows the same one
        for name in order:
            samples[name].append(host_and_wall_us(fns[name], calls, device))
    row = {"shape": list(c.hnd(c.q).shape), "layout": c.layout, "calls": stats.snapshot()}
    for name, pairs in samples.items():
        row[name] = {"host_us": statistics.median(h for h, _ in pairs),
                     "wall_us": statistics.median(w for _, w in pairs)}
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=["ltxv_768x512_97f", "flux_1024px"],
                    help=f"of {', '.join(rope_call.SHAPES)}")
    ap.add_argument("--calls", type=int, default=60, help="calls issued back to back per sample")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kernel", default="int8_fp8", choices=["int8_fp8", "int8_fp16"])
    ap.add_argument("--out", default="host_time.json")
    args = ap.parse_args(argv)
    unknown = [s for s in args.shapes if s not in rope_call.SHAPES]
    if args.calls < 1 or args.rounds < 1 or unknown:
        ap.error(f"--calls and --rounds must be at least 1 and every shape one of {', '.join(rope_call.SHAPES)} "
                 f"(not {unknown})")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {"environment": bench.environment(), "kernel": args.kernel, "calls_per_sample": args.calls,
              "rounds": args.rounds, "shapes": {}}
    for shape in progress(args.shapes, desc="shapes"):
        row = result["shapes"][shape] = measure(shape, device, args.calls, args.rounds, SageConfig(kernel=args.kernel))
        print(f"{shape}: " + ", ".join(f"{name} host {row[name]['host_us']:.0f} us, wall {row[name]['wall_us']:.0f} us"
                                       for name in ("sage_rotation_fused", "sage_prerotated", "sdpa")), flush=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
