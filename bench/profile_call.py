"""Sage calls of one benchmark shape with a forced launch configuration, back to back, for a profiler to pick one
of them: the first call compiles, a later one is the kernel to profile. The H200 profiles in bench/NOTES.md were
taken this way, one kernel each:

    ncu -k regex:sage_fwd_sm90 --launch-skip 2 --launch-count 1 --section SpeedOfLight --section WarpStateStats \\
        --section SchedulerStats --csv --page details \\
        python bench/profile_call.py sweep_d64_n16384 m64n128w4s4pdgpppntc3
    ncu -k regex:sage_fwd_sm90 --launch-skip 2 --launch-count 1 --csv --page raw \\
        --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio" \\
        python bench/profile_call.py wan21_480p_81f m64n128w4s4mcpdgppplr

Prints one JSON line: the shape, the configuration, the kernel that served it and its error against exact
attention. Without a GPU it runs a CPU shape (sage_core.bench.CPU_SHAPES) through Triton's interpreter.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the pack's parent: `sage_attention_pack` importable
from sage_attention_pack.kernels import tuning  # noqa: E402
from sage_attention_pack.sage_core import backend  # noqa: E402
from sage_attention_pack.sage_core.bench import (ACCURACY_HEADS, CPU_SHAPES, GPU_SHAPES,  # noqa: E402
                                                 kernel_served, model_shaped_inputs, reference)
from sage_attention_pack.sage_core.config import SageConfig  # noqa: E402
from sage_attention_pack.sage_core.metrics import attention_error  # noqa: E402


def profile_calls(shape_name: str, key: str, calls: int = 3, kernel: str = "int8_fp8") -> dict:
    """`calls` Sage calls of `shape_name` with launch configuration `key`, then what served them."""
    if calls < 1:
        raise ValueError(f"calls must be at least 1, got {calls}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    table = GPU_SHAPES if device == "cuda" else CPU_SHAPES
    if shape_name not in table:
        raise ValueError(f"unknown shape {shape_name!r} on {device}; known: {sorted(table)}")
    lc = tuning.LaunchConfig.from_key(key)
    b, h, n, d = table[shape_name]
    q, k, v = model_shaped_inputs(b, h, n, d, torch.bfloat16, device)
    cfg, pv_fp8 = SageConfig(kernel=kernel), kernel == "int8_fp8"
    for _ in range(calls):
        out = backend.run(q, k, v, layout="HND", sm_scale=d ** -0.5, is_causal=False, bias=None, config=cfg,
                          pv_fp8=pv_fp8, return_lse=False, launch_config=lc)[0]
    if device == "cuda":
        torch.cuda.synchronize()
    return {"shape": shape_name, "B": b, "H": h, "N": n, "D": d, "config": key, "calls": calls, "kernel": kernel,
            "served_by": kernel_served(q, k, v, cfg, lc, pv_fp8),
            **attention_error(out[:, :min(h, ACCURACY_HEADS)].float(), reference(q, k, v))}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", help=f"GPU: {sorted(GPU_SHAPES)}; CPU: {sorted(CPU_SHAPES)}")
    ap.add_argument("config", help="a launch configuration key, e.g. m64n128w4s4pdgpppntc3")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--kernel", default="int8_fp8", choices=["int8_fp8", "int8_fp16"])
    args = ap.parse_args(argv)
    print(json.dumps(profile_calls(args.shape, args.config, args.calls, args.kernel)))


if __name__ == "__main__":
    main()
