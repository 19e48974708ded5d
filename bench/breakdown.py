"""Where one Sage call's time goes on this GPU: the quantization launches alone, the whole call, every kernel
the call launches (device time from PyTorch's profiler; a kernel launched twice per call, as the quantization's,
listed per launch, with the bytes each quantization launch moves and the bandwidth that makes, beside what PyTorch's
own copy and add reach on the same inputs), and PyTorch's SDPA
on the same inputs (back-to-back timing, as in a model forward), and the host's time per call (Python and launches:
where it exceeds the device's, short calls are bound by the host).

    python bench/breakdown.py [--shapes flux_1024px wan21_480p_81f] [--configs KEY ...] [--out breakdown.json]

Without --configs each shape runs with the launch configuration the tuning table gives it, for FP8 and FP16
P·V; with --configs, FP8 P·V with each named LaunchConfig key (see bench/compare_configs.py).
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch

from sage_attention_pack.kernels import launch, tuning
from sage_attention_pack.sage_core import backend, bench
from sage_attention_pack.sage_core.config import SageConfig
from sage_attention_pack.sage_core.timing import median_ms

PROFILED_CALLS = 5
HOST_TIMED_CALLS = 20  # few enough that the launch queue never fills: the host is never held up by the device


def host_ms(call) -> float:
    """Host milliseconds per call: Python and launch work alone, the device left to catch up afterwards. Where
    this exceeds the device's time per call, back-to-back calls are bound by the host."""
    call()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(HOST_TIMED_CALLS):
        call()
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize()
    return elapsed * 1e3 / HOST_TIMED_CALLS


def kernel_ms(call) -> dict:
    """Mean device milliseconds per call of every kernel that call() launches, by kernel name; a kernel launched
    more than once per call is listed per launch, in launch order ("quantize_kernel [1/2]", "[2/2]")."""
    call()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED_CALLS):
            call()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    launches = defaultdict(list)
    for event in events:
        launches[event.name[:80]].append(event.device_time / 1e3)
    per_kernel = {}
    for name, times in launches.items():
        per_call = max(1, len(times) // PROFILED_CALLS)
        for i in range(per_call):
            key = name if per_call == 1 else f"{name} [{i + 1}/{per_call}]"
            per_kernel[key] = sum(times[i::per_call]) / PROFILED_CALLS
    return dict(sorted(per_kernel.items(), key=lambda kv: -kv[1]))


def quantize_launch_bytes(shape, pv: str, config: SageConfig, q_group: int, k_group: int,
                          q_in_kernel: bool = False) -> list[int]:
    """Bytes each quantization launch of one call reads and writes in DRAM, in launch order (as
    launch.quantize_qkv splits the work; scales, means and partial sums left out, they are < 1%): with statistics,
    Q's codes beside K's sampled statistics (and V's full ones where V is coded or smoothed), then K's codes and
    V's; without, Q's and K's codes in one. The codes' sizes are those of the launcher's own buffers. q_in_kernel:
    the attention kernel codes Q (hopper_launch.codes_q_in_kernel), no launch reads or writes it."""
    b, h, n, d = shape
    head = torch.empty(shape, device="meta", dtype=torch.bfloat16)
    out = launch.quant_buffers(head, head, q_group=q_group, k_group=k_group, block_d=launch.padded_head_dim(d),
                               smooth_k=config.smooth_k, smooth_v=config.smooth_v, pv_fp8=pv == "fp8")
    q_codes = 0 if q_in_kernel else head.nbytes + out["q8"].nbytes  # bf16 read, codes written
    k_codes = head.nbytes + out["k8"].nbytes
    v_codes = head.nbytes + out["v8"].nbytes if out["v8"] is not None else 0
    if not (config.smooth_k or out["v_mean"] is not None):  # no statistics: one launch
        return [q_codes + k_codes]
    sampled = launch.sampled_key_count(n, launch.stats_every(n))
    stats = 2 * b * h * d * (sampled if config.smooth_k else 0) + (head.nbytes if out["v_mean"] is not None else 0)
    return [q_codes + stats, k_codes + v_codes]


def bandwidth_reference(q, k) -> dict:
    """What PyTorch's memory-bound elementwise kernels reach on the call's own inputs, the yardstick for the
    quantization launches' bandwidth: a copy of Q (one input read, one written) and Q + K into a buffer (two read,
    one written: the bytes of the second quantization launch, which reads K and V and writes their one-byte codes).
    Device time from PyTorch's profiler, as the call's kernels."""
    out = torch.empty_like(q)
    refs = {"copy": (lambda: out.copy_(q), 2 * q.nbytes), "add": (lambda: torch.add(q, k, out=out), 3 * q.nbytes)}
    result = {}
    for name, (fn, nbytes) in refs.items():
        ms = sum(kernel_ms(fn).values())
        result[name] = {"ms": ms, "bytes": nbytes, "tb_per_s": nbytes / (ms * 1e9)}
    return result


def breakdown(shape, pv: str, launch_config=None) -> dict:
    b, h, n, d = shape
    q, k, v = bench.model_shaped_inputs(b, h, n, d, torch.bfloat16, "cuda")
    config = SageConfig(kernel="int8_fp8" if pv == "fp8" else "int8_fp16")
    block_d = launch.padded_head_dim(d)
    cfg = launch_config or backend.tuning_for(q.device, pv, block_d, None, n, n, str(q.dtype), False)
    q_group, k_group = launch.quant_groups(config.q_group_rows, config.k_group_rows, cfg)
    # as launch.sage_forward decides it: the Hopper kernel coding Q itself leaves the quantization Q's pass
    q_in_kernel = launch.hopper_paths(q, k, v, config=cfg, k_group=k_group, pv_fp8=pv == "fp8", is_causal=False,
                                      has_bias=False, rope=False)[1]
    quant = median_ms(lambda: launch.quantize_qkv(
        q, k, v, q_group=q_group, k_group=k_group, block_d=block_d, q_multiplier=d ** -0.5 * launch.LOG2E,
        smooth_k=config.smooth_k, smooth_v=config.smooth_v, pv_fp8=pv == "fp8", q_in_kernel=q_in_kernel), warmup=2)

    repairs = torch.zeros(1, device="cuda", dtype=torch.int32)  # the non-finite guard runs, as in a workflow

    def call():
        return backend.run(q, k, v, layout="HND", sm_scale=d ** -0.5, is_causal=False, bias=None, config=config,
                           pv_fp8=pv == "fp8", return_lse=False, launch_config=launch_config,
                           repair_counter=repairs)
    def sdpa_call():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    whole = median_ms(call, warmup=2)
    per_kernel = kernel_ms(call)
    sdpa = median_ms(sdpa_call, warmup=2)
    ops = 4 * b * h * n * n * d
    return {"launch_config": cfg.key(), "q_in_kernel": q_in_kernel, "quantize_ms": quant, "call_ms": whole,
            "host_ms": host_ms(call),
            "sdpa_ms": sdpa, "sdpa_host_ms": host_ms(sdpa_call),
            "quantize_share": quant / whole, "attention_tops_without_quantize": ops / ((whole - quant) * 1e9),
            "call_tops": ops / (whole * 1e9), "sdpa_tops": ops / (sdpa * 1e9), "kernel_ms": per_kernel,
            "quantize_launches": quantize_launches(per_kernel,
                                                   quantize_launch_bytes(shape, pv, config, q_group, k_group,
                                                                         q_in_kernel)),
            "bandwidth_reference": bandwidth_reference(q, k)}


def quantize_launches(per_kernel: dict, launch_bytes: list[int]) -> list[dict]:
    """Each quantization launch's device time with the bytes it moves and the bandwidth that makes."""
    names = [k for k in per_kernel if k.startswith("quantize_kernel")]
    names.sort(key=lambda k: k.rsplit("[", 1)[-1])  # launch order
    if len(names) != len(launch_bytes):
        return []
    return [{"launch": name, "ms": per_kernel[name], "bytes": nbytes, "tb_per_s": nbytes / (per_kernel[name] * 1e9)}
            for name, nbytes in zip(names, launch_bytes)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=["flux_1024px", "sdxl_1024px", "wan21_480p_81f"])
    ap.add_argument("--configs", nargs="*", default=[], help="LaunchConfig keys (FP8 P·V)")
    ap.add_argument("--out", default="breakdown.json")
    args = ap.parse_args()
    runs = [(key, "fp8", tuning.LaunchConfig.from_key(key)) for key in args.configs] or [
        ("table", pv, None) for pv in ("fp8", "fp16")]
    result = {"environment": bench.environment(), "shapes": {}}
    with torch.inference_mode():
        for name in args.shapes:
            for label, pv, launch_config in runs:
                row = breakdown(bench.GPU_SHAPES[name], pv, launch_config)
                result["shapes"][f"{name}|{pv}" + ("" if label == "table" else f"|{label}")] = row
                print(f"{name:16s} {pv}: quantize {row['quantize_ms']:.3f} ms of {row['call_ms']:.3f} ms "
                      f"({100 * row['quantize_share']:.1f}%), host {row['host_ms']:.3f} ms, "
                      f"SDPA {row['sdpa_ms']:.3f} ms (host {row['sdpa_host_ms']:.3f}), {row['launch_config']}",
                      flush=True)
                for kernel, ms in row["kernel_ms"].items():
                    print(f"    {ms:8.3f} ms  {kernel}", flush=True)
                for q in row["quantize_launches"]:
                    print(f"    {q['launch']}: {q['bytes'] / 1e6:.1f} MB, {q['tb_per_s']:.2f} TB/s", flush=True)
                print("    PyTorch on the same inputs: " + ", ".join(
                    f"{name} {ref['bytes'] / 1e6:.1f} MB {ref['tb_per_s']:.2f} TB/s"
                    for name, ref in row["bandwidth_reference"].items()), flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
