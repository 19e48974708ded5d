"""Whole FP8 calls with Q coded inside the Hopper ping-pong kernel (hopper_launch.Q_IN_KERNEL on, as shipped:
hopper_attention_kernel.quantize_q) and by the quantization pass (off), PyTorch's default SDPA beside them, in
interleaved rounds on one machine; per shape the times, the ratios to SDPA, the saving, whether both arms give the
same bits, each arm's kernels (device milliseconds per call, from the profiler) and the relative L1 error against
FP32 attention on the last heads.

    python bench/q_in_kernel_ab.py [--shapes flux_1024px wan21_480p_81f ...] [--rounds 9] [--out q_in_kernel_ab.json]

A shape is a name of the benchmark's table or BxHxNxD.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import sys
from pathlib import Path

import torch

from sage_attention_pack.kernels import launch, tuning
from sage_attention_pack.sage_core import bench, timing
from sage_attention_pack.sage_core.progress import progress


def sibling(name: str):
    """Another script of this folder, as a module (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ab = sibling("tail_split_ab")  # the shapes' parsing, the setting switch, the FP8 call and its error
breakdown = sibling("breakdown")  # kernel_ms: each launch's device time

DEFAULT_SHAPES = ("flux_1024px", "sweep_d128_n8192", "sweep_d128_n16384", "wan21_480p_81f", "sweep_d64_n16384")
# each arm's hopper_launch settings: Q coded in the kernel, its codes then read from shared memory by every Q·Kᵀ
# where the configuration does so, or read into registers once per work item; or coded by the quantization pass
ARMS = {"in_kernel": {"Q_IN_KERNEL": True, "IN_KERNEL_Q_REGISTERS": False},
        "in_kernel_regs": {"Q_IN_KERNEL": True, "IN_KERNEL_Q_REGISTERS": True},
        "pass": {"Q_IN_KERNEL": False, "IN_KERNEL_Q_REGISTERS": False}}
SHIPPED = {"Q_IN_KERNEL": True, "IN_KERNEL_Q_REGISTERS": False}


def measure(shape: tuple, rounds: int, switch, config=None) -> dict:
    b, h, n, d = shape
    q, k, v, config, ours = ab.fp8_call(shape, config)
    arms = {name: switch.bind(setting, ours) for name, setting in ARMS.items()}
    sdpa = functools.partial(torch.nn.functional.scaled_dot_product_attention, q, k, v)
    ms = timing.interleaved_median_ms({**arms, "sdpa": sdpa}, rounds=rounds)
    row = {"shape": [b, h, n, d], "launch_config": config.key(), **ms}
    for arm in ARMS:
        if isinstance(ms.get(arm), float) and isinstance(ms.get("sdpa"), float):
            row[f"{arm}_vs_sdpa"] = ms["sdpa"] / ms[arm]
            if arm != "pass" and isinstance(ms.get("pass"), float):
                row[f"{arm}_saving_pct"] = 100 * (1 - ms[arm] / ms["pass"])
    outs = {}
    for name, call in arms.items():
        outs[name] = call()[0].clone()
        row[f"kernels_{name}"] = breakdown.kernel_ms(call)
        row[f"q_in_kernel_{name}"] = launch.hopper_paths(q, k, v, config=config, k_group=config.block_n, pv_fp8=True,
                                                          is_causal=False, has_bias=False, rope=False)[1]
        if n <= ab.ERROR_MAX_KEYS:
            row[f"rel_l1_{name}"] = ab.last_heads_error(outs[name], q, k, v)
    row["same_bits"] = all(torch.equal(outs[arm], outs["pass"]) for arm in ARMS)
    switch.restore()
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES))
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--config", help="a launch configuration key for every shape (default: the tables')")
    ap.add_argument("--out", default="q_in_kernel_ab.json")
    args = ap.parse_args(argv)
    try:
        shapes = {name: ab.parse_shape(name) for name in args.shapes}
    except ValueError as e:
        ap.error(str(e))
    if args.rounds < 1:
        ap.error("rounds must be at least 1")
    try:
        config = tuning.LaunchConfig.from_key(args.config) if args.config else None
    except ValueError as e:
        ap.error(str(e))
    if not torch.cuda.is_available():
        raise SystemExit("q_in_kernel_ab times the Hopper kernel's calls on a CUDA GPU; none is available")
    result = {"environment": bench.environment(), "rounds": args.rounds, "shapes": {}}
    switch = ab.SettingSwitch(SHIPPED)
    with torch.inference_mode():
        for name in progress(list(shapes), desc="shapes", unit="shape"):
            row = result["shapes"][name] = measure(shapes[name], args.rounds, switch, config)
            print(name, json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
