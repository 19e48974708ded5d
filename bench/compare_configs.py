"""Time named launch configurations of the pack's kernel side by side on model shapes, quantization included,
with each one's error against FP32 attention and SDPA's default backend as the baseline.

    python bench/compare_configs.py --shapes wan21_480p_81f flux_1024px --configs m64n128w4s3mc m64n128w4s3pdgp \
        [--kernel int8_fp8] [--out F.json]

Configuration keys are LaunchConfig.key() strings (see kernels/tuning.py): m<rows>n<keys>w<warps>s<stages>,
then r<registers>, mc (bit-trick score conversion), pd (FP8 P·V accumulated in place), gp (the Hopper Gluon
kernel). A configuration that cannot serve a shape (e.g. gp on another GPU) runs the portable kernel; the
report says which kernel ran.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sage_attention_pack.kernels import tuning  # noqa: E402
from sage_attention_pack.sage_core import backend  # noqa: E402
from sage_attention_pack.sage_core.bench import GPU_SHAPES as MODEL_SHAPES  # noqa: E402
from sage_attention_pack.sage_core.bench import (add_timings, environment, kernel_served,  # noqa: E402
                                                 model_shaped_inputs, reference)
from sage_attention_pack.sage_core.config import SageConfig  # noqa: E402
from sage_attention_pack.sage_core.metrics import attention_error  # noqa: E402
from sage_attention_pack.sage_core.progress import progress  # noqa: E402
from sage_attention_pack.sage_core.timing import error_line, interleaved_median_ms  # noqa: E402


def compare(shape, keys, kernel="int8_fp8", dtype=torch.bfloat16, v_offset=0.0, smooth_v=False) -> dict:
    b, h, n, d = shape
    q, k, v = model_shaped_inputs(b, h, n, d, dtype, "cuda")
    if v_offset:
        # a per-channel offset in V, as projections with a bias give: what limited-precision P·V accumulation
        # (in place in FP8 wgmma's accumulator) loses shows here, not on zero-mean V
        g = torch.Generator(device="cuda").manual_seed(1)
        v = (v.float() + v_offset * torch.randn(1, h, 1, d, generator=g, device="cuda")).to(dtype)
    ref = reference(q, k, v)
    cfg = SageConfig(kernel=kernel, smooth_v=smooth_v)
    pv_fp8 = kernel == "int8_fp8"
    rows, calls = {"sdpa_default": {}}, {"sdpa_default": lambda: F.scaled_dot_product_attention(q, k, v)}
    for key in keys:
        lc = tuning.LaunchConfig.from_key(key)

        def call(lc=lc):
            return backend.run(q, k, v, layout="HND", sm_scale=d ** -0.5, is_causal=False, bias=None, config=cfg,
                               pv_fp8=pv_fp8, return_lse=False, launch_config=lc)[0]
        try:
            err = attention_error(call()[:, :ref.shape[1]], ref)
        except Exception as e:  # a tile that does not fit is reported, not fatal
            rows[key] = {"error": error_line(e)}
            continue
        rows[key] = {"kernel": kernel_served(q, k, v, cfg, lc, pv_fp8), **err}
        calls[key] = call
        torch.cuda.empty_cache()
    # every configuration and SDPA in turn, round after round: the machine's drift reaches all alike
    add_timings(rows, interleaved_median_ms(calls, rounds=5, per_round=2, warmup=2), 4 * b * h * n * n * d)
    sdpa = rows["sdpa_default"].get("ms")
    for key, r in rows.items():
        if key != "sdpa_default" and "ms" in r and sdpa:
            r["vs_sdpa_default"] = sdpa / r["ms"]
    return {"shape": {"B": b, "H": h, "N": n, "D": d}, "kernel": kernel, "v_offset": v_offset, "smooth_v": smooth_v,
            "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["wan21_480p_81f", "flux_1024px"], help=f"of {sorted(MODEL_SHAPES)}")
    ap.add_argument("--configs", nargs="+", required=True)
    ap.add_argument("--kernel", default="int8_fp8", choices=["int8_fp8", "int8_fp16"])
    ap.add_argument("--v-offset", type=float, default=0.0, help="add this times a per-channel N(0,1) offset to V")
    ap.add_argument("--smooth-v", action="store_true", help="subtract V's per-channel mean before FP8")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    result = {"environment": environment(), "shapes": {}}
    for name in progress(args.shapes, desc="shapes", unit="shape"):
        row = compare(MODEL_SHAPES[name], args.configs, args.kernel, v_offset=args.v_offset, smooth_v=args.smooth_v)
        result["shapes"][name] = row
        for key, r in row["rows"].items():
            if "ms" in r:
                extra = "" if key == "sdpa_default" else (
                    f" {r['vs_sdpa_default']:.3f}x  rel_l1 {r['rel_l1']:.4f}  cos {r['cosine']:.5f}  {r['kernel']}")
                print(f"{name:14s} {key:26s} {r['ms']:9.3f} ms {r['tops']:7.1f} TOPS{extra}", flush=True)
            else:
                print(f"{name:14s} {key:26s} {r['error']}", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
