"""One attention call with its rotary embedding, the ways ComfyUI can run it, in interleaved rounds on one machine:
ComfyUI's rotation then PyTorch's default SDPA (ComfyUI unpatched), its rotation then Sage (the patch node before the
hand-off), Sage with the table handed over (the rotation inside the quantization, nodes/rotary_handoff.py; the table's
kernels' layout made on the first call and kept, as a forward's blocks share one table), and for scale the rotation
alone, Sage on Q and K already rotated (the benchmarked call) and the quantization alone with and without the table;
Sage with the table also with its statistics carried from the call before (a sampler's later steps,
kernels/carried_stats.py; calls without a table keep their own as shipped, carried_stats.PLAIN). Flux.1 at two sizes
(its table with 512 text tokens, [B, H, N, D] tensors, the rotation of comfy/ldm/flux/math.attention), Wan2.1 at 480p,
81 frames ([B, N, H, D] tensors, the rotation of apply_rope1 as its self-attention applies it), Qwen-Image at 1328 px
(128 text tokens, [B, N, H, D] tensors, a BF16 table and its apply_rotary_emb, in BF16) and Lumina 2 at 1024 px (256
caption tokens, 24 query heads of 96 on 8 K/V heads, which ComfyUI repeats to 24 before its attention and the hand-off
does not) and LTX-Video 2B at 768x512, 97 frames (32 heads of 64, a BF16 table per head from its cos and sin, its
apply_rotary_emb in BF16) and HiDream-I1 at 1024 px (20 heads of 128, 384 text tokens after the image's, Flux's
apply_rope on [B, N, H, D]), each with its model's own table (sage_core/rope). Per shape the times, the ratios to
ComfyUI unpatched, and the errors of both Sage forms against FP32 attention on the rotated Q and K.

    python bench/rope_call.py [--shapes flux_1024px flux_1536px wan21_480p_81f qwen_image_1328px lumina2_1024px
                               ltxv_768x512_97f hidream_1024px]
                              [--kernel int8_fp8] [--rounds 9] [--arms NAME:module.SETTING=VALUE,... ...]
                              [--out rope_call.json]

--arms (as bench/settings_ab.py's, e.g. `light:launch.ROPE_CARRY_K_MEAN=1,launch.ROPE_CARRY_V_CHANNELS=32`): the
carried call once more under each arm's settings (sage_rotation_fused_carried@NAME, a site of its own), interleaved
with the others, which run as shipped; its error beside theirs.
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

settings_ab = bench.bench_script("settings_ab")  # parse_arms, Settings: an arm's settings switched per call
ERROR_HEADS = 4
# (model, query heads, and the table's grid: Flux's, Qwen-Image's and Lumina 2's text tokens and patch rows and
# columns; Wan's latent frames and patch rows and columns)
SHAPES = {"flux_1024px": ("flux", 24, (512, 64, 64)), "flux_1536px": ("flux", 24, (512, 96, 96)),
          "wan21_480p_81f": ("wan", 40, (21, 30, 52)), "qwen_image_1328px": ("qwen_image", 24, (128, 83, 83)),
          "lumina2_1024px": ("lumina2", 24, (256, 64, 64)),
          # LTX-Video 2B at 768x512, 97 frames: 13 latent frames of 16x24 (its VAE: 8x in time, 32x in space)
          "ltxv_768x512_97f": ("ltxv", 32, (13, 16, 24)),
          # HiDream-I1 at 1024 px: 64x64 patches, then 128 T5 and twice 128 Llama tokens
          "hidream_1024px": ("hidream", 20, (384, 64, 64))}
# head dim and query heads per K/V head
MODEL_HEADS = {"flux": (128, 1), "wan": (128, 1), "qwen_image": (128, 1), "lumina2": (96, 3), "ltxv": (64, 1),
               "hidream": (128, 1)}


def quantize_arguments(head_dim: int) -> dict:
    """The quantization's settings as the FP8 Hopper path launches it at this head dim."""
    return dict(q_group=64, k_group=128, block_d=launch.padded_head_dim(head_dim),
                q_multiplier=head_dim ** -0.5 * launch.LOG2E, smooth_k=True, smooth_v=True, pv_fp8=True,
                pv_key_order=True)


def wan_rotation(x, freqs):
    """comfy/ldm/flux/math.apply_rope1 as Wan's self-attention applies it: x [B, N, H, D], freqs [B, N, 1, ...]."""
    pairs = x.to(dtype=freqs.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    out = freqs[..., 0] * pairs[..., 0]
    out.addcmul_(freqs[..., 1], pairs[..., 1])
    return out.reshape(*x.shape).type_as(x)


def tokens_first(rotation):
    """`rotation` (x [B, N, H, D], a table in tokens-before-heads order) taking pe in [B, H, N, ...] order."""
    return lambda x, pe: rotation(x, pe.transpose(1, 2))


# how ComfyUI's code for each model rotates x (in the model's layout) by pe ([B, H, N, ...] order). Qwen-Image's,
# Lumina 2's and LTX-Video's apply_rotary_emb are sage_core/rope.rotate's products and sum with no casts: their tables
# come in the model's dtype, so rope.rotate's casts to and from it do nothing. HiDream rotates by Flux's apply_rope,
# as Wan does.
ROTATIONS = {"flux": rope.rotate, "wan": tokens_first(wan_rotation), "qwen_image": tokens_first(rope.rotate),
             "lumina2": tokens_first(rope.rotate), "ltxv": tokens_first(rope.rotate),
             "hidream": tokens_first(wan_rotation)}


class Call:
    """q, k, v in `layout`, as `model` hands them to the attention (K and V with a K/V head for every `group` query
    heads); pe, the table in [B, H, N, ...] order (sage_core/rope.py); handed_table, what the model's hand-off
    (nodes/rotary_handoff.py) gives Sage on a call: the kernels' layout of pe, or for LTX-Video of its cos and sin,
    made on the first call and kept for the next (rope.HANDED_TABLES), as a forward's blocks share it."""

    def __init__(self, q, k, v, pe, layout: str, model: str = "flux", handed_table=None):
        self.q, self.k, self.v, self.pe, self.layout, self.model = q, k, v, pe, layout, model
        self.group = self.hnd(q).shape[1] // self.hnd(k).shape[1]
        self.handed_table = handed_table or rope.handed_pe(pe)

    def hnd(self, t):
        return t if self.layout == "HND" else t.transpose(1, 2)

    def comfy_rotation(self, x):
        """x rotated as ComfyUI's code for this model rotates it."""
        return ROTATIONS[self.model](x, self.pe)

    def comfy_inputs(self):
        """Q, K and V as ComfyUI's code hands them to its attention: rotated, and K and V repeated for each query
        head of their group (Lumina 2, `[B, N, H, D]`: each K/V head's copies side by side)."""
        k = self.comfy_rotation(self.k)
        if self.group == 1:
            return self.comfy_rotation(self.q), k, self.v
        return (self.comfy_rotation(self.q),
                *(t.unsqueeze(3).repeat(1, 1, 1, self.group, 1).flatten(2, 3) for t in (k, self.v)))


def call_inputs(shape: str, device: str, seed: int = 0, heads: int | None = None, grid=None) -> Call:
    """The call of a shape of SHAPES (heads and grid: smaller ones, for tests)."""
    model, default_heads, default_grid = SHAPES[shape]
    heads, grid = heads or default_heads, grid or default_grid
    head_dim, group = MODEL_HEADS[model]
    tables = {"flux": lambda: rope.flux_table(*grid, device=device),
              "wan": lambda: rope.wan_table(*grid, head_dim=head_dim, device=device),
              "qwen_image": lambda: rope.qwen_image_table(*grid, device=device),
              "lumina2": lambda: rope.lumina2_table(*grid, device=device),
              "ltxv": lambda: rope.from_cos_sin(*cos_sin, heads),
              "hidream": lambda: rope.hidream_table(*grid, device=device)}
    handed_table = None
    if model == "ltxv":
        cos_sin = rope.ltxv_cos_sin(*grid, heads * head_dim, device=device)
        handed_table = rope.handed_table(cos_sin, lambda: rope.kernel_table_from_cos_sin(*cos_sin, heads), extra=heads)
    pe = tables[model]()
    q, k, v = bench.model_shaped_inputs(1, heads, pe.shape[2], head_dim, torch.bfloat16, device, seed=seed)
    k, v = k[:, ::group], v[:, ::group]  # one K/V head for each group of query heads
    if model != "flux":  # the other models' projections give [B, N, H, D]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return Call(*(t.contiguous() for t in (q, k, v)), pe, "HND" if model == "flux" else "NHD", model, handed_table)


def site_key(c: Call, key: str) -> tuple:
    """The carried call site `key` of this call's model (kernels/carried_stats.py). Sites are per model: two models'
    calls of one shape would otherwise share one, and the second would code its K and V with the first's
    statistics."""
    return c.model, key


def fused_carried(c: Call, config: SageConfig, stats: DispatchStats, key: str = "fused"):
    """Sage with the table handed over and its statistics carried from the call before at site `key` of this
    model (site_key; a sampler's later steps)."""
    return lambda: attention(c.q, c.k, c.v, tensor_layout=c.layout, config=config, stats=stats,
                             rope=c.handed_table(), carry_key=site_key(c, key))


def methods(c: Call, config: SageConfig, stats: DispatchStats) -> dict:
    def sage(q, k, v, **kw):
        return attention(q, k, v, tensor_layout=c.layout, config=config, stats=stats, **kw)

    hq, hk, hv = c.hnd(c.q), c.hnd(c.k), c.hnd(c.v)
    quantize = quantize_arguments(hq.shape[-1])
    return {
        "comfyui_rotation_sdpa": lambda: F.scaled_dot_product_attention(*(c.hnd(t) for t in c.comfy_inputs())),
        "comfyui_rotation_sage": lambda: sage(*c.comfy_inputs()),
        "sage_rotation_fused": lambda: sage(c.q, c.k, c.v, rope=c.handed_table()),
        "sage_rotation_fused_carried": fused_carried(c, config, stats),
        "rotation_alone": c.comfy_inputs,
        "sage_prerotated": lambda: sage(c.q, c.k, c.v),
        # the quantization alone, as the FP8 Hopper path launches it, with and without the table
        "quantize_rotation_fused": lambda: launch.quantize_qkv(hq, hk, hv, rope=c.handed_table(), **quantize),
        "quantize_prerotated": lambda: launch.quantize_qkv(hq, hk, hv, **quantize),
    }


def errors(c: Call, config: SageConfig, arms: dict | None = None, settings=None) -> dict:
    """Both Sage forms against FP32 attention on Q and K rotated in FP32, on the first query heads and their K/V
    heads (the model's rotation, in [B, H, N, D] order, before the second); the carried form also under each of
    `arms`' settings (settings_ab.Settings)."""
    kv_heads = max(1, ERROR_HEADS // c.group)
    q, k, v = c.hnd(c.q)[:, :kv_heads * c.group], c.hnd(c.k)[:, :kv_heads], c.hnd(c.v)[:, :kv_heads]
    def first_heads(table):  # LTX-Video's tables have a head each
        return table if table.shape[1] == 1 else table[:, :kv_heads * c.group]

    pe = first_heads(c.pe)
    table = pe.float()  # Qwen-Image's and Lumina 2's come in BF16
    exact = F.scaled_dot_product_attention(rope.rotate(q.float(), table), rope.rotate(k.float(), table), v.float(),
                                           enable_gqa=c.group > 1)
    fused = attention(q, k, v, config=config, rope=first_heads(c.handed_table()))
    first = attention(rope.rotate(q, pe), rope.rotate(k, pe), v, config=config)

    def carried(key: str):  # the first call primes the site, the second carries its statistics
        for _ in range(2):
            out = attention(q, k, v, config=config, rope=first_heads(c.handed_table()), carry_key=site_key(c, key))
        return attention_error(out, exact)

    result = {"sage_rotation_fused": attention_error(fused, exact),
              "sage_rotation_fused_carried": carried("errors"),
              "comfyui_rotation_sage": attention_error(first, exact)}
    for name, arm in (arms or {}).items():
        settings.apply(arm)
        result[f"sage_rotation_fused_carried@{name}"] = carried(f"errors@{name}")
    if arms:
        settings.restore()
    return result


def arm_methods(c: Call, config: SageConfig, stats: DispatchStats, arms: dict, settings) -> dict:
    """methods(), each under the shipped settings, and the carried call under every arm's (a site per arm)."""
    if not arms:
        return methods(c, config, stats)
    shipped = {}
    timed = {name: settings.bind(shipped, fn) for name, fn in methods(c, config, stats).items()}
    for name, arm in arms.items():
        timed[f"sage_rotation_fused_carried@{name}"] = settings.bind(arm, fused_carried(c, config, stats,
                                                                                         f"fused@{name}"))
    return timed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), help=f"of {', '.join(SHAPES)}")
    ap.add_argument("--kernel", default="int8_fp8", choices=["int8_fp8", "int8_fp16", "auto"])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--arms", nargs="*", default=[], help="NAME:module.SETTING=VALUE,... as bench/settings_ab.py's")
    ap.add_argument("--out", default="rope_call.json")
    args = ap.parse_args(argv)
    unknown = [s for s in args.shapes if s not in SHAPES]
    if args.rounds < 1 or unknown:
        ap.error(f"--rounds must be at least 1 and every shape one of {', '.join(SHAPES)} (not {unknown})")
    try:
        arms = settings_ab.parse_arms(args.arms)
    except ValueError as e:
        ap.error(str(e))
    settings = settings_ab.Settings(arms)
    if not torch.cuda.is_available():
        print("rope_call: needs a GPU (device time of whole calls)", file=sys.stderr)
        return 2
    config = SageConfig(kernel=args.kernel)
    result = {"environment": bench.environment(), "kernel": args.kernel, "rounds": args.rounds,
              "arms": args.arms, "shapes": {}}
    for shape in progress(args.shapes, desc="shapes"):
        c = call_inputs(shape, "cuda")
        stats = DispatchStats()
        timed = timing.interleaved_median_ms(arm_methods(c, config, stats, arms, settings), rounds=args.rounds)
        if arms:
            settings.restore()
        base = timed["comfyui_rotation_sdpa"]
        row = {"shape": list(c.hnd(c.q).shape), "layout": c.layout, "ms": timed,
               "speedup_vs_comfyui": {name: base / ms for name, ms in timed.items() if isinstance(ms, float)},
               "fused_saves_ms": timed["comfyui_rotation_sage"] - timed["sage_rotation_fused"],
               "errors": errors(c, config, arms, settings), "calls": stats.snapshot()}
        result["shapes"][shape] = row
        print(f"{shape}: " + ", ".join(f"{name} {ms:.3f} ms" for name, ms in timed.items())
              + f"; fused saves {row['fused_saves_ms']:.3f} ms", flush=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        del c
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
