"""One Flux-family attention call with its rotary embedding, the ways ComfyUI can run it, in interleaved rounds on
one machine: ComfyUI's rotation (comfy/ldm/flux/math.py's arithmetic) then PyTorch's default SDPA (ComfyUI
unpatched), its rotation then Sage (the patch node before the hand-off), Sage with the table handed over (the
rotation inside the quantization, nodes/rotary_handoff.py), and for scale the rotation alone and Sage on Q and K
already rotated (the benchmarked call). The table is Flux.1's own (sage_core/rope.flux_table: 512 text tokens and
the image's patches). Per shape the times, the ratios to ComfyUI unpatched, and the errors of both Sage forms
against FP32 attention on the rotated Q and K.

    python bench/rope_call.py [--sizes 1024 1536] [--kernel int8_fp8] [--rounds 9] [--out rope_call.json]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from sage_attention_pack.kernels import launch
from sage_attention_pack.sage_core import bench, rope, timing
from sage_attention_pack.sage_core.config import SageConfig
from sage_attention_pack.sage_core.dispatch import DispatchStats, attention
from sage_attention_pack.sage_core.metrics import attention_error
from sage_attention_pack.sage_core.progress import progress

TEXT_TOKENS = 512
HEADS, HEAD_DIM = 24, 128  # Flux.1
ERROR_HEADS = 4
QUANTIZE = dict(q_group=64, k_group=128, block_d=HEAD_DIM, q_multiplier=HEAD_DIM ** -0.5 * launch.LOG2E,
                smooth_k=True, smooth_v=True, pv_fp8=True, pv_key_order=True)


def call_inputs(size: int, device: str, seed: int = 0, heads: int = HEADS, text_tokens: int = TEXT_TOKENS):
    """Q, K, V of Flux.1 at size x size pixels (16 px a patch) with its table."""
    side = size // 16
    n = text_tokens + side * side
    q, k, v = bench.model_shaped_inputs(1, heads, n, HEAD_DIM, torch.bfloat16, device, seed=seed)
    return q, k, v, rope.flux_table(text_tokens, side, side, device=device)


def methods(q, k, v, pe, config: SageConfig, stats: DispatchStats) -> dict:
    def comfy_rotation():
        return rope.rotate(q, pe), rope.rotate(k, pe)

    return {
        "comfyui_rotation_sdpa": lambda: F.scaled_dot_product_attention(*comfy_rotation(), v),
        "comfyui_rotation_sage": lambda: attention(*comfy_rotation(), v, config=config, stats=stats),
        "sage_rotation_fused": lambda: attention(q, k, v, config=config, stats=stats, rope=pe),
        "rotation_alone": comfy_rotation,
        "sage_prerotated": lambda: attention(q, k, v, config=config, stats=stats),
        # the quantization alone, as the FP8 Hopper path launches it, with and without the table
        "quantize_rotation_fused": lambda: launch.quantize_qkv(q, k, v, rope=pe, **QUANTIZE),
        "quantize_prerotated": lambda: launch.quantize_qkv(q, k, v, **QUANTIZE),
    }


def errors(q, k, v, pe, config: SageConfig) -> dict:
    """Both Sage forms against FP32 attention on Q and K rotated in FP32, on the last heads."""
    h = slice(-ERROR_HEADS, None)
    q, k, v = q[:, h], k[:, h], v[:, h]
    exact = F.scaled_dot_product_attention(rope.rotate(q.float(), pe), rope.rotate(k.float(), pe), v.float())
    fused = attention(q, k, v, config=config, rope=pe)
    first = attention(rope.rotate(q, pe), rope.rotate(k, pe), v, config=config)
    return {"sage_rotation_fused": attention_error(fused, exact),
            "comfyui_rotation_sage": attention_error(first, exact)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="*", type=int, default=[1024, 1536], help="image sizes in pixels (square)")
    ap.add_argument("--kernel", default="int8_fp8", choices=["int8_fp8", "int8_fp16", "auto"])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", default="rope_call.json")
    args = ap.parse_args(argv)
    if args.rounds < 1 or any(size < 16 for size in args.sizes):
        ap.error("--rounds must be at least 1 and every size at least 16 px")
    if not torch.cuda.is_available():
        print("rope_call: needs a GPU (device time of whole calls)", file=sys.stderr)
        return 2
    config = SageConfig(kernel=args.kernel)
    result = {"environment": bench.environment(), "kernel": args.kernel, "rounds": args.rounds, "shapes": {}}
    for size in progress(args.sizes, desc="sizes"):
        q, k, v, pe = call_inputs(size, "cuda")
        stats = DispatchStats()
        timed = timing.interleaved_median_ms(methods(q, k, v, pe, config, stats), rounds=args.rounds)
        base = timed["comfyui_rotation_sdpa"]
        row = {"shape": list(q.shape), "ms": timed,
               "speedup_vs_comfyui": {name: base / ms for name, ms in timed.items() if isinstance(ms, float)},
               "fused_saves_ms": timed["comfyui_rotation_sage"] - timed["sage_rotation_fused"],
               "errors": errors(q, k, v, pe, config), "calls": stats.snapshot()}
        result["shapes"][f"flux_{size}px"] = row
        print(f"flux {size}px N{q.shape[2]}: " + ", ".join(f"{name} {ms:.3f} ms" for name, ms in timed.items())
              + f"; fused saves {row['fused_saves_ms']:.3f} ms", flush=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
