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
import json
import sys

import torch

from sage_attention_pack.kernels import hopper_launch, launch
from sage_attention_pack.kernels.call_plan import PLANS
from sage_attention_pack.sage_core import backend, bench, timing
from sage_attention_pack.sage_core.config import SageConfig
from sage_attention_pack.sage_core.metrics import attention_error
from sage_attention_pack.sage_core.progress import progress

DEFAULT_SHAPES = ("flux_1024px", "1x26x4608x128", "2x24x4608x128", "sweep_d128_n8192", "sweep_d128_n16384",
                  "wan21_480p_81f")
ERROR_HEADS = 4  # the last heads, against FP32 attention, where the key count allows it
ERROR_MAX_KEYS = 8192


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """A benchmark table name, or BxHxNxD; ValueError names what is wrong."""
    if text in bench.GPU_SHAPES:
        return bench.GPU_SHAPES[text]
    parts = text.split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"shape {text!r} is neither a benchmark shape ({', '.join(sorted(bench.GPU_SHAPES))}) "
                         "nor BxHxNxD with positive integers")
    return tuple(int(p) for p in parts)


class SettingSwitch:
    """Callables that run with module settings of hopper_launch ({name: value}) at given values: the settings and
    the call plans (which keep what the settings made them with) change only when a callable of other values runs,
    so a visit of the interleaved timing pays for it in its untimed calls. restore() puts the shipped values
    back."""

    def __init__(self, shipped: dict | None = None):
        self.shipped, self.current = shipped or {"TAIL_SPLIT": "policy"}, None

    def bind(self, settings: dict, fn):
        def call():
            if self.current != settings:
                for name, value in settings.items():
                    setattr(hopper_launch, name, value)
                PLANS.clear()
                self.current = settings
            return fn()
        return call

    def restore(self):
        for name, value in self.shipped.items():
            setattr(hopper_launch, name, value)
        PLANS.clear()
        self.current = None


def fp8_call(shape: tuple, config=None) -> tuple:
    """Model-shaped BF16 inputs of `shape` on the GPU, the launch configuration the tables give their FP8 call (or
    `config`), and that call (backend.run, the non-finite guard on, as in a workflow): (q, k, v, config, call)."""
    b, h, n, d = shape
    q, k, v = bench.model_shaped_inputs(b, h, n, d, torch.bfloat16, "cuda")
    config = config or backend.tuning_for(q.device, "fp8", launch.padded_head_dim(d), None, n, n, str(q.dtype),
                                          False)
    repairs = torch.zeros(1, device="cuda", dtype=torch.int32)
    call = functools.partial(backend.run, q, k, v, layout="HND", sm_scale=d ** -0.5, is_causal=False, bias=None,
                             config=SageConfig(kernel="int8_fp8"), pv_fp8=True, return_lse=False,
                             launch_config=config, repair_counter=repairs)
    return q, k, v, config, call


def last_heads_error(out: torch.Tensor, q, k, v) -> float:
    """Relative L1 error of `out` against FP32 attention on the last ERROR_HEADS heads."""
    ref = bench.reference(*(t[:, -ERROR_HEADS:] for t in (q, k, v)))
    return attention_error(out[:, -ERROR_HEADS:], ref)["rel_l1"]


def measure(shape: tuple, rounds: int, switch: SettingSwitch) -> dict:
    b, h, n, d = shape
    q, k, v, config, ours = fp8_call(shape)
    items = hopper_launch.work_items_per_head(config, n) * b * h
    switch.restore()
    policy = hopper_launch.tail_split(config, items, n, q.device)
    hopper_launch.TAIL_SPLIT = "forced"
    forced = hopper_launch.tail_split(config, items, n, q.device)
    split, unsplit = switch.bind({"TAIL_SPLIT": "forced"}, ours), switch.bind({"TAIL_SPLIT": "off"}, ours)
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
    if n <= ERROR_MAX_KEYS:
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
    result = {"environment": bench.environment(), "rounds": args.rounds,
              "multiprocessors": hopper_launch.multiprocessors(torch.device("cuda")), "shapes": {}}
    switch = SettingSwitch()
    with torch.inference_mode():
        for name in progress(list(shapes), desc="shapes", unit="shape"):
            row = result["shapes"][name] = measure(shapes[name], args.rounds, switch)
            print(name, json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
