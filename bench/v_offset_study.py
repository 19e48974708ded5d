"""What V smoothing does to FP8 P·V in exact arithmetic (the pure-PyTorch reference, FP32 accumulation; no GPU
needed), as a per-channel offset in V grows: where smoothing helps, where it costs, and how much of the error
the usual relative metric hides under the offset. The reference takes the mean of V's FP8 rounding error off the
output, as the kernels do (kernels/launch.quantize_qkv's v_shift); without that, smoothing cost accuracy on zero-mean V
(0.0388 -> 0.0401 at 4k keys; 0.0398 -> 0.0469 at 32k keys with 256 queries).

    python bench/v_offset_study.py [--n 4096] [--offsets 0 0.05 0.1 0.3 1 8]

Each row: the offset (in units of V's standard deviation, the same random per-channel direction throughout),
then for V smoothing off and on the relative L1 error against FP32 attention, and the same error measured on
the output minus V's mean (the part that carries the information when the offset is large); last, that centred
error for FP32 attention merely rounded to bf16 (the output dtype): no bf16 kernel can do better.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sage_attention_pack.sage_core.metrics import attention_error  # noqa: E402
from sage_attention_pack.sage_core.reference import sage_reference  # noqa: E402


def study(n: int, offsets, heads: int = 2, d: int = 128, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, n, d, generator=g)
    k = torch.randn(1, heads, n, d, generator=g) + 4 * torch.randn(1, heads, 1, d, generator=g)
    v0 = torch.randn(1, heads, n, d, generator=g)
    direction = torch.randn(1, heads, 1, d, generator=g)
    rows = []
    for offset in offsets:
        q16, k16, v16 = (t.bfloat16() for t in (q, k, v0 + offset * direction))
        vf = v16.float()
        mean = vf.mean(2, keepdim=True)
        exact = torch.nn.functional.scaled_dot_product_attention(q16.float(), k16.float(), vf)
        row = {"offset": offset,
               "bf16_floor_centred": ((exact.bfloat16().float() - exact).abs().sum()
                                      / (exact - mean).abs().sum()).item()}
        for smooth in (False, True):
            out = sage_reference(q16, k16, v16, pv_fp8=True, smooth_v=smooth, k_group=128, block_m=64).float()
            centred = ((out - mean) - (exact - mean)).abs().sum() / (exact - mean).abs().sum()
            row[f"smooth_{smooth}"] = {"rel_l1": attention_error(out, exact)["rel_l1"],
                                       "rel_l1_centred": centred.item()}
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096, help="tokens (queries = keys)")
    ap.add_argument("--offsets", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.3, 1.0, 8.0])
    args = ap.parse_args(argv)
    print(f"{'offset':>7}  {'plain rel L1':>13} {'(centred)':>10}  {'smoothed rel L1':>16} {'(centred)':>10}"
          f"  {'bf16 floor (centred)':>21}")
    for row in study(args.n, args.offsets):
        off, on = row["smooth_False"], row["smooth_True"]
        print(f"{row['offset']:6.2f}σ  {off['rel_l1']:13.4f} {off['rel_l1_centred']:10.4f}  "
              f"{on['rel_l1']:16.4f} {on['rel_l1_centred']:10.4f}  {row['bf16_floor_centred']:21.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
