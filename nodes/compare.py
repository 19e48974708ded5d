"""Sage Attention Compare: the same sampling run with ComfyUI's attention and with Sage, side by side.

Both runs use one seed, one noise and one schedule. Each timed run follows an untimed warm-up (the first
``warmup_steps`` denoising steps of the same schedule, run with the same model patch), so model loading,
kernel compilation and autotuning are not in the figures. On CUDA every timestamp is taken after
``torch.cuda.synchronize``; attention time is the sum of every attention call's duration, measured inside an
attention override (CUDA events on the GPU, a monotonic clock on the CPU). Decoding is never timed.
"""
from __future__ import annotations

import json
import math
import statistics
import time

import torch
from comfy_api.latest import io, ui

from ..sage_core import image_metrics
from ..sage_core.config import GRANULARITIES, SageConfig
from . import report_images
from .frontend import send_to_frontend
from .override import OVERRIDE_KEY

CATEGORY = "model_patches/sage_attention"
FROM_MODEL = "from model"
KERNEL_CHOICES = [FROM_MODEL, "auto", "int8_fp16", "int8_fp8", "off"]
MAX_PREVIEW_FRAMES = 16
EVENT = "sage_attention.compare"


# ---------------------------------------------------------------------------------------------------------------
# Timing helpers


def synchronize(device) -> None:
    """Wait for queued device work, so a host timestamp covers it (no-op on the CPU)."""
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(dev)
    elif dev is not None and dev.type == "xpu" and hasattr(torch, "xpu") and torch.xpu.is_available():
        torch.xpu.synchronize(dev)
    elif dev is not None and dev.type == "mps" and hasattr(torch, "mps"):
        torch.mps.synchronize()


def find_override(model):
    """The attention override a ModelPatcher carries (None if it has none)."""
    return model.model_options.get("transformer_options", {}).get(OVERRIDE_KEY)


def clone_model(model):
    """``model.clone()`` that shares the attention override object instead of deep-copying it.

    ModelPatcher.clone deep-copies model_options; overrides hold counters (and locks) that must stay one
    object, so the override is lifted out for the copy and put back into both models.
    """
    to = model.model_options.get("transformer_options")
    override = to.pop(OVERRIDE_KEY, None) if isinstance(to, dict) else None
    try:
        m = model.clone()
    finally:
        if override is not None:
            to[OVERRIDE_KEY] = override
    if override is not None:
        m.model_options.setdefault("transformer_options", {})[OVERRIDE_KEY] = override
    return m


def install_override(model, make):
    """A clone of ``model`` whose attention override is ``make(previous_override)``."""
    m = clone_model(model)
    to = m.model_options.setdefault("transformer_options", {})
    wrapper = make(to.get(OVERRIDE_KEY))
    to[OVERRIDE_KEY] = wrapper
    return m, wrapper


class AttentionTimer:
    """An attention override that measures every call and hands it on unchanged.

    It calls the override it replaced (``previous``: e.g. the Sage override, whose wrappers find it through
    this attribute) or, with none, ComfyUI's own attention function. On CUDA each call is bracketed by CUDA
    events (no host synchronisation inside the sampling loop); :meth:`total_seconds` synchronises and adds
    their elapsed times. Elsewhere each call is timed with ``time.perf_counter`` (the CPU runs attention
    synchronously).
    """

    def __init__(self, previous=None):
        self.previous = previous
        self.calls = 0
        self._cpu_seconds = 0.0
        self._events: list = []
        self.enabled = True

    def __call__(self, func, *args, **kwargs):
        if not self.enabled:
            return self._forward(func, args, kwargs)
        q = args[0] if args else kwargs.get("q")
        return self._timed(isinstance(q, torch.Tensor) and q.is_cuda, lambda: self._forward(func, args, kwargs))

    @property
    def takes_rotary(self) -> bool:
        """Whether the override below takes calls before their rotation (nodes/rotary_handoff.py)."""
        return bool(getattr(self.previous, "takes_rotary", False))

    def attend_rotary(self, args, kwargs, rope, exact_with):
        """A call handed over before its rotation, timed with the rotation the override below does inside it."""
        call = lambda: self.previous.attend_rotary(args, kwargs, rope, exact_with)  # noqa: E731
        return self._timed(args[0].is_cuda, call) if self.enabled else call()

    def _timed(self, on_cuda: bool, call):
        self.calls += 1
        if on_cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            out = call()
            end.record()
            self._events.append((start, end))
            return out
        t0 = time.perf_counter()
        out = call()
        self._cpu_seconds += time.perf_counter() - t0
        return out

    def _forward(self, func, args, kwargs):
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    def reset(self):
        self.calls = 0
        self._cpu_seconds = 0.0
        self._events = []

    def total_seconds(self) -> float:
        total = self._cpu_seconds
        if self._events:
            torch.cuda.synchronize()
            total += sum(s.elapsed_time(e) for s, e in self._events) / 1000.0
        return total

    # Model patchers deep-copy their options when cloned; a copy must keep timing into the same counters.
    def __deepcopy__(self, memo):
        return self


# ---------------------------------------------------------------------------------------------------------------
# Stats of the Sage override


def find_sage_override(override):
    """The Sage override in a chain of overrides linked by ``.previous`` (None if there is none)."""
    from .patch import SageOverride

    seen = set()
    while override is not None and id(override) not in seen:
        seen.add(id(override))
        if isinstance(override, SageOverride):
            return override
        override = getattr(override, "previous", None)
    return None


def _snapshot(override) -> dict:
    if override is None or getattr(override, "stats", None) is None:
        return {}
    return override.stats.snapshot()


# ---------------------------------------------------------------------------------------------------------------
# JSON-safe values (JSON has no infinity; the frontend reads "inf"/"-inf"/"nan")


def json_safe(value):
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _ratio(a: float, b: float) -> float:
    if b > 0:
        return a / b
    return math.nan


# ---------------------------------------------------------------------------------------------------------------
# Sampling


class _Progress:
    """One progress bar over every denoising step of both runs (warm-ups included)."""

    def __init__(self, total: int, node_id, model=None):
        import comfy.utils

        self.pbar = comfy.utils.ProgressBar(total, node_id=node_id)
        self.total = total
        self.done = 0
        self.previewer = None
        if model is not None:
            try:
                import latent_preview

                self.previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)
            except Exception:  # previews are optional
                self.previewer = None

    def callback(self):
        base = self.done

        def cb(step, x0, x, total_steps):
            preview = None
            if self.previewer is not None and x0 is not None:
                try:
                    preview = self.previewer.decode_latent_to_preview_image("JPEG", x0)
                except Exception:
                    preview = None
            self.pbar.update_absolute(min(self.total, base + step + 1), self.total, preview)

        return cb

    def advance(self, n: int):
        self.done = min(self.total, self.done + n)
        self.pbar.update_absolute(self.done, self.total)


def _sample(model, noise, latent_image, latent, settings, callback, last_step=None):
    import comfy.sample

    return comfy.sample.sample(
        model, noise, settings["steps"], settings["cfg"], settings["sampler_name"], settings["scheduler"],
        settings["positive"], settings["negative"], latent_image, denoise=settings["denoise"],
        last_step=last_step, noise_mask=latent.get("noise_mask"), callback=callback, disable_pbar=True,
        seed=settings["seed"])


class Runner:
    """One side of the comparison (exact or Sage): its model with a timing override, noise, and what it measured.

    :meth:`warm_up` samples the first steps of the schedule untimed (model loading, kernel compilation and
    autotuning happen there); each :meth:`timed` call samples the whole schedule between two device
    synchronisations, with every attention call timed, and resets the Sage counters first so they describe
    that run.
    """

    def __init__(self, model, latent: dict, settings: dict, progress: _Progress):
        import comfy.sample

        self.latent = latent
        self.settings = settings
        self.progress = progress
        self.latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        self.noise = comfy.sample.prepare_noise(self.latent_image, settings["seed"], latent.get("batch_index"))
        self.model, self.timer = install_override(model, AttentionTimer)
        self.sage_override = find_sage_override(self.timer.previous)
        self.device = self.model.load_device
        self.seconds: list[float] = []
        self.attention_seconds: list[float] = []
        self.attention_calls = 0
        self.counters: dict = {}
        self.samples = None

    def _sample(self, last_step=None):
        return _sample(self.model, self.noise, self.latent_image, self.latent, self.settings,
                       self.progress.callback(), last_step=last_step)

    def warm_up(self, steps: int):
        if steps <= 0:
            return
        self.timer.enabled = False
        try:
            self._sample(last_step=steps)
        finally:
            self.timer.enabled = True
        self.progress.advance(steps)

    def timed(self):
        self.timer.reset()
        if self.sage_override is not None:
            self.sage_override.stats.reset()  # the patch's sampling wrapper resets them too
        synchronize(self.device)
        t0 = time.perf_counter()
        self.samples = self._sample()
        synchronize(self.device)
        self.seconds.append(time.perf_counter() - t0)
        self.attention_seconds.append(self.timer.total_seconds())
        self.attention_calls = self.timer.calls
        self.counters = _snapshot(self.sage_override)
        self.progress.advance(self.settings["steps"])

    def figures(self) -> dict:
        out = {"sampling_s": statistics.median(self.seconds), "attention_s": statistics.median(self.attention_seconds),
               "attention_calls": self.attention_calls}
        if len(self.seconds) > 1:
            out["sampling_runs_s"] = list(self.seconds)
            out["attention_runs_s"] = list(self.attention_seconds)
        return out


def decode(vae, samples: torch.Tensor) -> torch.Tensor:
    """VAEDecode's result: IMAGE ``[frames, H, W, C]`` (video frames and batch flattened into one axis)."""
    images = vae.decode(samples)
    if images.ndim == 5:
        images = images.reshape(-1, images.shape[-3], images.shape[-2], images.shape[-1])
    return images


# ---------------------------------------------------------------------------------------------------------------
# Report


def describe_config(config: SageConfig | None) -> str:
    if config is None:
        return "Sage"
    if config.kernel == "off":
        return "Sage off (exact)"
    bits = [config.kernel, config.qk_granularity, f"block {config.quant_block}"]
    if config.smooth_k:
        bits.append("smooth K")
    if config.smooth_v:
        bits.append("smooth V")
    return "Sage " + ", ".join(bits)


def format_report(r: dict) -> str:
    def sec(v):
        return f"{v:.3f} s" if isinstance(v, (int, float)) and math.isfinite(v) else "n/a"

    def ratio(v):
        return f"{v:.2f}x" if isinstance(v, (int, float)) and math.isfinite(v) else "n/a"

    def psnr(v):
        return "inf dB (identical)" if v == math.inf else f"{v:.2f} dB"

    s = r["sampler"]
    e, g = r["exact"], r["sage"]
    lines = [
        f"Sage Attention Compare: {r['labels']['exact']} vs {r['labels']['sage']}",
        f"sampling: {s['steps']} steps, {s['sampler_name']}/{s['scheduler']}, cfg {s['cfg']}, seed {s['seed']}, "
        f"denoise {s['denoise']}, on {r['device']}",
        f"timing: {r['timing_note']}",
        f"  exact: sampling {sec(e['sampling_s'])}, attention {sec(e['attention_s'])} in {e['attention_calls']} calls",
        f"  Sage:  sampling {sec(g['sampling_s'])}, attention {sec(g['attention_s'])} in {g['attention_calls']} calls",
        f"  speed-up: sampling {ratio(r['speedup'])}, attention {ratio(r['attention_speedup'])}",
    ]
    c = g.get("counters") or {}
    if c:
        variants = ", ".join(f"{k} {v}" for k, v in (c.get("sage") or {}).items()) or "none"
        fallbacks = c.get("fallback") or {}
        reasons = ", ".join(f"{k}: {v}" for k, v in fallbacks.items())
        exact = c.get("exact") or {}
        why = ", ".join(f"{k}: {v}" for k, v in exact.items())
        lines.append(f"  Sage calls: {sum((c.get('sage') or {}).values())} ({variants}); kept exact: "
                     f"{sum(exact.values())}{f' ({why})' if why else ''}; fallbacks: "
                     f"{sum(fallbacks.values())}{f' ({reasons})' if reasons else ''}; "
                     f"recomputed: {c.get('recomputed', 0)}"
                     + (f"; rotary embedding inside the quantization: {c['rotary_fused']}"
                        if c.get("rotary_fused") else ""))
    lines += [
        "quality (decoded outputs, values 0..1):",
        f"  PSNR {psnr(r['psnr'])}, SSIM {r['ssim']:.5f}, largest pixel difference {r['max_abs_diff']:.5f} "
        f"({r['max_diff_8bit']}/255)",
        f"  latent cosine similarity {r['latent_cosine']:.7f}",
    ]
    if len(r["frames"]) > 1:
        lines.append("per frame: frame  PSNR  SSIM  max diff")
        for f in r["frames"]:
            lines.append(f"  {f['frame']:4d}  {psnr(f['psnr'])}  {f['ssim']:.5f}  {f['max_diff_8bit']}/255")
    return "\n".join(lines)


def _preview_frames(n: int) -> list[int]:
    if n <= MAX_PREVIEW_FRAMES:
        return list(range(n))
    step = (n - 1) / (MAX_PREVIEW_FRAMES - 1)
    return sorted({round(i * step) for i in range(MAX_PREVIEW_FRAMES)})


def _save_previews(images: torch.Tensor, prefix: str, frames: list[int]) -> list[dict]:
    saved = ui.ImageSaveHelper.save_images(images[frames], filename_prefix=prefix, folder_type=io.FolderType.temp,
                                           cls=None, compress_level=1)
    return [{"filename": s["filename"], "subfolder": s["subfolder"], "type": str(getattr(s["type"], "value",
                                                                                           s["type"]))}
            for s in saved]


# ---------------------------------------------------------------------------------------------------------------
# The node


def sage_settings_inputs(include_from_model: bool = True) -> list:
    kernels = KERNEL_CHOICES if include_from_model else KERNEL_CHOICES[1:]
    return [
        io.Combo.Input("kernel", options=kernels, default="auto",
                       tooltip="Sage variant for the Sage run. 'from model' uses the Sage patch already on the "
                               "model (from the Sage Attention node); 'off' runs the Sage path with exact "
                               "attention (both outputs must then be identical)."),
        io.Boolean.Input("smooth_k", default=True, tooltip="Subtract K's per-channel mean before quantizing."),
        io.Boolean.Input("smooth_v", default=False, tooltip="Subtract V's per-channel mean (for FP8 P·V)."),
        io.Combo.Input("qk_granularity", options=list(GRANULARITIES), default="per_warp",
                       tooltip="Rows of Q sharing one INT8 scale."),
        io.Combo.Input("quant_block", options=["128", "64"], default="128", tooltip="Tokens per quantization block."),
    ]


def config_from_inputs(kernel, smooth_k, smooth_v, qk_granularity, quant_block) -> SageConfig | None:
    if kernel == FROM_MODEL:
        return None
    return SageConfig(kernel=kernel, smooth_k=bool(smooth_k), smooth_v=bool(smooth_v),
                      qk_granularity=qk_granularity, quant_block=int(quant_block))


def without_sage(model):
    """``remove_sage(model)``: ComfyUI's default attention (or the override before Sage), never deep-copying
    the Sage override."""
    from .patch import SageOverride, remove_sage

    to = model.model_options.get("transformer_options", {})
    override = to.get(OVERRIDE_KEY)
    if not isinstance(override, SageOverride):
        return remove_sage(clone_model(model))
    # Lift the Sage override out while remove_sage clones, then drop it from the clone (its wrappers go too).
    to[OVERRIDE_KEY] = override.previous
    try:
        m = remove_sage(clone_model(model))
    finally:
        to[OVERRIDE_KEY] = override
    mo = m.model_options.setdefault("transformer_options", {})
    if override.previous is None:
        mo.pop(OVERRIDE_KEY, None)
    else:
        mo[OVERRIDE_KEY] = override.previous
    return m


def prepare_models(model, config: SageConfig | None, exact_blocks: str = ""):
    """(exact model, Sage model): ComfyUI's default attention (any Sage patch removed) and Sage."""
    from .patch import apply_sage

    exact_model = without_sage(model)
    if config is None:
        if find_sage_override(find_override(model)) is None:
            raise ValueError("kernel is 'from model' but the model carries no Sage patch: connect the model "
                             "through the Sage Attention node, or pick a kernel here")
        sage_model = model
    else:
        sage_model = apply_sage(exact_model, config, exact_blocks=exact_blocks or "")
    return exact_model, sage_model


class SageAttentionCompare(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import comfy.samplers

        return io.Schema(
            node_id="SageAttentionCompare",
            display_name="Sage Attention Compare",
            category=CATEGORY,
            description="Samples twice with one seed, with ComfyUI's attention and with Sage, and reports the "
                        "measured speed-up (warm-up excluded, GPU-synchronised) and the difference "
                        "(PSNR, SSIM, largest pixel difference, latent cosine similarity).",
            inputs=[
                io.Model.Input("model", tooltip="The model; a Sage patch on it is removed for the exact run."),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image"),
                io.Vae.Input("vae"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Int.Input("steps", default=20, min=1, max=10000),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01),
                *sage_settings_inputs(),
                io.String.Input("exact_blocks", default="", tooltip="Blocks kept exact in the Sage run, e.g. "
                                "'0-3, 36-39' (ignored with kernel 'from model')."),
                io.Int.Input("warmup_steps", default=1, min=0, max=100,
                             tooltip="Untimed denoising steps each side runs before any timed run (model loading, "
                                     "kernel compilation and autotuning happen there)."),
                io.Float.Input("heat_gain", default=10.0, min=0.0, max=1000.0, step=0.5,
                               tooltip="Amplification of the difference heat map (0: the largest difference "
                                       "maps to white)."),
                io.Int.Input("timed_runs", default=1, min=1, max=20, optional=True,
                             tooltip="Timed runs per side, alternating exact and Sage; the report gives the "
                                     "median."),
            ],
            outputs=[
                io.Image.Output("exact_image", display_name="exact"),
                io.Image.Output("sage_image", display_name="sage"),
                io.Image.Output("side_by_side"),
                io.Image.Output("heat_map"),
                io.String.Output("report"),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, vae, seed, steps, cfg, sampler_name, scheduler,
                denoise, kernel, smooth_k, smooth_v, qk_granularity, quant_block, exact_blocks="",
                warmup_steps=1, timed_runs=1, heat_gain=10.0) -> io.NodeOutput:
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        result = run_compare(model, positive, negative, latent_image, vae, seed=seed, steps=steps, cfg=cfg,
                             sampler_name=sampler_name, scheduler=scheduler, denoise=denoise,
                             config=config_from_inputs(kernel, smooth_k, smooth_v, qk_granularity, quant_block),
                             exact_blocks=exact_blocks, warmup_steps=warmup_steps, timed_runs=timed_runs,
                             heat_gain=heat_gain, node_id=node_id)
        payload = result["payload"]
        send_to_frontend(EVENT, payload)
        return io.NodeOutput(result["exact"], result["sage"], result["side_by_side"], result["heat_map"],
                             result["text"], ui={"sage_compare": [payload]})


def run_compare(model, positive, negative, latent, vae, *, seed, steps, cfg, sampler_name, scheduler, denoise,
                config: SageConfig | None, exact_blocks="", warmup_steps=1, timed_runs=1, heat_gain=10.0,
                node_id=None, save_previews=True) -> dict:
    """Both runs, the images and the report. ``config=None`` uses the Sage patch on ``model``."""
    exact_model, sage_model = prepare_models(model, config, exact_blocks)
    settings = {"seed": int(seed), "steps": int(steps), "cfg": float(cfg), "sampler_name": sampler_name,
                "scheduler": scheduler, "denoise": float(denoise), "positive": positive, "negative": negative}
    warmup = max(0, min(int(warmup_steps), int(steps)))
    runs = max(1, int(timed_runs))
    progress = _Progress(2 * (warmup + runs * int(steps)), node_id, model)

    exact = Runner(exact_model, latent, settings, progress)
    sage = Runner(sage_model, latent, settings, progress)
    # Both warm-ups first, so the first timed run finds the device as warm as the last; then the timed runs
    # alternate exact and Sage, so clock or thermal drift does not favour one side.
    exact.warm_up(warmup)
    sage.warm_up(warmup)
    for _ in range(runs):
        exact.timed()
        sage.timed()
    exact_samples, sage_samples = exact.samples, sage.samples
    sage_override = sage.sage_override

    exact_images = decode(vae, exact_samples)
    sage_images = decode(vae, sage_samples)
    comparison = image_metrics.compare_images(exact_images, sage_images)
    latent_cos = image_metrics.cosine_similarity(exact_samples, sage_samples)

    cfg_used = config if config is not None else getattr(sage_override, "config", None)
    labels = {"exact": "Exact (ComfyUI attention)", "sage": describe_config(cfg_used)}
    sbs = report_images.side_by_side(exact_images, sage_images, labels["exact"], labels["sage"])
    heat, gain = report_images.heat_map(exact_images, sage_images, heat_gain)

    device = exact_model.load_device
    dev_type = torch.device(device).type
    timing_note = (f"{warmup} untimed warm-up step(s) of the same schedule for each side before any timed run; "
                   + (f"median of {runs} alternating timed runs per side; " if runs > 1 else "")
                   + ("times taken after torch.cuda.synchronize, attention timed with CUDA events"
                      if dev_type == "cuda" else "wall-clock times (the CPU runs synchronously)")
                   + "; decoding not timed")
    report = {
        "node": node_id,
        "labels": labels,
        "settings": {"kernel": cfg_used.kernel if cfg_used is not None else FROM_MODEL,
                     "config": _config_dict(cfg_used), "exact_blocks": exact_blocks if config is not None else None,
                     "from_model": config is None},
        "sampler": {k: settings[k] for k in ("seed", "steps", "cfg", "sampler_name", "scheduler", "denoise")},
        "device": str(device),
        "synchronized": dev_type == "cuda",
        "warmup_steps": warmup,
        "timed_runs": runs,
        "timing_note": timing_note,
        "exact": exact.figures(),
        "sage": {**sage.figures(), "counters": sage.counters},
        "psnr": comparison.psnr,
        "ssim": comparison.ssim,
        "max_abs_diff": comparison.max_abs_diff,
        "max_diff_8bit": comparison.max_diff_8bit,
        "frames": [f.__dict__ for f in comparison.frames],
        "latent_cosine": latent_cos,
        "heat_gain": gain,
        "image_shape": list(exact_images.shape),
    }
    report["speedup"] = _ratio(report["exact"]["sampling_s"], report["sage"]["sampling_s"])
    report["attention_speedup"] = _ratio(report["exact"]["attention_s"], report["sage"]["attention_s"])
    text = format_report(report)
    payload = json_safe(report)
    if save_previews:
        frames = _preview_frames(exact_images.shape[0])
        payload["images"] = {"exact": _save_previews(exact_images, "sage_compare_exact", frames),
                             "sage": _save_previews(sage_images, "sage_compare_sage", frames), "frames": frames}
    payload["text"] = text
    json.dumps(payload)  # fail here, not in the websocket, if something is not JSON
    return {"exact": exact_images, "sage": sage_images, "side_by_side": sbs, "heat_map": heat, "text": text,
            "report": report, "payload": payload, "exact_samples": exact_samples, "sage_samples": sage_samples}


def _config_dict(config: SageConfig | None):
    if config is None:
        return None
    from dataclasses import asdict

    return asdict(config)
