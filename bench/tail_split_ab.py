"""Whole FP8 calls with the ping-pong grid's tail split on and off (kernels/hopper_launch.py, tail_split), and
PyTorch's default SDPA beside them, in interleaved rounds on one machine; per shape the times, the ratios to SDPA,
the split's saving, the outputs' largest difference, and the relative L1 error of both against FP32 attention on
the last heads (where the split items are). The split arm runs with hopper_launch.TAIL_SPLIT "forced" (split
wherever that ends the grid sooner, the policy's thresholds aside), so that the shapes the policy leaves whole
are measured split too; `policy` records what the shipped policy does there.

    python bench/tail_split_ab.py [--shapes flux_1024px 1x26x4608x128 ...] [--rounds 9] [--out tail_split_ab.json]

A shape is a name of the benchmark's table or BxHxNxD.
"""
from __future__ import annotations

import argparse
import functools
import sys

import torch

from sage_attention_pack.kernels import hopper_launch
from sage_attention_pack.sage_core import bench, timing


settings_ab = bench.bench_script("settings_ab")  # the shapes, the FP8 call, its error, the settings' switch
parse_shape, fp8_call, last_heads_error = settings_ab.parse_shape, settings_ab.fp8_call, settings_ab.last_heads_error

DEFAULT_SHAPES = ("flux_1024px", "1x26x4608x128", "2x24x4608x128", "sweep_d128_n8192", "sweep_d128_n16384",
                  "wan21_480p_81f")
SPLIT, UNSPLIT = {("hopper_launch", "TAIL_SPLIT"): "forced"}, {("hopper_launch", "TAIL_SPLIT"): "off"}


def measure(shape: tuple, rounds: int, switch) -> dict:
    b, h, n, d = shape
    q, k, v, config, ours = fp8_call(shape)
    items = hopper_launch.work_items_per_head(config, n) * b * h
    switch.restore()
    policy = hopper_launch.tail_split(config, items, n, q.device)
    hopper_launch.TAIL_SPLIT = "forced"
    forced = hopper_launch.tail_split(config, items, n, q.device)
    split, unsplit = switch.bind(SPLIT, ours), switch.bind(UNSPLIT, ours)
    ms = timing.interleaved_median_ms({"split": split, "unsplit": unsplit,
                                       "sdpa": functools.partial(torch.nn.functional.scaled_dot_product_attention,
                                                                 q, k, v)}, rounds=rounds)
    row = {"shape": [b, h, n, d], "launch_config": config.key(), "items": items, "policy": list(policy),
           "forced": list(forced), **ms}
    if all(isinstance(ms.get(m), float) for m in ("split", "unsplit", "sdpa")):
        row.update(split_vs_sdpa=ms["sdpa"] / ms["split"], unsplit_vs_sdpa=ms["sdpa"] / ms["unsplit"],
                   split_saving_pct=100 * (1 - ms["split"] / ms["unsplit"]))
    with torch.no_grad():
        out_split, out_plain = split()[0], unsplit()[0]
    row["max_abs_diff"] = float((out_split.float() - out_plain.float()).abs().max())
    if n <= settings_ab.ERROR_MAX_KEYS:
        row["rel_l1_split"] = last_heads_error(out_split, q, k, v)
        row["rel_l1_unsplit"] = last_heads_error(out_plain, q, k, v)
    switch.restore()
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES))
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", default="tail_split_ab.json")
    args = ap.parse_args(argv)
    try:
        shapes = {name: parse_shape(name) for name in args.shapes}
    except ValueError as e:
        ap.error(str(e))
    if args.rounds < 1:
        ap.error("rounds must be at least 1")
    if not torch.cuda.is_available():
        raise SystemExit("tail_split_ab times the Hopper kernel's calls on a CUDA GPU; none is available")
    switch = settings_ab.Settings({"split": SPLIT, "unsplit": UNSPLIT})
    return settings_ab.run_shapes(shapes, lambda shape: measure(shape, args.rounds, switch), args.out,
                                  {"rounds": args.rounds,
                                   "multiprocessors": hopper_launch.multiprocessors(torch.device("cuda"))})


if __name__ == "__main__":
    sys.exit(main())
