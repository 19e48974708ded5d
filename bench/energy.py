"""Energy per attention call: each method runs back to back for a few seconds while nvidia-smi samples the board's
power, methods interleaved over rounds; joules per call and TOPS per watt beside TOPS.

    python bench/energy.py [--shapes wan21_480p_81f flux_1024px] [--seconds 3] [--rounds 2] [--out energy.json]

At the board's power cap the clock, not only the schedule, sets an attention kernel's speed (bench/NOTES.md, "Next"):
a method that finishes a call sooner at the same power spends less energy on it, and one that draws less power lets
the clock stay higher. Samples from the first half second of each run are left out (the board's reading lags).
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import threading
import time

import torch

from sage_attention_pack.sage_core.bench import (GPU_SHAPES, SAGE_VARIANTS, environment, model_shaped_inputs,
                                                 sage_method, sdpa_backends)
from sage_attention_pack.sage_core.progress import progress

DEFAULT_SHAPES = ("wan21_480p_81f", "flux_1024px", "sweep_d128_n16384", "sweep_d64_n16384")
DEFAULT_METHODS = ("sdpa_default", "sage_int8_fp8", "sage_auto")
SETTLE_S = 0.5  # samples this soon after a run starts are left out
SAMPLE_MS = 100


def methods() -> dict:
    """Every method this script can measure, by name: SDPA's backends and the Sage variants of the benchmark."""
    return {**sdpa_backends(), **{name: sage_method(cfg) for name, cfg in SAGE_VARIANTS.items()}}


class PowerSampler:
    """nvidia-smi sampling one GPU's power draw (W) and SM clock (MHz) every SAMPLE_MS, stamped on arrival."""

    def __init__(self, index: int):
        field = "power.draw.instant" if self.supported("power.draw.instant", index) else "power.draw"
        self.field = field
        self.samples: list[tuple[float, float, float]] = []
        self.proc = subprocess.Popen(
            ["nvidia-smi", "-i", str(index), f"--query-gpu={field},clocks.sm", "--format=csv,noheader,nounits",
             f"-lms={SAMPLE_MS}"], stdout=subprocess.PIPE, text=True)
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    @staticmethod
    def supported(field: str, index: int) -> bool:
        run = subprocess.run(["nvidia-smi", "-i", str(index), f"--query-gpu={field}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True)
        return run.returncode == 0 and run.stdout.strip().replace(".", "", 1).isdigit()

    def read(self) -> None:
        for line in self.proc.stdout:
            try:
                watts, mhz = (float(x) for x in line.split(","))
            except ValueError:  # "[N/A]" or a partial line
                continue
            self.samples.append((time.monotonic(), watts, mhz))

    def between(self, t0: float, t1: float) -> list[tuple[float, float]]:
        return [(w, c) for t, w, c in self.samples if t0 + SETTLE_S <= t <= t1]

    def close(self) -> None:
        self.proc.terminate()


def run_for(fn, seconds: float) -> tuple[float, float, int]:
    """(start, end, calls) of fn run back to back for about `seconds` on the GPU (synchronised at both ends)."""
    torch.cuda.synchronize()
    t0 = time.monotonic()
    calls = 0
    while time.monotonic() - t0 < seconds:
        fn()
        calls += 1
        if calls % 8 == 0:
            torch.cuda.synchronize()  # keeps the host within a few calls of the device
    torch.cuda.synchronize()
    return t0, time.monotonic(), calls


def measure(shapes, fns: dict, seconds: float, rounds: int) -> dict:
    """fns: the methods to measure, name -> callable (q, k, v), as methods() gives them."""
    names = tuple(fns)
    sampler = PowerSampler(torch.cuda.current_device())
    try:
        time.sleep(2 * SETTLE_S + 1.0)
        idle = [w for w, _ in sampler.between(time.monotonic() - 1.0 - SETTLE_S, time.monotonic())]
        result = {"environment": environment(), "power_field": sampler.field, "seconds_per_run": seconds,
                  "rounds": rounds, "idle_watts": statistics.median(idle) if idle else None, "shapes": {}}
        for name in progress(list(shapes), desc="energy", unit="shape"):
            b, h, n, d = GPU_SHAPES[name]
            q, k, v = model_shaped_inputs(b, h, n, d, torch.bfloat16, "cuda")
            runs = {m: [] for m in names}
            for m in names:  # compile, tune and settle before any run counts
                for _ in range(3):
                    fns[m](q, k, v)
            for r in range(rounds):
                for m in (names if r % 2 == 0 else names[::-1]):
                    t0, t1, calls = run_for(functools.partial(fns[m], q, k, v), seconds)
                    time.sleep(SAMPLE_MS / 1000 * 2)  # the last samples of the run arrive
                    runs[m].append((t0, t1, calls, sampler.between(t0, t1)))
            ops = 4 * b * h * n * n * d
            rows = {}
            for m, segs in runs.items():
                ms = sum(t1 - t0 for t0, t1, _, _ in segs) / sum(c for _, _, c, _ in segs) * 1e3
                samples = [s for *_, seg in segs for s in seg]
                watts = statistics.mean(w for w, _ in samples)
                rows[m] = {"ms": ms, "tops": ops / ms / 1e9, "watts": watts,
                           "mhz": statistics.median(c for _, c in samples), "joules_per_call": watts * ms / 1e3,
                           "tops_per_watt": ops / ms / 1e9 / watts, "power_samples": len(samples)}
            base = rows.get("sdpa_default")
            for row in rows.values():
                if base:
                    row["energy_vs_sdpa_default"] = row["joules_per_call"] / base["joules_per_call"]
            result["shapes"][name] = {"shape": {"B": b, "H": h, "N": n, "D": d}, "methods": rows}
            del q, k, v
            torch.cuda.empty_cache()
        return result
    finally:
        sampler.close()


def main(argv=None) -> int:
    table = methods()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=list(DEFAULT_SHAPES), choices=sorted(GPU_SHAPES))
    ap.add_argument("--methods", nargs="*", default=list(DEFAULT_METHODS), choices=sorted(table))
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each method's run")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="energy.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("energy per call is measured on an NVIDIA GPU (nvidia-smi samples its power)")
    result = measure(args.shapes, {m: table[m] for m in args.methods}, args.seconds, args.rounds)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    for name, shape in result["shapes"].items():
        for m, row in shape["methods"].items():
            print(f"{name:22s} {m:16s} {row['tops']:7.1f} TOPS {row['watts']:6.1f} W {row['mhz']:6.0f} MHz "
                  f"{row['joules_per_call'] * 1e3:9.2f} mJ/call {row['tops_per_watt']:5.2f} TOPS/W "
                  f"({row.get('energy_vs_sdpa_default', float('nan')):.3f}x SDPA's energy)")
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
