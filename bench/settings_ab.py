"""Whole FP8 calls under settings of the kernels' launchers, arm by arm, with PyTorch's default SDPA beside them, in
interleaved rounds on one machine; per shape the times, the ratios to SDPA and to the first arm, whether every arm
gives the first arm's bits, each arm's kernels (device milliseconds per call, from the profiler), its host
milliseconds per call, whether the Hopper kernel coded Q itself, and the relative L1 error against FP32 attention on
the last heads.

    python bench/settings_ab.py [--arms NAME:module.SETTING=VALUE,... ...] [--shapes flux_1024px ...]
        [--config KEY] [--rounds 9] [--out settings_ab.json]

An arm is NAME:module.SETTING=VALUE[,...] over kernels/launch.py (`launch.STATS_AHEAD=2`),
kernels/hopper_launch.py (`hopper_launch.Q_IN_KERNEL=1`), kernels/head_groups.py (`head_groups.GROUPS=1`) and
kernels/carried_stats.py (`carried_stats.PLAIN=1`: the site's statistics from its call before, not the call's own);
values are integers (1/0 for switches) or words. The default arms: Q coded by the quantization pass (as shipped), and
coded inside the Hopper ping-pong kernel with its codes read from shared memory or from registers
(hopper_launch.codes_q_in_kernel). A shape is a name of the benchmark's table or BxHxNxD.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys

import torch

from sage_attention_pack.kernels import carried_stats, head_groups, hopper_launch, launch, tuning
from sage_attention_pack.kernels.call_plan import PLANS
from sage_attention_pack.sage_core import backend, bench, timing
from sage_attention_pack.sage_core.config import SageConfig
from sage_attention_pack.sage_core.metrics import attention_error
from sage_attention_pack.sage_core.progress import progress


breakdown = bench.bench_script("breakdown")  # kernel_ms: each launch's device time

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


def fp8_call(shape: tuple, config=None) -> tuple:
    """Model-shaped BF16 inputs of `shape` on the GPU, the launch configuration the tables give their FP8 call (or
    `config`), and that call (backend.run, the non-finite guard on and a call site named, as in a workflow: its
    statistics carried where kernels/carried_stats.py's settings take them): (q, k, v, config, call)."""
    b, h, n, d = shape
    q, k, v = bench.model_shaped_inputs(b, h, n, d, torch.bfloat16, "cuda")
    config = config or backend.tuning_for(q.device, "fp8", launch.padded_head_dim(d), None, n, n, str(q.dtype),
                                          False)
    repairs = torch.zeros(1, device="cuda", dtype=torch.int32)
    call = functools.partial(backend.run, q, k, v, layout="HND", sm_scale=d ** -0.5, is_causal=False, bias=None,
                             config=SageConfig(kernel="int8_fp8"), pv_fp8=True, return_lse=False,
                             launch_config=config, repair_counter=repairs, carry_key="settings_ab")
    return q, k, v, config, call


def last_heads_error(out: torch.Tensor, q, k, v) -> float:
    """Relative L1 error of `out` against FP32 attention on the last ERROR_HEADS heads."""
    ref = bench.reference(*(t[:, -ERROR_HEADS:] for t in (q, k, v)))
    return attention_error(out[:, -ERROR_HEADS:], ref)["rel_l1"]


MODULES = {"launch": launch, "hopper_launch": hopper_launch, "head_groups": head_groups,
           "carried_stats": carried_stats}
DEFAULT_SHAPES = ("flux_1024px", "sweep_d128_n16384")
DEFAULT_ARMS = ("pass:hopper_launch.Q_IN_KERNEL=0",
                "in_kernel:hopper_launch.Q_IN_KERNEL=1,hopper_launch.IN_KERNEL_Q_REGISTERS=0",
                "in_kernel_regs:hopper_launch.Q_IN_KERNEL=1,hopper_launch.IN_KERNEL_Q_REGISTERS=1")


def parse_arm(text: str) -> tuple[str, dict]:
    """"NAME:module.SETTING=VALUE,..." -> (NAME, {(module, SETTING): value}); a module or setting that does not
    exist, or a missing value, is named."""
    name, _, spec = text.partition(":")
    if not name or not spec:
        raise ValueError(f"arm {text!r} is not NAME:module.SETTING=VALUE[,...]")
    settings = {}
    for item in spec.split(","):
        key, eq, value = item.partition("=")
        module, _, setting = key.strip().partition(".")
        if module not in MODULES or not hasattr(MODULES[module], setting) or not setting.isupper():
            raise ValueError(f"arm {name!r}: {key!r} is not a setting of {' or '.join(MODULES)}")
        if not eq or not value.strip():
            raise ValueError(f"arm {name!r}: {key} needs a value")
        value = value.strip()
        settings[(module, setting)] = int(value) if value.lstrip("-").isdigit() else value
    return name, settings


def parse_arms(texts: list) -> dict:
    """{NAME: settings} of parse_arm's texts; ValueError names a bad arm, or two arms that share a name."""
    arms = dict(parse_arm(text) for text in texts)
    if len(arms) != len(texts):
        raise ValueError("two arms share a name")
    return arms


class Settings:
    """Callables that run under an arm's settings: the settings change, and the call plans (which keep what the
    settings made them with) are cleared, only when a callable of another arm runs, so a visit of the interleaved
    timing pays for it in its untimed calls. restore() puts every setting any arm touched back as it was."""

    def __init__(self, arms: dict):
        keys = {key for settings in arms.values() for key in settings}
        self.shipped = {key: getattr(MODULES[key[0]], key[1]) for key in keys}
        self.current = None

    def apply(self, settings: dict):
        if self.current is not settings:
            for (module, setting), value in {**self.shipped, **settings}.items():
                setattr(MODULES[module], setting, type(self.shipped[(module, setting)])(value))
            PLANS.clear()
            self.current = settings

    def bind(self, settings: dict, fn):
        def call():
            self.apply(settings)
            return fn()
        return call

    def restore(self):
        self.apply(self.shipped)
        self.current = None


def measure(shape: tuple, arms: dict, rounds: int, settings: Settings, config=None) -> dict:
    b, h, n, d = shape
    q, k, v, config, ours = fp8_call(shape, config)
    calls = {name: settings.bind(arm, ours) for name, arm in arms.items()}
    sdpa = functools.partial(torch.nn.functional.scaled_dot_product_attention, q, k, v)
    ms = timing.interleaved_median_ms({**calls, "sdpa": sdpa}, rounds=rounds)
    row = {"shape": [b, h, n, d], "launch_config": config.key(), **ms}
    first = next(iter(arms))
    for name in arms:
        if isinstance(ms.get(name), float) and isinstance(ms.get("sdpa"), float):
            row[f"{name}_vs_sdpa"] = ms["sdpa"] / ms[name]
            if name != first and isinstance(ms.get(first), float):
                row[f"{name}_saving_pct"] = 100 * (1 - ms[name] / ms[first])
    outs = {}
    for name, call in calls.items():
        outs[name] = call()[0].clone()
        row[f"kernels_{name}"] = breakdown.kernel_ms(call)
        row[f"host_ms_{name}"] = breakdown.host_ms(call)
        row[f"q_in_kernel_{name}"] = launch.hopper_paths(q, k, v, config=config, k_group=config.block_n, pv_fp8=True,
                                                          is_causal=False, has_bias=False, rope=False)[1]
        if n <= ERROR_MAX_KEYS:
            row[f"rel_l1_{name}"] = last_heads_error(outs[name], q, k, v)
    row["same_bits"] = all(torch.equal(out, outs[first]) for out in outs.values())
    settings.restore()
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS))
    ap.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES))
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--config", help="a launch configuration key for every shape (default: the tables')")
    ap.add_argument("--out", default="settings_ab.json")
    args = ap.parse_args(argv)
    try:
        shapes = {name: parse_shape(name) for name in args.shapes}
        arms = parse_arms(args.arms)
        config = tuning.LaunchConfig.from_key(args.config) if args.config else None
    except ValueError as e:
        ap.error(str(e))
    if args.rounds < 1:
        ap.error("rounds must be at least 1")
    if not torch.cuda.is_available():
        raise SystemExit("settings_ab times the kernels' calls on a CUDA GPU; none is available")
    settings = Settings(arms)
    return run_shapes(shapes, lambda shape: measure(shape, arms, args.rounds, settings, config), args.out,
                      {"rounds": args.rounds, "arms": args.arms})


def run_shapes(shapes: dict, measure_shape, out: str, header: dict) -> int:
    """Measure each named shape (with a progress bar, each row printed as it comes) and write the JSON: the machine's
    environment, `header`, and the rows by shape."""
    result = {"environment": bench.environment(), **header, "shapes": {}}
    with torch.inference_mode():
        for name in progress(list(shapes), desc="shapes", unit="shape"):
            row = result["shapes"][name] = measure_shape(shapes[name])
            print(name, json.dumps(row), flush=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
