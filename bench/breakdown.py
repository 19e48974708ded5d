"""Where one Sage call's time goes on this GPU: the quantization launches alone, the whole call, and
PyTorch's SDPA on the same inputs (back-to-back timing, as in a model forward).

    python bench/breakdown.py [--shapes flux_1024px wan21_480p_81f] [--out breakdown.json]
"""
from __future__ import annotations

import argparse
import json

import torch

from sage_attention_pack.kernels import launch
from sage_attention_pack.sage_core import backend, bench
from sage_attention_pack.sage_core.config import SageConfig
from sage_attention_pack.sage_core.timing import median_ms


def breakdown(shape, pv: str) -> dict:
    b, h, n, d = shape
    q, k, v = bench.model_shaped_inputs(b, h, n, d, torch.bfloat16, "cuda")
    config = SageConfig(kernel="int8_fp8" if pv == "fp8" else "int8_fp16")
    block_d = launch.padded_head_dim(d)
    cfg = backend.tuning_for(q.device, pv, block_d, None, n, n, str(q.dtype), False)
    q_group, k_group = launch.quant_groups(config.q_group_rows, config.k_group_rows, cfg)
    quant = median_ms(lambda: launch.quantize_qkv(
        q, k, v, q_group=q_group, k_group=k_group, block_d=block_d, q_multiplier=d ** -0.5 * launch.LOG2E,
        smooth_k=config.smooth_k, smooth_v=config.smooth_v, pv_fp8=pv == "fp8"), warmup=2)
    whole = median_ms(lambda: backend.run(q, k, v, layout="HND", sm_scale=d ** -0.5, is_causal=False, bias=None,
                                          config=config, pv_fp8=pv == "fp8", return_lse=False), warmup=2)
    sdpa = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), warmup=2)
    ops = 4 * b * h * n * n * d
    return {"launch_config": cfg.key(), "quantize_ms": quant, "call_ms": whole, "sdpa_ms": sdpa,
            "quantize_share": quant / whole, "attention_tops_without_quantize": ops / ((whole - quant) * 1e9),
            "call_tops": ops / (whole * 1e9), "sdpa_tops": ops / (sdpa * 1e9)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=["flux_1024px", "sdxl_1024px", "wan21_480p_81f"])
    ap.add_argument("--out", default="breakdown.json")
    args = ap.parse_args()
    result = {"environment": bench.environment(), "shapes": {}}
    with torch.inference_mode():
        for name in args.shapes:
            for pv in ("fp8", "fp16"):
                row = breakdown(bench.GPU_SHAPES[name], pv)
                result["shapes"][f"{name}|{pv}"] = row
                print(f"{name:16s} {pv}: quantize {row['quantize_ms']:.3f} ms of {row['call_ms']:.3f} ms "
                      f"({100 * row['quantize_share']:.1f}%), SDPA {row['sdpa_ms']:.3f} ms, {row['launch_config']}",
                      flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
