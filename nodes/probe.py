"""Sage Attention Probe: one denoising step, every attention call measured against exact attention.

For each call of the step the probe runs ComfyUI's attention (the exact reference, whose output the model
keeps using, so errors do not compound) and Sage with the chosen settings, both twice: the first run of each
is an untimed warm-up (kernel compilation, autotuning, allocator), the second is timed, with the device
synchronised before and after on a GPU. It records the block (numbered as the patch node numbers blocks for
its exact_blocks input), the call's index in its block, self or cross attention, the shape, what served the
Sage run (a kernel variant, or the fallback and its reason) and the error (cosine similarity, relative L1,
RMSE). The blocks with the worst error make the suggested exact_blocks list.
"""
from __future__ import annotations

import math
import time

import torch
from comfy_api.latest import io

from ..sage_core.dispatch import DispatchStats, UnsupportedInput
from ..sage_core.metrics import attention_error
from . import comfy_attention, report_images, routing
from .compare import (CATEGORY, FROM_MODEL, config_from_inputs, find_override, find_sage_override,
                      install_override, json_safe, sage_settings_inputs, synchronize,
                      without_sage)
from .frontend import send_to_frontend

EVENT = "sage_attention.probe"


def _timed(fn, device):
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, (time.perf_counter() - t0) * 1000.0


class ProbeOverride:
    """Attention override that measures each call (Sage against exact) and returns the exact output.

    ``previous`` is the Sage override of the probe model: the patch's per-forward wrapper finds it through this
    attribute and gives each forward its call counter, which numbers blocks here exactly as the patch does.
    """

    def __init__(self, previous, config):
        self.previous = previous
        self.config = config
        self.rows: list[dict] = []
        self._forwards: list = []  # one call counter per model forward, in order

    def _forward_index(self, counter) -> int:
        for i, c in enumerate(self._forwards):
            if c is counter:
                return i
        self._forwards.append(counter)
        return len(self._forwards) - 1

    def _exact(self, func, args, kwargs):
        return self.previous.exact(func, args, kwargs)

    def __call__(self, func, *args, **kwargs):
        from .override import run_sage

        call = comfy_attention.parse(args, kwargs)
        counter = routing.forward_counter(call.transformer_options)
        is_self = call.is_self_attention
        block, index = counter.next_call(is_self)
        layer = index - self._first_call_of_block(counter, block, index)
        device = call.q.device

        self._exact(func, args, kwargs)  # warm-up
        ref, exact_ms = _timed(lambda: self._exact(func, args, kwargs), device)

        served = ""
        stats = DispatchStats()
        try:
            run_sage(call, self.config, DispatchStats())  # warm-up (compiles and autotunes this shape)
            out, sage_ms = _timed(lambda: call.finish(run_sage(call, self.config, stats)), device)
            snap = stats.snapshot()
            served = next(iter(snap["sage"]), None) or next(iter(snap["exact"]), None) or "sage"
        except UnsupportedInput as e:
            served = f"fallback: {str(e).split(': ', 1)[-1]}"
            out, sage_ms = ref, exact_ms
        except (ValueError, TypeError):
            raise  # malformed input: a bug to surface
        except Exception as e:  # a kernel failure: the patch node falls back for it, so the probe reports it
            served = f"fallback: kernel error: {type(e).__name__}"
            out, sage_ms = ref, exact_ms

        err = attention_error(out, ref)
        b, h, nq, d = (call.q.shape if call.layout == "HND" else call.q.transpose(1, 2).shape)
        nk = call.k.shape[2] if call.layout == "HND" else call.k.shape[1]
        self.rows.append({
            "call": len(self.rows),
            "forward": self._forward_index(counter),
            "block": block,
            "layer": layer,
            "kind": "self" if is_self else "cross",
            "shape": [int(b), int(h), int(nq), int(nk), int(d)],
            "served": served,
            "cosine": err["cosine"],
            "rel_l1": err["rel_l1"],
            "rmse": err["rmse"],
            "exact_ms": exact_ms,
            "sage_ms": sage_ms,
        })
        return ref

    @staticmethod
    def _first_call_of_block(counter, block, index):
        starts = counter.__dict__.setdefault("probe_block_starts", {})
        return starts.setdefault(block, index)


def worst_blocks(rows: list[dict], keep: int, limit: float = 0.0) -> list[int]:
    """Blocks to keep exact: the ``keep`` blocks with the largest relative L1 error of any of their calls, and
    every block whose worst call exceeds ``limit`` (when ``limit`` > 0). Blocks whose calls are all exact
    already (error 0) are never suggested."""
    worst: dict[int, float] = {}
    for r in rows:
        e = r["rel_l1"] if math.isfinite(r["rel_l1"]) else math.inf
        worst[r["block"]] = max(worst.get(r["block"], 0.0), e)
    ranked = sorted((b for b, e in worst.items() if e > 0), key=lambda b: (-worst[b], b))
    chosen = set(ranked[:max(0, keep)])
    if limit > 0:
        chosen.update(b for b, e in worst.items() if e > limit)
    return sorted(chosen)


def format_table(rows: list[dict], suggestion: str, header: str) -> str:
    lines = [header,
             f"{'call':>4} {'block':>5} {'layer':>5} {'kind':<5} {'shape B,H,Nq,Nk,D':<24} {'cosine':>10} "
             f"{'rel L1':>9} {'exact ms':>9} {'sage ms':>9}  served"]
    for r in rows:
        shape = ",".join(str(x) for x in r["shape"])
        lines.append(f"{r['call']:>4} {r['block']:>5} {r['layer']:>5} {r['kind']:<5} {shape:<24} "
                     f"{r['cosine']:>10.7f} {r['rel_l1']:>9.2e} {r['exact_ms']:>9.3f} {r['sage_ms']:>9.3f}  "
                     f"{r['served']}")
    if rows:
        total_e = sum(r["exact_ms"] for r in rows)
        total_s = sum(r["sage_ms"] for r in rows)
        lines.append(f"{len(rows)} calls; attention time exact {total_e:.2f} ms, Sage {total_s:.2f} ms; "
                     f"worst rel L1 {max(r['rel_l1'] for r in rows):.2e}, "
                     f"lowest cosine {min(r['cosine'] for r in rows):.7f}")
    lines.append(f"suggested exact_blocks: {suggestion or '(none)'}")
    return "\n".join(lines)


def run_probe(model, positive, negative, latent, *, seed, steps, cfg, scheduler, denoise, step, config,
              keep_exact=2, error_limit=0.0, node_id=None) -> dict:
    """One denoising step (step ``step`` of the schedule, euler) with every attention call probed."""
    import comfy.sample
    import comfy.utils

    from .patch import apply_sage

    if config is None:
        sage = find_sage_override(find_override(model))
        if sage is None:
            raise ValueError("kernel is 'from model' but the model carries no Sage patch: connect the model "
                             "through the Sage Attention node, or pick a kernel here")
        config = sage.config
    # Sage everywhere (no block list, no step range), chained after whatever override the model had before.
    probe_model = apply_sage(without_sage(model), config)
    probe_model, probe = install_override(probe_model, lambda prev: ProbeOverride(prev, config))

    steps = int(steps)
    step = max(0, min(int(step), steps - 1))
    latent_image = comfy.sample.fix_empty_latent_channels(probe_model, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, int(seed), latent.get("batch_index"))
    pbar = comfy.utils.ProgressBar(1, node_id=node_id)
    with torch.no_grad():
        comfy.sample.sample(probe_model, noise, steps, float(cfg), "euler", scheduler, positive, negative,
                            latent_image, denoise=float(denoise), start_step=step, last_step=step + 1,
                            force_full_denoise=False, noise_mask=latent.get("noise_mask"), disable_pbar=True,
                            seed=int(seed))
    pbar.update_absolute(1, 1)

    rows = probe.rows
    blocks = worst_blocks(rows, int(keep_exact), float(error_limit))
    suggestion = routing.format_blocks(blocks)
    header = (f"Sage Attention Probe: {config.kernel}, {config.qk_granularity}, block {config.quant_block}"
              f"{', smooth K' if config.smooth_k else ''}{', smooth V' if config.smooth_v else ''}; "
              f"step {step} of {steps} ({scheduler}), cfg {cfg}, seed {seed}, on {probe_model.load_device}; "
              "each call timed after one untimed run of it")
    table = format_table(rows, suggestion, header)
    plot = report_images.probe_plot(
        [{**r, "block": r["block"]} for r in rows],
        title=f"Sage attention probe: {config.kernel}, step {step}/{steps}", worst_blocks=blocks)
    return {"rows": rows, "blocks": blocks, "suggestion": suggestion, "table": table, "plot": plot,
            "config": config}


class SageAttentionProbe(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import comfy.samplers

        return io.Schema(
            node_id="SageAttentionProbe",
            display_name="Sage Attention Probe",
            category=CATEGORY,
            description="Runs one denoising step and measures every attention call: the error of Sage against "
                        "exact attention (cosine, relative L1) and the time of each. Suggests blocks to keep "
                        "exact in the Sage Attention node.",
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Length of the schedule."),
                io.Int.Input("step", default=0, min=0, max=10000,
                             tooltip="Which step of the schedule to probe (0: the first, noisiest)."),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01),
                *sage_settings_inputs(),
                io.Int.Input("keep_exact", default=2, min=0, max=1000,
                             tooltip="How many of the worst blocks to suggest keeping exact."),
                io.Float.Input("error_limit", default=0.0, min=0.0, max=10.0, step=0.001,
                               tooltip="Also suggest every block whose worst relative L1 error exceeds this "
                                       "(0: off)."),
            ],
            outputs=[
                io.String.Output("table"),
                io.Image.Output("plot"),
                io.String.Output("exact_blocks", tooltip="Suggested exact_blocks for the Sage Attention node."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, step, cfg, scheduler, denoise, kernel,
                smooth_k, smooth_v, qk_granularity, quant_block, keep_exact=2, error_limit=0.0) -> io.NodeOutput:
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        config = config_from_inputs(kernel, smooth_k, smooth_v, qk_granularity, quant_block)
        r = run_probe(model, positive, negative, latent_image, seed=seed, steps=steps, cfg=cfg, scheduler=scheduler,
                      denoise=denoise, step=step, config=config, keep_exact=keep_exact, error_limit=error_limit,
                      node_id=node_id)
        payload = json_safe({"node": node_id, "rows": r["rows"], "exact_blocks": r["suggestion"],
                             "kernel": r["config"].kernel})
        send_to_frontend(EVENT, payload)
        return io.NodeOutput(r["table"], r["plot"], r["suggestion"],
                             ui={"text": [r["table"]], "sage_probe": [payload]})


__all__ = ["SageAttentionProbe", "run_probe", "worst_blocks", "ProbeOverride", "FROM_MODEL"]
