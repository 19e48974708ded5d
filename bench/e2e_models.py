"""End-to-end: ComfyUI's own model classes at real width with random bf16 weights, one forward (one
sampling step), with ComfyUI's default attention and with Sage through the patch node's override.

  python bench/e2e_models.py --comfyui PATH [--out results.json] [--profile default auto] [--clocks default auto]

Models (as in the issue): Wan2.1-14B (dim 5120, 40 heads of 128) with 4 of its 40 blocks at 480p, 81
frames (32760 tokens); Flux.1-dev (hidden 3072, 24 heads) with 2 double + 4 single blocks at 1024px
(4096 image + 512 text tokens). Besides: Qwen-Image (hidden 3072, 24 heads of 128) with 4 of its 60 blocks at
1328px (6889 image + 128 text tokens); Lumina 2 (dim 2304, 24 query heads of 96 on 8 K/V heads) with its 2 + 2
refiner blocks and 6 of its 26 main blocks at 1024px (4096 image + 256 caption tokens); LTX-Video 2B (32 heads of
64, each rotated by frequencies of its own) with 4 of its 28 blocks at 768x512, 97 frames (4992 tokens, 128 text
tokens); HiDream-I1 (20 heads of 128, 4 experts) with 2 of its 16 double-stream and 4 of its 32 single-stream blocks
at 1024px (4096 image + 384 text tokens). Reported per model: median
forward time of each attention setting, the speed-up over ComfyUI's default attention, and the output's cosine
similarity and PSNR against it; --profile adds the device time per kernel of a setting's forward, --clocks the SM
clock and power its forwards run at. The tests build each case at a few heads and tokens and run it on the CPU
(tests/test_e2e_models_bench.py).
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def load_comfy(path: str):
    sys.path.insert(0, path)
    sys.argv = [sys.argv[0]]  # ComfyUI parses argv at import
    import comfy.ops  # noqa: F401
    import comfy.ldm.flux.model
    import comfy.ldm.hidream.model
    import comfy.ldm.lightricks.model
    import comfy.ldm.lumina.model
    import comfy.ldm.qwen_image.model
    import comfy.ldm.wan.model

    return comfy


def init_random(model: torch.nn.Module, seed: int, device: str = "cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32) / math.sqrt(fan_in))
            elif "norm" in name or "scale" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, device=device) * 0.02)


# Each case: (the model, its forward of the transformer options), at the size or, with tiny=True, at a few
# heads and tokens (for the tests, on the CPU), the same classes and calls.
def random_inputs(seed: int, device: str):
    g = torch.Generator(device=device).manual_seed(seed)
    return lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=torch.bfloat16)


def wan_case(comfy, tiny=False, device="cuda"):
    width = dict(dim=256, ffn_dim=512, num_heads=2, num_layers=1, text_dim=64) if tiny else dict(
        dim=5120, ffn_dim=13824, num_heads=40, num_layers=4, text_dim=4096)
    model = comfy.ldm.wan.model.WanModel(model_type="t2v", in_dim=16, out_dim=16, device=device, dtype=torch.bfloat16,
                                         operations=comfy.ops.disable_weight_init, **width)
    init_random(model, 14, device)
    randn = random_inputs(1, device)
    x = randn(1, 16, 2, 8, 8) if tiny else randn(1, 16, 21, 60, 104)  # 480x832, 81 frames
    t = torch.full((1,), 500.0, device=device)
    ctx = randn(1, 8 if tiny else 512, width["text_dim"])
    return model, lambda opts: model(x, t, ctx, transformer_options=opts)


def flux_case(comfy, tiny=False, device="cuda"):
    width = dict(vec_in_dim=32, context_in_dim=64, hidden_size=256, num_heads=2, depth=1, depth_single_blocks=1) \
        if tiny else dict(vec_in_dim=768, context_in_dim=4096, hidden_size=3072, num_heads=24, depth=2,
                          depth_single_blocks=4)
    model = comfy.ldm.flux.model.Flux(
        in_channels=16, out_channels=16, mlp_ratio=4.0, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
        qkv_bias=True, guidance_embed=True, device=device, dtype=torch.bfloat16,
        operations=comfy.ops.disable_weight_init, **width)
    init_random(model, 12, device)
    randn = random_inputs(2, device)
    x = randn(1, 16, 8, 8) if tiny else randn(1, 16, 128, 128)  # 1024px
    t = torch.full((1,), 0.5, device=device)
    ctx = randn(1, 8 if tiny else 512, width["context_in_dim"])
    y = randn(1, width["vec_in_dim"])
    guidance = torch.full((1,), 3.5, device=device)
    return model, lambda opts: model(x, t, ctx, y=y, guidance=guidance, transformer_options=opts)


def qwen_image_case(comfy, tiny=False, device="cuda"):
    width = dict(num_layers=1, num_attention_heads=2, joint_attention_dim=64) if tiny else dict(
        num_layers=4, num_attention_heads=24, joint_attention_dim=3584)
    model = comfy.ldm.qwen_image.model.QwenImageTransformer2DModel(
        in_channels=64, out_channels=16, attention_head_dim=128, device=device, dtype=torch.bfloat16,
        operations=comfy.ops.disable_weight_init, **width)
    init_random(model, 16, device)
    randn = random_inputs(3, device)
    x = randn(1, 16, 1, 8, 8) if tiny else randn(1, 16, 1, 166, 166)  # 1328px
    t = torch.full((1,), 0.5, device=device)
    ctx = randn(1, 8 if tiny else 128, width["joint_attention_dim"])
    return model, lambda opts: model(x, t, ctx, transformer_options=opts)


def lumina2_case(comfy, tiny=False, device="cuda"):
    width = dict(dim=576, n_layers=1, n_refiner_layers=1, n_heads=6, n_kv_heads=2, cap_feat_dim=64) if tiny else dict(
        dim=2304, n_layers=6, n_refiner_layers=2, n_heads=24, n_kv_heads=8, cap_feat_dim=2304)
    model = comfy.ldm.lumina.model.NextDiT(
        patch_size=2, in_channels=16, qk_norm=True, axes_dims=[32, 32, 32], axes_lens=[300, 512, 512],
        device=device, dtype=torch.bfloat16, operations=comfy.ops.disable_weight_init, **width)
    init_random(model, 18, device)
    randn = random_inputs(4, device)
    x = randn(1, 16, 8, 8) if tiny else randn(1, 16, 128, 128)  # 1024px
    t = torch.full((1,), 0.5, device=device)
    caption = 8 if tiny else 256
    ctx = randn(1, caption, width["cap_feat_dim"])
    return model, lambda opts: model(x, t, ctx, caption, transformer_options=opts)


def ltxv_case(comfy, tiny=False, device="cuda"):
    width = dict(in_channels=16, num_attention_heads=2, cross_attention_dim=128, caption_channels=64, num_layers=1) \
        if tiny else dict(in_channels=128, num_attention_heads=32, cross_attention_dim=2048, caption_channels=4096,
                          num_layers=4)
    model = comfy.ldm.lightricks.model.LTXVModel(attention_head_dim=64, device=device, dtype=torch.bfloat16,
                                                 operations=comfy.ops.disable_weight_init, **width)
    init_random(model, 20, device)
    randn = random_inputs(5, device)
    # 768x512, 97 frames: 13 latent frames of 16x24 (its VAE: 8x in time, 32x in space)
    x = randn(1, 16, 2, 4, 4) if tiny else randn(1, 128, 13, 16, 24)
    t = torch.full((1,), 0.5, device=device)
    ctx = randn(1, 8 if tiny else 128, width["caption_channels"])
    return model, lambda opts: model(x, t, ctx, None, transformer_options=opts)


def hidream_case(comfy, tiny=False, device="cuda"):
    width = dict(num_layers=1, num_single_layers=1, attention_head_dim=64, num_attention_heads=2,
                 caption_channels=[64, 64], text_emb_dim=32, num_routed_experts=2, axes_dims_rope=[32, 16, 16]) \
        if tiny else dict(num_layers=2, num_single_layers=4, attention_head_dim=128, num_attention_heads=20,
                          caption_channels=[4096, 4096], text_emb_dim=2048, num_routed_experts=4,
                          axes_dims_rope=[64, 32, 32])
    blocks = width["num_layers"] + width["num_single_layers"]
    model = comfy.ldm.hidream.model.HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=16, num_activated_experts=2 if not tiny else 1,
        max_resolution=[128, 128], llama_layers=list(range(blocks)), image_model="hidream", device=device,
        dtype=torch.bfloat16, operations=comfy.ops.disable_weight_init, **width)
    init_random(model, 22, device)
    randn = random_inputs(6, device)
    x = randn(1, 16, 8, 8) if tiny else randn(1, 16, 128, 128)  # 1024px
    t = torch.full((1,), 0.5, device=device)
    text, llama_width = (6, 64) if tiny else (128, 4096)
    y, t5 = randn(1, width["text_emb_dim"]), randn(1, text, width["caption_channels"][-1])
    llama = randn(1, blocks, text, llama_width)  # one Llama layer's hidden states for each block
    return model, lambda opts: model(x, t, y, t5, llama, transformer_options=opts)


class PeerCalls:
    """Counts of the calls a peer served and the ones left to ComfyUI, with the reset/snapshot of the pack's
    own DispatchStats, so both kinds of override are reported the same way."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.counts = {"peer": 0, "comfyui": 0}

    def snapshot(self) -> dict:
        return dict(self.counts)


class PeerOverride:
    """ComfyUI's attention hook serving every mask-free call with a peer kernel (bench/peers.py), the rest
    with ComfyUI's own attention: the peers' end-to-end figure, through the same hook as ours."""

    def __init__(self, peer_fn):
        from sage_attention_pack.nodes import comfy_attention

        self.parse = comfy_attention.parse
        self.peer_fn = peer_fn
        self.stats = PeerCalls()

    def __call__(self, func, *args, **kwargs):
        call = self.parse(args, kwargs)
        if call.mask is not None:
            self.stats.counts["comfyui"] += 1
            return func(*args, **kwargs)
        self.stats.counts["peer"] += 1
        hnd = [t if call.layout == "HND" else t.transpose(1, 2) for t in (call.q, call.k, call.v)]
        out = self.peer_fn(*hnd)
        return call.finish(out if call.layout == "HND" else out.transpose(1, 2))


def load_peer_overrides() -> tuple[dict, dict]:
    """The peers' overrides by setting name, and their package versions."""
    found = load_bench_script("peers").available_peers(check_device=True)
    for name, why in getattr(found, "missing", {}).items():
        print(f"peer {name} not benchmarked: {why}", flush=True)
    return {f"peer_{name}": PeerOverride(fn) for name, fn in found.items()}, found.versions()


def load_bench_script(name: str):
    spec = importlib.util.spec_from_file_location(f"sage_attention_bench_{name}", REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def kernel_profile(forward, top: int = 15) -> dict:
    """Device milliseconds per forward, all kernels and the `top` ones by name (bench/breakdown.kernel_ms): where a
    setting's forward spends what the timing shows, beside ComfyUI's default."""
    per_kernel = load_bench_script("breakdown").kernel_ms(forward)
    return {"device_ms": sum(per_kernel.values()), "kernels": dict(list(per_kernel.items())[:top])}


def forward_clocks(runs: dict, labels, seconds: float, rounds: int = 2) -> dict:
    """Per setting, its forward run back to back for `seconds` (settings interleaved over `rounds`) while nvidia-smi
    samples the board (bench/energy.py's sampler): the SM clock and the power a whole forward runs at, to set beside
    the clock of one attention kernel run alone (bench/energy.py)."""
    energy = load_bench_script("energy")
    sampler = energy.PowerSampler(torch.cuda.current_device())
    spans = {label: [] for label in labels}
    try:
        for r in range(rounds):
            for label in (labels if r % 2 == 0 else labels[::-1]):
                t0, t1, calls = energy.run_for(runs[label], seconds)
                time.sleep(energy.SAMPLE_MS / 1000 * 2)  # the run's last samples arrive
                spans[label].append((t1 - t0, calls, sampler.between(t0, t1)))
    finally:
        sampler.close()
    out = {}
    for label, segs in spans.items():
        samples = [s for *_, seg in segs for s in seg]
        if not samples:
            out[label] = {"error": "no power samples"}
            continue
        out[label] = {"mhz_median": statistics.median(c for _, c in samples), "mhz_min": min(c for _, c in samples),
                      "watts_mean": statistics.mean(w for w, _ in samples), "samples": len(samples),
                      "ms_per_forward": 1e3 * sum(t for t, _, _ in segs) / sum(c for _, c, _ in segs)}
    return out


def sampler_forward(forward, override):
    """One forward through the attention hook `override` as a sampler's forward runs it: with a fresh call counter,
    as the patch node's model wrapper puts in every forward's options (nodes/routing.py). Without one every call
    counts as its forward's first, and the calls share one carried-statistics site."""
    from sage_attention_pack.nodes.routing import ForwardCounter

    return forward({"optimized_attention_override": override, ForwardCounter.KEY: ForwardCounter()})


def compare(out, ref) -> dict:
    o, r = out.double().flatten(), ref.double().flatten()
    cos = (o @ r / (o.norm() * r.norm())).item()
    mse = ((o - r) ** 2).mean().item()
    peak = (r.max() - r.min()).item()
    return {"cosine": cos, "psnr_db": float("inf") if mse == 0 else 10 * math.log10(peak ** 2 / mse)}


CASES = {"wan21_14b_4blocks_480p81f": wan_case, "flux_dev_2x4blocks_1024px": flux_case,
         "qwen_image_4blocks_1328px": qwen_image_case, "lumina2_6blocks_1024px": lumina2_case,
         "ltxv_2b_4blocks_768x512_97f": ltxv_case, "hidream_i1_2x4blocks_1024px": hidream_case}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", required=True)
    parser.add_argument("--out", default="e2e_models.json")
    parser.add_argument("--repeats", type=int, default=5, help="timing rounds: one sample of every setting per round")
    parser.add_argument("--models", nargs="*", default=list(CASES))
    parser.add_argument("--no-peers", action="store_true", help="only the pack's settings")
    parser.add_argument("--profile", nargs="*", default=[],
                        help="settings ('default' for ComfyUI's own) whose forward is profiled: device time per kernel")
    parser.add_argument("--clocks", nargs="*", default=[],
                        help="settings ('default' for ComfyUI's own) whose forward runs back to back for "
                             "--clock-seconds while nvidia-smi samples the SM clock and power")
    parser.add_argument("--clock-seconds", type=float, default=4.0)
    parser.add_argument("--comfyui-rotation", nargs="*", default=[],
                        help="settings also run with ComfyUI's own rotary embedding (label "
                             "<setting>_comfyui_rotation): their override does not take Flux-family, Wan, "
                             "Qwen-Image, Lumina 2, LTX-Video and HiDream calls before the rotation "
                             "(nodes/rotary_handoff.py), as before the hand-off")
    args = parser.parse_args()

    comfy = load_comfy(args.comfyui)
    import sage_attention_pack as pack  # installed (pip install -e .) or on PYTHONPATH
    from sage_attention_pack.nodes import override as override_mod
    from sage_attention_pack.nodes import rotary_handoff
    from sage_attention_pack.sage_core import bench as bench_mod
    from sage_attention_pack.sage_core import config as config_mod
    from sage_attention_pack.sage_core.timing import error_line, interleaved_median_ms

    settings = {"auto": "auto", "int8_fp8": "int8_fp8", "int8_fp16": "int8_fp16", "off": "off"}
    result = {"environment": bench_mod.environment(), "pack": getattr(pack, "__version__", "?"),
              "comfyui_attention": "comfy.ldm.modules.attention.optimized_attention (PyTorch SDPA on CUDA)",
              "models": {}}
    overrides = {label: override_mod.SageOverride(config_mod.SageConfig(kernel=kernel))
                 for label, kernel in settings.items()}
    result["rotary_handoff"] = rotary_handoff.install()  # as the patch node does
    for label in args.comfyui_rotation:
        plain = overrides[f"{label}_comfyui_rotation"] = override_mod.SageOverride(
            config_mod.SageConfig(kernel=settings[label]))
        plain.takes_rotary = False
    if not args.no_peers:
        peer_overrides, result["peer_versions"] = load_peer_overrides()
        overrides.update(peer_overrides)
    for name in args.models:
        _, forward = CASES[name](comfy)
        with torch.inference_mode():
            # one forward of each setting for its output and its calls, then every setting and the default
            # timed in interleaved rounds (sage_core.timing): one after another, a GPU at its power limit gave
            # the later settings other clocks than the first
            ref = forward({})
            runs, row = {"default": lambda: forward({})}, {"settings": {}}
            for label, override in overrides.items():
                override.stats.reset()
                run = functools.partial(sampler_forward, forward, override)
                try:
                    out = run()
                    carried = run()  # a sampler's later steps: statistics carried from the step before
                except Exception as e:  # a peer that cannot run this model is reported, not fatal
                    row["settings"][label] = {"error": error_line(e)}
                    continue
                row["settings"][label] = {**compare(out, ref), "calls": override.stats.snapshot(),
                                          "later_steps": compare(carried, ref)}
                runs[label] = run
                del out, carried
            timed = interleaved_median_ms(runs, rounds=args.repeats, per_round=1, warmup=1)
            base_ms = row["default_ms"] = timed.pop("default")
            if isinstance(base_ms, str):
                raise RuntimeError(f"ComfyUI's own attention failed: {base_ms}")
            for label, ms in timed.items():
                entry = row["settings"][label]
                if isinstance(ms, str):
                    entry["error"] = ms
                    continue
                entry.update(ms=ms, speedup=base_ms / ms)
                print(f"{name:28s} {label:10s} {ms:9.2f} ms vs {base_ms:9.2f} ms -> {base_ms / ms:.3f}x  "
                      f"cos {entry['cosine']:.5f} psnr {entry['psnr_db']:.1f} dB (later steps "
                      f"{entry['later_steps']['psnr_db']:.1f} dB)", flush=True)
            for label in args.profile:
                if label not in runs:
                    print(f"{name}: no setting {label!r} to profile", flush=True)
                    continue
                profile = row.setdefault("profile", {})[label] = kernel_profile(runs[label])
                print(f"{name:28s} {label:10s} device {profile['device_ms']:.2f} ms per forward: " + "; ".join(
                    f"{kernel[:48]} {ms:.2f}" for kernel, ms in list(profile["kernels"].items())[:8]), flush=True)
            if args.clocks:
                labels = [label for label in args.clocks if label in runs]
                for label in sorted(set(args.clocks) - set(labels)):
                    print(f"{name}: no setting {label!r} to sample", flush=True)
                row["clocks"] = forward_clocks(runs, labels, args.clock_seconds)
                for label, c in row["clocks"].items():
                    print(f"{name:28s} {label:10s} " + (c["error"] if "error" in c else
                          f"{c['mhz_median']:.0f} MHz (min {c['mhz_min']:.0f}) {c['watts_mean']:.0f} W "
                          f"{c['ms_per_forward']:.2f} ms per forward"), flush=True)
        result["models"][name] = row
        Path(args.out).write_text(json.dumps(result, indent=1))  # kept even if a later model fails
        torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
