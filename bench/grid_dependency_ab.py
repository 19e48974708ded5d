"""Whole FP8 calls with the call's launches chained by programmatic dependent launch and without
(kernels/grid_dependency.py), and PyTorch's default SDPA beside them, in interleaved rounds on one machine; per
shape the times, the ratios to SDPA, the saving, and whether both ways give the same output bits.

    python bench/grid_dependency_ab.py [--shapes flux_1024px ...] [--rounds 9] [--out grid_dependency_ab.json]

A shape is a name of the benchmark's table or BxHxNxD.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

from sage_attention_pack.kernels import grid_dependency, launch
from sage_attention_pack.kernels.call_plan import PLANS
from sage_attention_pack.sage_core import backend, bench, timing
from sage_attention_pack.sage_core.config import SageConfig
from sage_attention_pack.sage_core.progress import progress

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tail_split_ab import parse_shape  # noqa: E402 - bench/, beside this script

DEFAULT_SHAPES = ("flux_1024px", "sdxl_1024px", "sweep_d128_n2048", "sweep_d128_n8192", "sweep_d64_n16384",
                  "wan21_480p_81f")


class ChainSwitch:
    """Callables that run with the launches chained or not: the switch and the call plans (whose launch slots keep
    the kernels their first launch compiled) change only when a callable of the other setting runs, so a visit of
    the interleaved timing pays for it in its untimed calls."""

    def __init__(self):
        self.current = None
        self.shipped = grid_dependency.ENABLED

    def bind(self, chained: bool, fn):
        def call():
            if self.current != chained:
                grid_dependency.ENABLED = chained
                PLANS.clear()
                self.current = chained
            return fn()
        return call

    def restore(self):
        grid_dependency.ENABLED = self.shipped
        PLANS.clear()
        self.current = None


def measure(shape: tuple, rounds: int, switch: ChainSwitch) -> dict:
    b, h, n, d = shape
    q, k, v = bench.model_shaped_inputs(b, h, n, d, torch.bfloat16, "cuda")
    config = backend.tuning_for(q.device, "fp8", launch.padded_head_dim(d), None, n, n, str(q.dtype), False)
    repairs = torch.zeros(1, device="cuda", dtype=torch.int32)  # the non-finite guard runs, as in a workflow
    ours = functools.partial(backend.run, q, k, v, layout="HND", sm_scale=d ** -0.5, is_causal=False, bias=None,
                             config=SageConfig(kernel="int8_fp8"), pv_fp8=True, return_lse=False,
                             launch_config=config, repair_counter=repairs)
    chained, unchained = switch.bind(True, ours), switch.bind(False, ours)
    ms = timing.interleaved_median_ms({"chained": chained, "unchained": unchained,
                                       "sdpa": functools.partial(torch.nn.functional.scaled_dot_product_attention,
                                                                 q, k, v)}, rounds=rounds)
    row = {"shape": [b, h, n, d], "launch_config": config.key(), **ms}
    if all(isinstance(ms.get(m), float) for m in ("chained", "unchained", "sdpa")):
        row.update(chained_vs_sdpa=ms["sdpa"] / ms["chained"], unchained_vs_sdpa=ms["sdpa"] / ms["unchained"],
                   saving_pct=100 * (1 - ms["chained"] / ms["unchained"]))
    with torch.no_grad():
        out_chained, out_plain = chained()[0].clone(), unchained()[0].clone()
    row["identical_output"] = bool(torch.equal(out_chained, out_plain))
    row["repairs"] = int(repairs.item())
    switch.restore()
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES))
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", default="grid_dependency_ab.json")
    args = ap.parse_args(argv)
    try:
        shapes = {name: parse_shape(name) for name in args.shapes}
    except ValueError as e:
        ap.error(str(e))
    if args.rounds < 1:
        ap.error("rounds must be at least 1")
    if not torch.cuda.is_available():
        raise SystemExit("grid_dependency_ab times calls on a CUDA GPU; none is available")
    result = {"environment": bench.environment(), "rounds": args.rounds, "shapes": {}}
    switch = ChainSwitch()
    with torch.inference_mode():
        for name in progress(list(shapes), desc="shapes", unit="shape"):
            row = result["shapes"][name] = measure(shapes[name], args.rounds, switch)
            print(name, json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
