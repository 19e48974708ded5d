"""The "Sage Attention" node: route a model's attention through the bundled kernels.

It clones the model and sets ComfyUI's per-model hook, transformer_options["optimized_attention_override"], to a
SageOverride that keeps whatever override was there before (so other nodes chain), and installs the rotary hand-off
(nodes/rotary_handoff.py) through which Flux-family, Wan, Qwen-Image, Lumina 2, LTX-Video and HiDream calls give the
override Q and K before their rotation. Two keyed wrappers come with it: APPLY_MODEL puts a fresh call counter into
each forward (block numbering, step gating) and OUTER_SAMPLE resets and then reports the counters once per sampling
run.
"""
from __future__ import annotations

import logging

import comfy.patcher_extension as pe
from comfy_api.latest import io

from ..sage_core import backend
from ..sage_core.config import GRANULARITIES, KERNELS, SageConfig
from . import rotary_handoff, routing
from .frontend import send_to_frontend
from .override import OVERRIDE_KEY, SageOverride

log = logging.getLogger("sage_attention_pack")
WRAPPER_KEY = "sage_attention_pack"
STATS_EVENT = "sage_attention.stats"
__all__ = ["SageAttention", "SageOverride", "SageConfig", "apply_sage", "remove_sage", "get_sage_override", "report"]


def _apply_model_wrapper(executor, *args, **kwargs):
    """Per forward: a fresh call counter, and whether this step is inside the Sage step range."""
    override = _find_override(args, kwargs)
    options = _transformer_options(args, kwargs)
    if override is not None and options is not None:
        counter = routing.ForwardCounter()
        t = args[1] if len(args) > 1 else kwargs.get("t")
        counter.steps_active = routing.sigma_in_range(t, override.sigma_start, override.sigma_end)
        options[routing.ForwardCounter.KEY] = counter
    return executor(*args, **kwargs)


def _transformer_options(args, kwargs):
    # apply_model(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    if "transformer_options" in kwargs:
        return kwargs["transformer_options"]
    return args[5] if len(args) > 5 else None


def _find_override(args, kwargs):
    options = _transformer_options(args, kwargs) or {}
    override = options.get(OVERRIDE_KEY)
    while override is not None and not isinstance(override, SageOverride):
        override = getattr(override, "previous", None)
    return override


def _make_outer_sample_wrapper(override: SageOverride):
    def outer_sample(executor, *args, **kwargs):
        override.stats.reset()
        try:
            return executor(*args, **kwargs)
        finally:
            release_buffers()
            report(override)
    return outer_sample


def release_buffers() -> None:
    """The kernels' buffers kept for the run's repeated calls go back to PyTorch's allocator once it ends."""
    try:
        backend.release_buffers()
    except Exception:  # a render never fails on its cleanup
        log.debug("Sage Attention: kept buffers not released", exc_info=True)


def report(override: SageOverride) -> dict:
    """Log the run's counters once and send them to the frontend."""
    snap = override.stats.snapshot()
    snap["node"] = override.node_id
    snap["kernel"] = override.config.kernel
    parts = [f"{n} {k}" for k, n in snap["sage"].items()] + [f"{n} exact ({k})" for k, n in snap["exact"].items()]
    parts += [f"{n} fallback ({k})" for k, n in snap["fallback"].items()]
    if snap["recomputed"]:
        parts.append(f"{snap['recomputed']} recomputed exactly (non-finite output)")
    if snap["rotary_fused"]:
        parts.append(f"rotary embedding applied inside the quantization in {snap['rotary_fused']}")
    log.info("Sage Attention: %d attention calls: %s", snap["total"], "; ".join(parts) or "none")
    try:
        send_to_frontend(STATS_EVENT, snap)
    except Exception:  # a render never fails on its report: the log line above is the report then
        log.debug("Sage Attention: counters not sent to the frontend", exc_info=True)
    return snap


def apply_sage(model, config: SageConfig, exact_blocks: str = "", start_percent: float = 0.0,
               end_percent: float = 1.0, node_id=None):
    """A clone of `model` whose attention runs through Sage; the input model is left untouched."""
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"step range must satisfy 0 <= start_percent <= end_percent <= 1, got "
                         f"{start_percent} and {end_percent}")
    blocks = routing.parse_blocks(exact_blocks)
    m = remove_sage(model)
    sigma_start, sigma_end = float("inf"), 0.0
    if start_percent > 0.0 or end_percent < 1.0:
        sampling = m.get_model_object("model_sampling")
        sigma_start = float(sampling.percent_to_sigma(start_percent)) if start_percent > 0.0 else float("inf")
        sigma_end = float(sampling.percent_to_sigma(end_percent)) if end_percent < 1.0 else 0.0
    options = m.model_options.setdefault("transformer_options", {})
    override = SageOverride(config, blocks, sigma_start, sigma_end, options.get(OVERRIDE_KEY), node_id)
    options[OVERRIDE_KEY] = override
    m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, WRAPPER_KEY, _apply_model_wrapper)
    m.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, _make_outer_sample_wrapper(override))
    rotary_handoff.install()  # the models of nodes/rotary_handoff.py then hand over their rotation
    return m


def remove_sage(model):
    """A clone of `model` with our override and wrappers gone and any earlier override restored."""
    m = model.clone()
    options = m.model_options.setdefault("transformer_options", {})
    override = options.get(OVERRIDE_KEY)
    if isinstance(override, SageOverride):
        if override.previous is None:
            del options[OVERRIDE_KEY]
        else:
            options[OVERRIDE_KEY] = override.previous
    for kind in (pe.WrappersMP.APPLY_MODEL, pe.WrappersMP.OUTER_SAMPLE):
        m.remove_wrappers_with_key(kind, WRAPPER_KEY)
    return m


def get_sage_override(model) -> SageOverride | None:
    override = model.model_options.get("transformer_options", {}).get(OVERRIDE_KEY)
    return override if isinstance(override, SageOverride) else None


class SageAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SageAttention",
            display_name="Sage Attention",
            category="model_patches/sage_attention",
            description="Runs the model's attention with 8-bit SageAttention kernels (INT8 Q·Kᵀ, FP16 or FP8 P·V). "
                        "Calls the kernels cannot serve fall back to ComfyUI's attention and are counted.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("kernel", options=list(KERNELS), default="auto",
                               tooltip="auto: fastest measured for this GPU and shape (exact attention where that "
                                       "wins); int8_fp16 / int8_fp8: the P·V precision; off: exact attention (A/B)"),
                io.Boolean.Input("smooth_k", default=True, tooltip="subtract K's channel mean before quantizing"),
                io.Boolean.Input("smooth_v", default=False, tooltip="subtract V's channel mean (for FP8 P·V)"),
                io.Combo.Input("qk_granularity", options=list(GRANULARITIES), default="per_warp",
                               tooltip="rows sharing one INT8 scale: a quant block, 16 rows, or each token"),
                io.Combo.Input("quant_block", options=["128", "64"], default="128",
                               tooltip="tokens per Q quantization block and Q tile"),
                io.String.Input("exact_blocks", default="", tooltip="blocks kept in exact attention, e.g. 0-3, 36-39"),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Sage runs from this point of the schedule..."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="...to this one; exact attention outside"),
                io.Combo.Input("on_unsupported", options=["fallback", "raise"], default="fallback",
                               tooltip="what a call the kernels cannot serve does"),
            ],
            outputs=[io.Model.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, exact_blocks="", start_percent=0.0, end_percent=1.0, **kwargs):
        try:
            routing.parse_blocks(exact_blocks)
        except ValueError as e:
            return str(e)
        if start_percent > end_percent:
            return f"start_percent ({start_percent}) is after end_percent ({end_percent})"
        return True

    @classmethod
    def execute(cls, model, kernel, smooth_k, smooth_v, qk_granularity, quant_block, exact_blocks, start_percent,
                end_percent, on_unsupported) -> io.NodeOutput:
        config = SageConfig(kernel=kernel, smooth_k=smooth_k, smooth_v=smooth_v, qk_granularity=qk_granularity,
                            quant_block=int(quant_block), on_unsupported=on_unsupported)
        patched = apply_sage(model, config, exact_blocks, start_percent, end_percent, node_id=cls.hidden.unique_id)
        return io.NodeOutput(patched)
