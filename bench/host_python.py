"""The pack's own Python per attention call, its kernel launches left out: from `sage_attention_pack`'s dispatcher
down to the call plan's launch sites, with every launch site of the plans replaced by one that does nothing once
the first call has compiled and planned for real. What is left is the host work the pack itself adds per call,
without Triton's launcher (bench/host_time.py measures the whole host time per call on a GPU).

    python bench/host_python.py [--shape 1 256 24 128] [--calls 1000] [--repeats 7] [--kernel int8_fp8]
                                [--through dispatch|dispatch_rope|override]

Reports the minimum and median over --repeats of the mean µs per call over --calls calls (CPU time of this
process: what the machine's other work takes is not counted). On a CPU the first call runs through Triton's
interpreter (TRITON_INTERPRET=1 is set when there is no GPU); the timed calls then take the path a GPU's call
plan takes up to its launches, with the portable kernel's launch sites (the Hopper kernel's need an sm90 GPU).
--through override times the same calls through the ComfyUI node's attention hook, as a model's forward makes them;
--through dispatch_rope with a rotary table handed over, as the models' rotary hand-offs call the dispatcher.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the pack's parent: `sage_attention_pack` importable
from sage_attention_pack.kernels import call_plan  # noqa: E402
from sage_attention_pack.sage_core.bench import environment  # noqa: E402
from sage_attention_pack.sage_core.config import SageConfig  # noqa: E402
from sage_attention_pack.sage_core.dispatch import DispatchStats, attention  # noqa: E402


def one_call(q, k, v, kernel: str, through: str):
    """A function of no arguments making one call the way `through` says, and the stats that count it: "dispatch",
    sage_core's dispatcher on [B, N, H, D] views; "dispatch_rope", the same with a rotary table handed over as the
    models' hand-offs hand theirs (rope.handed_pe: kept from the call before); "override", the ComfyUI node's
    attention hook (SageOverride) as a model's forward calls it, on [B, N, H·D] tensors inside one forward's counter
    (nodes/override.py imports nothing of ComfyUI)."""
    config = SageConfig(kernel=kernel)
    if through == "dispatch":
        stats = DispatchStats()
        return (lambda: attention(q, k, v, tensor_layout="NHD", config=config, stats=stats)), stats
    if through == "dispatch_rope":
        from sage_attention_pack.sage_core import rope

        positions = torch.arange(q.shape[1], device=q.device)[None]
        pe = rope.axis_table(positions, q.shape[-1], 10000.0).unsqueeze(1)  # Flux's layout, one table for all heads
        table = rope.handed_pe(pe)  # what a model's hand-off gives: the kernels' layout, made once and then kept
        stats = DispatchStats()
        return (lambda: attention(q, k, v, tensor_layout="NHD", config=config, stats=stats, rope=table())), stats
    from sage_attention_pack.nodes import routing
    from sage_attention_pack.nodes.override import SageOverride

    override = SageOverride(config)
    b, n, h, d = q.shape
    flat = [t.reshape(b, n, h * d) for t in (q, k, v)]
    options = {routing.ForwardCounter.KEY: routing.ForwardCounter()}

    def unpatched(*args, **kwargs):
        raise AssertionError("ComfyUI's own attention was asked for: the call did not run through Sage")

    return (lambda: override(unpatched, *flat, h, transformer_options=options)), override.stats


def per_call_us(calls: int, repeats: int, shape, kernel: str, through: str = "dispatch") -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    b, n, h, d = shape
    q, k, v = (torch.randn(b, n, h, d, dtype=torch.bfloat16, device=device) for _ in range(3))
    call, stats = one_call(q, k, v, kernel, through)
    call()  # compiles and plans for real
    if device == "cuda":
        torch.cuda.synchronize()
    real_run = call_plan.CallPlan.run
    call_plan.CallPlan.run = lambda self, site, fn, grid, args, kwargs: None  # the launches left out
    try:
        samples = []
        for _ in range(repeats):
            start = time.process_time()
            for _ in range(calls):
                call()
            samples.append((time.process_time() - start) / calls * 1e6)
    finally:
        call_plan.CallPlan.run = real_run
    return {"shape_bnhd": list(shape), "device": device, "kernel": kernel, "through": through, "calls": calls,
            "min_us": min(samples), "median_us": statistics.median(samples), "samples_us": samples,
            "served": stats.snapshot()["sage"], "rotary_fused": stats.snapshot()["rotary_fused"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=4, default=[1, 256, 24, 128], metavar=("B", "N", "H", "D"))
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--kernel", default="int8_fp8", choices=["int8_fp8", "int8_fp16"])
    ap.add_argument("--through", default="dispatch", choices=["dispatch", "dispatch_rope", "override"],
                    help="sage_core's dispatcher (with a rotary table handed over: dispatch_rope), or the ComfyUI "
                         "node's attention hook in ComfyUI's call convention")
    ap.add_argument("--out", default=None, help="also write the result as JSON here")
    args = ap.parse_args(argv)
    if args.calls < 1 or args.repeats < 1 or min(args.shape) < 1:
        ap.error("--calls, --repeats and every --shape size must be at least 1")
    result = {"environment": environment(),
              **per_call_us(args.calls, args.repeats, args.shape, args.kernel, args.through)}
    print(json.dumps({key: result[key] for key in ("min_us", "median_us", "served")}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
