"""Does the attention kernel's time grow with the head count smoothly, or in steps of one wave of programs? One
shape's row length and head dim (Flux's by default) at several head counts, FP8 P·V with the launch configuration
the tuning table gives that length: the device time of every kernel of a call (PyTorch's profiler, as in
bench/breakdown.py) and SDPA's beside it, the rounds interleaved over the head counts.

Where the time steps, a grid whose last wave is part-full pays for the whole wave (Flux: 36 ping-pong programs
per head, 864 on the H200's 132 multiprocessors, 6.55 waves). `balanced_ms` is what the kernel would take with its
work spread evenly over the multiprocessors, at the time per wave that the head counts with whole waves measured;
`tail_ms` is the difference, the most any balancing of the grid's tail could give back. The launcher splits a
part-full last wave's items into key ranges where that pays (kernels/hopper_launch.py, tail_split; `splits` per
head count); `--unsplit-too` times every head count a second time with the split off, in the same rounds
(`unsplit_attention_ms`, and `split_saving_ms` the difference).

    python bench/grid_waves.py [--shape flux_1024px] [--heads 18 20 22 24 26] [--rounds 5] [--unsplit-too]
                               [--out grid_waves.json]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # breakdown.py, beside this script

from breakdown import kernel_ms  # noqa: E402

from sage_attention_pack.kernels import hopper_launch, launch  # noqa: E402
from sage_attention_pack.kernels.call_plan import PLANS  # noqa: E402
from sage_attention_pack.sage_core import backend, bench  # noqa: E402
from sage_attention_pack.sage_core.config import SageConfig  # noqa: E402
from sage_attention_pack.sage_core.progress import progress  # noqa: E402

DEFAULT_HEADS = (18, 20, 22, 23, 24, 25, 26, 28, 29, 30, 33)


def programs_per_head(config, rows: int) -> int | None:
    """The attention kernel's programs per batch·head for `rows` query rows, as its launcher makes the grid (one per
    query tile, or per group of tiles in the ping-pong kernel); None for a persistent grid (one program per
    multiprocessor, whatever the heads)."""
    return None if config.persistent else hopper_launch.work_items_per_head(config, rows)


def kernel_parts(per_kernel: dict) -> dict:
    """A call's kernel times (ms) by part: the quantization's launches, the attention kernel, and the rest (the
    non-finite guard, PyTorch's operations of a call that returns its LSE)."""
    parts = {"quantize_ms": 0.0, "attention_ms": 0.0, "other_ms": 0.0}
    for name, ms in per_kernel.items():
        part = "quantize_ms" if name.startswith("quantize_kernel") else "attention_ms" if "_fwd_" in name else \
            "other_ms"
        parts[part] += ms
    return parts


def summarize(rows: list[dict], multiprocessors: int) -> dict:
    """Per head count, the medians over rounds, the waves of its grid, and the time per wave (the attention kernel's
    time over its waves rounded up); then, from the head counts whose waves are whole, the time of one wave, and for
    every head count the balanced time (its waves at that rate) and its tail's cost."""
    out = {}
    for heads in sorted({r["heads"] for r in rows}):
        mine = [r for r in rows if r["heads"] == heads and r.get("split", True)]
        unsplit = [r for r in rows if r["heads"] == heads and not r.get("split", True)]
        waves = mine[0]["programs"] / multiprocessors
        entry = {"programs": mine[0]["programs"], "waves": waves, "splits": mine[0].get("splits", 1)}
        for key in ("attention_ms", "quantize_ms", "other_ms", "sdpa_ms"):
            entry[key] = statistics.median(r[key] for r in mine)
        if unsplit:
            entry["unsplit_attention_ms"] = statistics.median(r["attention_ms"] for r in unsplit)
            entry["split_saving_ms"] = entry["unsplit_attention_ms"] - entry["attention_ms"]
        entry["attention_us_per_head"] = 1e3 * entry["attention_ms"] / heads
        entry["sdpa_us_per_head"] = 1e3 * entry["sdpa_ms"] / heads
        entry["ms_per_wave"] = entry["attention_ms"] / math.ceil(waves - 1e-9)
        out[heads] = entry
    whole = [e["ms_per_wave"] for e in out.values() if abs(e["waves"] - round(e["waves"])) < 1e-9]
    wave_ms = statistics.median(whole) if whole else None
    for entry in out.values():
        entry["balanced_ms"] = entry["waves"] * wave_ms if wave_ms else None
        entry["tail_ms"] = entry["attention_ms"] - entry["balanced_ms"] if wave_ms else None
    return {"wave_ms": wave_ms, "heads": out}


def measure(shape: tuple, heads: list[int], rounds: int, unsplit_too: bool = False) -> tuple[list[dict], object]:
    b, _, n, d = shape
    config = backend.tuning_for(torch.device("cuda"), "fp8", launch.padded_head_dim(d), None, n, n, "torch.bfloat16",
                                False)
    per_head = programs_per_head(config, n)
    if per_head is None:
        raise SystemExit(f"the launch configuration {config.key()} is persistent: its grid does not grow in waves")
    repairs = torch.zeros(1, device="cuda", dtype=torch.int32)  # the non-finite guard runs, as in a workflow
    fp8 = SageConfig(kernel="int8_fp8")
    rows = []
    settings = (True, False) if unsplit_too else (True,)
    steps = [(r, h, split) for r in range(rounds) for h in heads for split in settings]
    for rnd, h, split in progress(steps, desc="head counts", unit="call"):
        hopper_launch.TAIL_SPLIT = "policy" if split else "off"
        PLANS.clear()  # a call plan holds the split's buffers and launches: made anew for each setting
        splits = hopper_launch.tail_split(config, b * h * per_head, n, torch.device("cuda"))[1]
        q, k, v = bench.model_shaped_inputs(b, h, n, d, torch.bfloat16, "cuda")
        ours = functools.partial(backend.run, q, k, v, layout="HND", sm_scale=d ** -0.5, is_causal=False, bias=None,
                                 config=fp8, pv_fp8=True, return_lse=False,
                                 launch_config=config, repair_counter=repairs)
        sdpa = functools.partial(torch.nn.functional.scaled_dot_product_attention, q, k, v)
        per_kernel = kernel_ms(ours)
        rows.append({"round": rnd, "heads": h, "split": split, "splits": splits, "programs": b * h * per_head,
                     "kernel_ms": per_kernel,
                     **kernel_parts(per_kernel), "sdpa_ms": sum(kernel_ms(sdpa).values())})
        del q, k, v
    hopper_launch.TAIL_SPLIT = "policy"
    PLANS.clear()
    return rows, config


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="flux_1024px", help="its batch, row length and head dim: " +
                    ", ".join(sorted(bench.GPU_SHAPES)))
    ap.add_argument("--heads", type=int, nargs="+", default=list(DEFAULT_HEADS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--unsplit-too", action="store_true", help="also time each head count with the tail split off")
    ap.add_argument("--out", default="grid_waves.json")
    args = ap.parse_args(argv)
    if args.shape not in bench.GPU_SHAPES:
        ap.error(f"unknown shape {args.shape!r}; known: {', '.join(sorted(bench.GPU_SHAPES))}")
    if min(args.heads) < 1 or args.rounds < 1:
        ap.error("head counts and rounds must be at least 1")
    if not torch.cuda.is_available():
        raise SystemExit("grid_waves measures the attention kernel's grid on a CUDA GPU; none is available")
    multiprocessors = torch.cuda.get_device_properties(0).multi_processor_count
    with torch.inference_mode():
        rows, config = measure(bench.GPU_SHAPES[args.shape], sorted(set(args.heads)), args.rounds, args.unsplit_too)
    summary = summarize(rows, multiprocessors)
    result = {"environment": bench.environment(), "shape": args.shape, "launch_config": config.key(),
              "multiprocessors": multiprocessors, "rounds": args.rounds, **summary, "calls": rows}
    for heads, e in summary["heads"].items():
        balanced = f"balanced {e['balanced_ms']:.4f} ms, tail {e['tail_ms']:+.4f}" if e["balanced_ms"] else ""
        if "unsplit_attention_ms" in e:
            balanced += f"; {e['splits']} parts, unsplit {e['unsplit_attention_ms']:.4f} ms"
        print(f"H{heads:<3d} {e['programs']:5d} programs {e['waves']:5.2f} waves: attention {e['attention_ms']:.4f} ms "
              f"({e['attention_us_per_head']:.2f} us/head), quantize {e['quantize_ms']:.4f}, SDPA {e['sdpa_ms']:.4f} "
              f"({e['sdpa_us_per_head']:.2f} us/head) {balanced}", flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
