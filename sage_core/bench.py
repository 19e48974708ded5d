"""Kernel benchmark: every Sage variant end to end (quantization included) against SDPA's backends and,
when importable, the official SageAttention kernels and comfy-kitchen's INT8 attention.

TOPS = 4·B·H·Nq·Nk·D / time. Inputs are model-shaped: K carries a per-channel offset, as the keys of
real diffusion models do (it is what K smoothing removes). Accuracy is measured against FP32 attention
on up to `ACCURACY_HEADS` heads. On a CPU the kernels run through Triton's interpreter on small shapes:
the accuracy is real there, the timings are not GPU figures.
"""
from __future__ import annotations

import fnmatch
import functools
import importlib.util
import json
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

from ..kernels import carried_stats  # torch only: importing it loads no Triton
from . import backend
from .config import SageConfig
from .dispatch import attention
from .metrics import attention_error
from .progress import progress
from .timing import error_line, interleaved_median_ms

GPU_SHAPES = {
    "flux_1024px": (1, 24, 4608, 128),
    "sdxl_1024px": (2, 10, 4096, 64),
    "wan21_480p_81f": (1, 40, 32760, 128),
    "hunyuan_720p_129f": (1, 24, 118800, 128),
    **{f"sweep_d{d}_n{n}": (2, 32, n, d) for d in (64, 128) for n in (2048, 8192, 16384)},
}
CPU_SHAPES = {"tiny_d64": (1, 2, 160, 64), "tiny_d128": (1, 2, 130, 128), "tiny_d40": (1, 2, 96, 40)}
QUICK_GPU = ("flux_1024px", "sdxl_1024px", "wan21_480p_81f", "sweep_d128_n16384", "sweep_d64_n16384")
ACCURACY_HEADS = 4
K_OFFSET_SCALE = 4.0

SAGE_VARIANTS = {
    "sage_int8_fp16": SageConfig(kernel="int8_fp16"),
    "sage_int8_fp8": SageConfig(kernel="int8_fp8"),
    "sage_int8_fp8_smooth_v": SageConfig(kernel="int8_fp8", smooth_v=True),
    "sage_int8_fp16_per_thread": SageConfig(kernel="int8_fp16", qk_granularity="per_thread"),
    "sage_int8_fp16_no_smooth_k": SageConfig(kernel="int8_fp16", smooth_k=False),
    "sage_int8_fp8_no_smooth_k": SageConfig(kernel="int8_fp8", smooth_k=False),
    "sage_auto": SageConfig(kernel="auto"),
    "sage_off": SageConfig(kernel="off"),  # the dispatcher around exact SDPA: its own overhead
}
# Bounds the issue sets for model-shaped inputs against FP32 attention.
BOUNDS = {"fp16": {"cosine": 0.9999, "rel_l1": 0.015}, "fp8": {"cosine": 0.999, "rel_l1": 0.045}}


BENCH_SCRIPTS = Path(__file__).resolve().parent.parent / "bench"  # beside the package: scripts, not a package


def bench_script(name: str):
    """bench/<name>.py loaded as a fresh module, for another script or a test that uses its functions."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH_SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_shaped_inputs(b, h, n, d, dtype, device, seed=0):
    """Random Q, K, V with a per-channel offset in K, drawn on `device` (video-length inputs are GBs)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device)

    q = randn(b, h, n, d)
    k = randn(b, h, n, d) + K_OFFSET_SCALE * randn(1, h, 1, d)
    v = randn(b, h, n, d)
    return tuple(t.to(dtype=dtype) for t in (q, k, v))


def sdpa_backends():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def make(b):
        def run(q, k, v):
            with sdpa_kernel([b]):
                return F.scaled_dot_product_attention(q, k, v)
        return run

    return {"sdpa_flash": make(SDPBackend.FLASH_ATTENTION), "sdpa_cudnn": make(SDPBackend.CUDNN_ATTENTION),
            "sdpa_efficient": make(SDPBackend.EFFICIENT_ATTENTION),
            "sdpa_default": lambda q, k, v: F.scaled_dot_product_attention(q, k, v)}


def load_peers() -> tuple[dict, dict, dict]:
    """The peers of bench/peers.py (beside the package, in a source checkout), why others are missing, and the
    versions of those found."""
    path = Path(__file__).resolve().parent.parent / "bench" / "peers.py"
    if not path.exists():
        return {}, {"peers": "bench/peers.py not found (peers are benchmarked from a source checkout)"}, {}
    spec = importlib.util.spec_from_file_location("sage_attention_bench_peers", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    found = mod.available_peers(check_device=True)
    return dict(found), dict(getattr(found, "missing", {})), found.versions()


def environment() -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()}
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception as e:  # reported, not fatal: SDPA still benchmarks
        env["triton"] = f"unavailable: {e}"
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["capability"] = "sm%d%d" % torch.cuda.get_device_capability()
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = f"CPU ({platform.processor() or platform.machine()}), Triton interpreter"
    return env


def kernel_served(q, k, v, config: SageConfig, launch_config, pv_fp8: bool) -> str:
    """Which attention kernel a non-causal, unmasked Sage call of these HND inputs with `launch_config` runs:
    "hopper_gluon" or "portable_triton" (the A/B and profiling scripts report it beside each key)."""
    from ..kernels import launch

    _, k_group = launch.quant_groups(config.q_group_rows, config.k_group_rows, launch_config)
    hopper = launch.runs_hopper_kernel(q, k, v, config=launch_config, k_group=k_group, pv_fp8=pv_fp8,
                                       is_causal=False, has_bias=False)
    return "hopper_gluon" if hopper else "portable_triton"


def reference(q, k, v):
    """FP32 attention on the first heads (the memory-efficient backend takes FP32 at any length)."""
    h = min(ACCURACY_HEADS, q.shape[1])
    qs, ks, vs = (t[:, :h].float() for t in (q, k, v))
    return F.scaled_dot_product_attention(qs, ks, vs)


def samples_per_round(device: str) -> int:
    """Samples of each method per timing round: 2 on the GPU, 1 in the interpreter (each call is slow)."""
    return 2 if device == "cuda" else 1


def add_timings(rows: dict, timed: dict, ops: float) -> None:
    """Each method's milliseconds and TOPS (`ops` operations per call) into its row, or the error that stopped
    its timing (interleaved_median_ms's result)."""
    for method, ms in timed.items():
        if isinstance(ms, str):
            rows[method] = {"error": ms}
        else:
            rows[method].update(ms=ms, tops=ops / (ms * 1e-3) / 1e12)


def bench_shape(name, shape, dtype, device, methods, rounds) -> dict:
    """Accuracy of every method against FP32 attention, then their speed, timed in interleaved rounds."""
    b, h, n, d = shape
    q, k, v = model_shaped_inputs(b, h, n, d, dtype, device)
    ref = reference(q, k, v)
    hh = ref.shape[1]
    rows, runnable = {}, {}
    for method, fn in methods.items():
        try:
            rows[method] = attention_error(fn(q, k, v)[:, :hh], ref)
            runnable[method] = functools.partial(fn, q, k, v)
        except Exception as e:  # a peer that cannot run this shape is reported, not fatal
            rows[method] = {"error": error_line(e)}
        if device == "cuda":
            torch.cuda.empty_cache()
    timed = interleaved_median_ms(runnable, rounds=rounds, per_round=samples_per_round(device),
                                  warmup=2 if device == "cuda" else 0)
    add_timings(rows, timed, 4 * b * h * n * n * d)
    base = rows.get("sdpa_default", {}).get("ms")
    for row in rows.values():
        if base and "ms" in row:
            row["speedup_vs_sdpa_default"] = base / row["ms"]
    return {"shape": {"B": b, "H": h, "N": n, "D": d}, "dtype": str(dtype).replace("torch.", ""), "methods": rows}


def sage_method(config):
    return lambda q, k, v: attention(q, k, v, config=config)


def carried_method(config):
    """Sage with carried statistics (kernels/carried_stats.py), as a sampler's second and later steps run it: the
    first call of each shape primes the site and is called again, so that the accuracy reported and every timed
    call are carried calls. The benchmark's calls have no rotary table, so carried_stats.PLAIN is on inside the
    method's calls whatever it ships as: the row times the mode, not what the library does by default."""
    primed = set()

    def run(q, k, v):
        shipped = carried_stats.PLAIN
        carried_stats.PLAIN = True
        try:
            if q.shape not in primed:
                primed.add(q.shape)
                attention(q, k, v, config=config, carry_key="benchmark")
            return attention(q, k, v, config=config, carry_key="benchmark")
        finally:
            carried_stats.PLAIN = shipped
    return run


def fp8_tile_method(fp16_tiles: bool):
    """The FP8 kernel on the launch configuration this call would take (tuned or the table's) with its key tiles'
    P·V accumulated in FP16 or in FP32 (tuning.LaunchConfig.fp16_tiles), through the kernel's launcher as autotuning
    times it (the dispatcher's checks and the repair launch left out, the same for both)."""
    import dataclasses

    from ..kernels import launch

    config = SageConfig(kernel="int8_fp8")

    @functools.lru_cache(maxsize=None)
    def launch_config(device, d: int, nq: int, nk: int, dtype):
        """Looked up once per shape, outside the timed calls."""
        tuned = backend.tuning_for(device, "fp8", launch.padded_head_dim(d), None, nq, nk, str(dtype), False)
        return dataclasses.replace(tuned, fp16_tiles=fp16_tiles, pv_direct=False)

    def run(q, k, v):
        return backend.run(q, k, v, layout="HND", sm_scale=q.shape[-1] ** -0.5, is_causal=False, bias=None,
                           config=config, pv_fp8=True, return_lse=False,
                           launch_config=launch_config(q.device, q.shape[-1], q.shape[2], k.shape[2], q.dtype))[0]
    return run


def tile_accumulation_methods(device: str) -> dict:
    """FP16 tiles against FP32 tiles for FP8 P·V, side by side, where the table runs FP16 tiles (Ada and consumer
    Blackwell, tuning.FP16_TILE_FAMILIES: the main job there measures SageAttention2++'s accumulation against
    SageAttention2's on the user's own card) and in the interpreter (their accuracy); nothing elsewhere."""
    from ..kernels import tuning

    if backend.arch_family(torch.device(device)) not in (*tuning.FP16_TILE_FAMILIES, "cpu"):
        return {}
    return {"sage_int8_fp8_fp16_tiles": fp8_tile_method(True), "sage_int8_fp8_fp32_tiles": fp8_tile_method(False)}


# Above this many tokens a shape runs only the methods of the summary table (each call takes ~0.1–1 s).
LONG_SHAPE_TOKENS = 60000


def run(shapes=None, dtype=torch.bfloat16, repeats=None, with_peers=True, out_path=None, quick=False,
        method_patterns=None, merge=False, extra=None) -> dict:
    """Benchmark the shapes; the JSON (written to out_path before the first shape and after each) holds the
    environment, each shape's methods and `extra`'s keys (the main job's own: what serves here and the self-check's
    rows)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not backend.interpreting():
        raise SystemExit("No GPU: set TRITON_INTERPRET=1 to run the kernels through Triton's interpreter")
    table = GPU_SHAPES if device == "cuda" else CPU_SHAPES
    names = shapes or (list(QUICK_GPU) if quick and device == "cuda" else list(table))
    unknown = [s for s in names if s not in table]
    if unknown:
        raise SystemExit(f"unknown shape(s) {unknown}; known: {sorted(table)}")
    methods = {k: sage_method(c) for k, c in SAGE_VARIANTS.items()}
    methods["sage_int8_fp8_carried"] = carried_method(SAGE_VARIANTS["sage_int8_fp8"])
    methods.update(tile_accumulation_methods(device))
    peers_missing, peer_versions = {}, {}
    if device == "cuda":
        methods.update(sdpa_backends())
        if with_peers:
            peers, peers_missing, peer_versions = load_peers()
            methods.update({f"peer_{k}": v for k, v in peers.items()})
    else:
        methods["sdpa_default"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    if method_patterns:
        keep = [m for m in methods if m == "sdpa_default" or any(fnmatch.fnmatch(m, p) for p in method_patterns)]
        methods = {m: methods[m] for m in keep}
    # rounds visit every method in turn; `repeats` samples per method in all
    rounds = max(1, (repeats or (10 if device == "cuda" else 1)) // samples_per_round(device))
    result = {"environment": environment(), "tops_definition": "4*B*H*Nq*Nk*D / time",
              "k_offset_scale": K_OFFSET_SCALE, "accuracy_reference": f"fp32 attention, first {ACCURACY_HEADS} heads",
              "bounds": BOUNDS, "peers_missing": peers_missing, "peer_versions": peer_versions, "shapes": {}}
    if merge and out_path and Path(out_path).exists():
        result = json.loads(Path(out_path).read_text())
        result["peers_missing"] = {**result.get("peers_missing", {}), **peers_missing}
        result["peer_versions"] = {**result.get("peer_versions", {}), **peer_versions}
    result.update(extra or {})

    def save():  # before the first shape and after every one: a run cut short keeps what it checked and measured
        if out_path:
            Path(out_path).parent.mkdir(parents=True, exist_ok=True)
            Path(out_path).write_text(json.dumps(result, indent=1))

    save()
    for name in progress(names, desc="benchmark", unit="shape"):
        shape = table[name]
        long = shape[2] > LONG_SHAPE_TOKENS
        chosen = {m: f for m, f in methods.items() if not long or m in SUMMARY_METHODS or m == "sdpa_default"}
        row = bench_shape(name, shape, dtype, device, chosen, min(rounds, 2) if long else rounds)
        merge_shape(result["shapes"], name, row)
        save()
    return result


def merge_shape(shapes: dict, name: str, row: dict) -> None:
    """Add a shape's rows; where the shape was measured before, its SDPA default stays the baseline of
    every speed-up."""
    old = shapes.get(name)
    if old is None:
        shapes[name] = row
        return
    base = old["methods"].get("sdpa_default", {}).get("ms")
    for method, r in row["methods"].items():
        if method == "sdpa_default" and base:
            continue
        if base and "ms" in r:
            r["speedup_vs_sdpa_default"] = base / r["ms"]
        old["methods"][method] = r


def format_table(result: dict) -> str:
    methods = []
    for s in result["shapes"].values():
        methods += [m for m in s["methods"] if m not in methods]
    lines = [f"device: {result['environment'].get('device')}  torch {result['environment']['torch']}  "
             f"triton {result['environment'].get('triton')}", "TOPS (speed-up vs SDPA default) [cosine / rel L1]"]
    for name, s in result["shapes"].items():
        lines.append(f"\n{name} {s['shape']} {s['dtype']}")
        for m in methods:
            r = s["methods"].get(m)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"  {m:30s} error: {r['error'][:90]}")
                continue
            sp = r.get("speedup_vs_sdpa_default")
            lines.append(f"  {m:30s} {r['tops']:8.1f} TOPS  {r['ms']:9.3f} ms  "
                         f"{'(%.3fx)' % sp if sp else '':10s} [{r['cosine']:.6f} / {r['rel_l1']:.4f}]")
    return "\n".join(lines)


SUMMARY_METHODS = ("sdpa_flash", "sdpa_cudnn", "sdpa_default", "peer_sa1_triton", "peer_sa2_fp16_cuda",
                   "peer_sa2_fp8_sm90", "peer_ck_int8", "sage_int8_fp16", "sage_int8_fp8", "sage_auto")


def markdown_table(result: dict, methods=SUMMARY_METHODS) -> str:
    """The README's table: TOPS per shape and method, with the speed-up over SDPA's default in brackets."""
    present = [m for m in methods if any(m in s["methods"] for s in result["shapes"].values())]
    env = result["environment"]
    lines = [f"{env.get('device')}, torch {env['torch']}, Triton {env.get('triton')}, CUDA {env.get('cuda', '-')}; "
             f"TOPS = 4·B·H·Nq·Nk·D / time, quantization included; (×) = speed-up over SDPA default", "",
             "| shape | " + " | ".join(present) + " |", "|---|" + "---|" * len(present)]
    for name, s in result["shapes"].items():
        sh = s["shape"]
        cells = []
        for m in present:
            r = s["methods"].get(m, {})
            cells.append(f"{r['tops']:.0f} ({r['speedup_vs_sdpa_default']:.2f}×)" if "tops" in r else "–")
        lines.append(f"| {name} B{sh['B']} H{sh['H']} N{sh['N']} D{sh['D']} | " + " | ".join(cells) + " |")
    lines += ["", "Accuracy against FP32 attention (worst over shapes): cosine / relative L1", "",
              "| method | cosine | rel. L1 |", "|---|---|---|"]
    for m in present:
        rows = [s["methods"][m] for s in result["shapes"].values() if "cosine" in s["methods"].get(m, {})]
        if rows:
            lines.append(f"| {m} | {min(r['cosine'] for r in rows):.5f} (min) | "
                         f"{max(r['rel_l1'] for r in rows):.4f} (max) |")
    return "\n".join(lines)
