"""What the non-finite guard's exact repair costs on this GPU: the guarded FP8 call (as in a workflow) on clean
inputs, with one flagged tile (a NaN in one query row poisons its INT8 scale group, whose rows come out NaN) and with
a whole head flagged (a NaN in one key of the last head), and the same clean call without the guard (what a clean
call pays for it: the flags the attention kernel writes and the repair's launch), in interleaved rounds beside
PyTorch's default SDPA; per arm and case the call's milliseconds and its kernels' device milliseconds (from the
profiler), the repair kernel's share, the tiles it repaired per call, and how far the repaired rows are from FP32
attention.

    python bench/repair_cost.py [--shapes flux_1024px ...] [--arms NAME:launch.SETTING=VALUE,... ...] [--rounds 9]
        [--out repair_cost.json]

Arms as bench/settings_ab.py takes them (`ieee:launch.REPAIR_DOT_PRECISION=ieee`); without any, the shipped
settings.
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

from sage_attention_pack.kernels import launch
from sage_attention_pack.sage_core import backend, bench, timing
from sage_attention_pack.sage_core.config import SageConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is a folder of scripts
from settings_ab import Settings, breakdown, parse_arms, parse_shape, run_shapes  # noqa: E402

GUARDED = ("clean", "one_tile", "one_head")
CASES = GUARDED + ("unguarded",)  # unguarded: the clean call's inputs, no repair counter
CHECKED_ROWS = 64  # rows of the repaired tile compared with FP32 attention


def poisoned(q, k, case: str):
    """Copies of q and k with the case's NaN: one query row of the first head, or one key of the last head."""
    q, k = q.clone(), k.clone()
    if case == "one_tile":
        q[0, 0, 5, 3] = float("nan")
    elif case == "one_head":
        k[0, -1, k.shape[2] // 2, 0] = float("nan")
    return q, k


def measure(shape: tuple, arms: dict, rounds: int, settings: Settings) -> dict:
    b, h, n, d = shape
    q, k, v = bench.model_shaped_inputs(b, h, n, d, torch.bfloat16, "cuda")
    config = backend.tuning_for(q.device, "fp8", launch.padded_head_dim(d), None, n, n, str(q.dtype), False)
    counters, calls, inputs = {}, {}, {case: poisoned(q, k, case) for case in GUARDED}
    inputs["unguarded"] = inputs["clean"]
    names = {(arm, case): case if len(arms) == 1 else f"{arm}_{case}" for arm in arms for case in CASES}
    for arm, arm_settings in arms.items():
        for case in CASES:
            name = names[arm, case]
            if case in GUARDED:
                counters[name] = torch.zeros(1, device="cuda", dtype=torch.int32)
            calls[name] = settings.bind(arm_settings, functools.partial(
                backend.run, *inputs[case], v, layout="HND", sm_scale=d ** -0.5, is_causal=False, bias=None,
                config=SageConfig(kernel="int8_fp8"), pv_fp8=True, return_lse=False, launch_config=config,
                repair_counter=counters.get(name)))
    sdpa = functools.partial(torch.nn.functional.scaled_dot_product_attention, q, k, v)
    ms = timing.interleaved_median_ms({**calls, "sdpa": sdpa}, rounds=rounds)
    row = {"shape": [b, h, n, d], "launch_config": config.key(), **ms}
    # the repaired tile, less its NaN row, against FP32 attention: the same reference for every arm
    qs, ks = inputs["one_tile"]
    ref = torch.nn.functional.scaled_dot_product_attention(
        qs[:, :1, :CHECKED_ROWS].float(), ks[:, :1].float(), v[:, :1].float())
    rows = torch.cat((torch.arange(5), torch.arange(6, CHECKED_ROWS))).to(q.device)
    for (arm, case), name in names.items():
        call, clean = calls[name], names[arm, "clean"]
        kernels = breakdown.kernel_ms(call)
        row[f"device_ms_{name}"] = sum(kernels.values())
        row[f"repair_ms_{name}"] = sum(t for kernel, t in kernels.items() if kernel.startswith("repair"))
        if case == "unguarded":
            if isinstance(ms.get(name), float) and isinstance(ms.get(clean), float):
                row[f"guard_ms_{arm}"] = ms[clean] - ms[name]
            continue
        counters[name].zero_()
        out = call()[0]
        torch.cuda.synchronize()
        row[f"tiles_repaired_{name}"] = int(counters[name].item())
        if case != "clean" and isinstance(ms.get(name), float) and isinstance(ms.get(clean), float):
            row[f"extra_ms_{name}"] = ms[name] - ms[clean]
        if case == "one_tile":
            row[f"repaired_max_abs_err_{name}"] = (out[:, :1, rows].float() - ref[:, :, rows]).abs().max().item()
    settings.restore()
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["flux_1024px"])
    ap.add_argument("--arms", nargs="+", default=[])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", default="repair_cost.json")
    args = ap.parse_args(argv)
    try:
        shapes = {name: parse_shape(name) for name in args.shapes}
        arms = parse_arms(args.arms) or {"shipped": {}}
    except ValueError as e:
        ap.error(str(e))
    if args.rounds < 1:
        ap.error("rounds must be at least 1")
    if not torch.cuda.is_available():
        raise SystemExit("repair_cost times the guarded call on a CUDA GPU; none is available")
    settings = Settings(arms)
    return run_shapes(shapes, lambda shape: measure(shape, arms, args.rounds, settings), args.out,
                      {"rounds": args.rounds, "arms": args.arms})


if __name__ == "__main__":
    sys.exit(main())
