"""Does the calling context change one attention call's speed? Timed side by side in one process (the benchmark's
interleaved timing), ours (sageattn, FP8 P·V as the dispatcher picks it) and PyTorch's SDPA:

    python bench/call_context_ab.py [--shapes wan21_480p_81f sweep_d128_n16384] [--out F.json]
        layouts: the same inputs in [B, H, N, D] storage and in ComfyUI's [B, N, H, D] storage (ours reads the
        strides; SDPA gets the transposed views), and whether our outputs are identical
    python bench/call_context_ab.py --comfyui PATH [--out F.json]
        model inputs: Q, K, V of the first self-attention call of the Wan2.1 model of bench/e2e_models.py (ComfyUI's
        classes, random weights), captured through ComfyUI's attention hook, against the benchmark's random inputs of
        the same shape

Both answer why a kernel's time inside a model forward (bench/e2e_models.py --profile) differs from the benchmark's.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sage_attention_pack.sage_core.api import sageattn  # noqa: E402
from sage_attention_pack.sage_core.bench import GPU_SHAPES, environment, model_shaped_inputs  # noqa: E402
from sage_attention_pack.sage_core.timing import interleaved_median_ms  # noqa: E402

sdpa = torch.nn.functional.scaled_dot_product_attention


def timed(runs: dict, rounds: int) -> dict:
    for run in runs.values():  # compiled and warm
        run()
        run()
    torch.cuda.synchronize()
    return interleaved_median_ms(runs, rounds=rounds)


def layouts(shape, rounds: int) -> dict:
    q, k, v = model_shaped_inputs(*shape, torch.bfloat16, "cuda")
    qn, kn, vn = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # [B, N, H, D] storage, as ComfyUI's
    runs = {"sage_hnd": lambda: sageattn(q, k, v, "HND"), "sage_nhd": lambda: sageattn(qn, kn, vn, "NHD"),
            "sdpa_hnd": lambda: sdpa(q, k, v),
            "sdpa_nhd_view": lambda: sdpa(qn.transpose(1, 2), kn.transpose(1, 2), vn.transpose(1, 2))}
    same = torch.equal(sageattn(q, k, v, "HND"), sageattn(qn, kn, vn, "NHD").transpose(1, 2))
    return {"ms": timed(runs, rounds), "sage_outputs_identical": same}


def model_inputs(comfyui: str, rounds: int) -> dict:
    spec = importlib.util.spec_from_file_location("e2e_models", Path(__file__).parent / "e2e_models.py")
    e2e = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(e2e)
    comfy = e2e.load_comfy(comfyui)
    from sage_attention_pack.nodes import comfy_attention

    captured = []

    def capture(func, *args, **kwargs):
        call = comfy_attention.parse(args, kwargs)
        if not captured and call.is_self_attention:
            captured.append((*(t.clone() for t in (call.q, call.k, call.v)), call.layout))
        return func(*args, **kwargs)

    model, forward = e2e.wan_case(comfy)
    with torch.inference_mode():
        forward({"optimized_attention_override": capture})
        del model
        torch.cuda.empty_cache()
        q, k, v, layout = captured[0]
        hnd = [t.transpose(1, 2) if layout == "NHD" else t for t in (q, k, v)]
        rq, rk, rv = model_shaped_inputs(*hnd[0].shape, q.dtype, "cuda")
        stats = {name: {"mean_abs": t.float().abs().mean().item(), "max_abs": t.float().abs().max().item(),
                        "channel_mean_abs": t.float().mean(dim=2).abs().mean().item()} for name, t in zip("qkv", hnd)}
        runs = {"model_qkv": lambda: sageattn(q, k, v, layout), "random_qkv": lambda: sageattn(rq, rk, rv, "HND"),
                "sdpa_model": lambda: sdpa(*hnd), "sdpa_random": lambda: sdpa(rq, rk, rv)}
        return {"shape": list(hnd[0].shape), "layout": layout, "ms": timed(runs, rounds), "input_stats": stats}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["wan21_480p_81f", "sweep_d128_n16384"], choices=sorted(GPU_SHAPES))
    ap.add_argument("--comfyui", help="a ComfyUI checkout: time the Wan2.1 model's own inputs instead of layouts")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/call_context_ab.py times CUDA calls: it needs an NVIDIA GPU")
    result = {"environment": environment()}
    if args.comfyui:
        result["wan21_model_inputs"] = row = model_inputs(args.comfyui, args.rounds)
        print({k: round(v, 3) for k, v in row["ms"].items()}, row["input_stats"], flush=True)
    else:
        result["shapes"] = {}
        for name in args.shapes:
            result["shapes"][name] = row = layouts(GPU_SHAPES[name], args.rounds)
            print(name, {k: round(v, 3) for k, v in row["ms"].items()}, "identical:", row["sage_outputs_identical"],
                  flush=True)
            torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
