"""`python -m sage_attention_pack [selfcheck|bench]`: the pack's main job outside ComfyUI.

selfcheck (default): which GPU, which kernels serve, accuracy of every variant against exact attention,
then a quick benchmark against SDPA (and the official kernels where importable); JSON written to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sage-attention", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="selfcheck", choices=["selfcheck", "bench", "tune", "report"])
    parser.add_argument("--shapes", nargs="*", help="benchmark shape names (default: all; selfcheck: a quick set)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-peers", action="store_true", help="skip the official kernels and comfy-kitchen")
    parser.add_argument("--methods", nargs="*", help="only these methods (fnmatch patterns, e.g. 'sage_*' 'peer_*')")
    parser.add_argument("--out", default="sage_attention_bench.json", help="where the JSON results go")
    parser.add_argument("--json", help="report: a benchmark JSON to render as the README's Markdown table")
    parser.add_argument("--flags-only", action="store_true",
                        help="tune: keep the tiles in use, only try the kernel flags on them")
    parser.add_argument("--merge", action="store_true",
                        help="bench: add these methods to the shapes already in --out (speed-ups against its SDPA)")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        # no GPU: the same kernels run through Triton's CPU interpreter (set before they are first imported)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from .sage_core import bench, selfcheck

    if args.command == "report":
        with open(args.json or args.out) as f:
            print(bench.markdown_table(json.load(f)))
        return 0

    info = selfcheck.describe()
    print(f"sage-attention-pack: device {info['device']}, triton {info['triton']}; serving: {info['serving']}")
    failures, extra = 0, {}
    if args.command == "tune":
        from .sage_core import autotune

        if not torch.cuda.is_available():
            print("tune needs a GPU", file=sys.stderr)
            return 2
        names = args.shapes or list(bench.QUICK_GPU)
        result = autotune.tune({n: bench.GPU_SHAPES[n] for n in names}, getattr(torch, args.dtype),
                               tiles=not args.flags_only)
        with open(args.out, "w") as f:
            json.dump({"environment": bench.environment(), "tuning": result}, f, indent=1)
        for k, r in result.items():
            print(f"  {k:40s} best {r['best']}  {min(r['ms'].values()):.3f} ms")
        return 0
    if args.command == "selfcheck":
        rows = selfcheck.check()
        for r in rows:
            failures += not r["ok"]
            print(f"  {'ok  ' if r['ok'] else 'FAIL'} {r['kernel']:10s} B,H,Nq,Nk,D,causal={r['case']} "
                  f"cos {r['cosine']:.6f} relL1 {r['rel_l1']:.4f} via {r['served_by']}"
                  + (", Flux's rotary table inside the quantization" if r["rotary"] else ""))
        extra = {"serving": info["serving"], "selfcheck": rows}
    with torch.inference_mode():
        result = bench.run(shapes=args.shapes, dtype=getattr(torch, args.dtype), repeats=args.repeats,
                           with_peers=not args.no_peers, out_path=args.out, quick=args.command == "selfcheck",
                           method_patterns=args.methods, merge=args.merge, extra=extra)
    print(bench.format_table(result))
    print(f"results written to {args.out}")
    if failures:
        print(f"{failures} self-check case(s) outside the accuracy bounds", file=sys.stderr)
    json.dumps(result)  # the JSON must be serialisable as written
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
