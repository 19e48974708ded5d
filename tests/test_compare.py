"""Sage Attention Compare: helpers, report images, and the node inside a real ComfyUI (CPU)."""
from __future__ import annotations

import math
import os

import pytest
import torch

import comfy_harness as harness

COMPARE_ID = "20"
STEPS = 3
WARMUP = 1
FAMILY = "sd3"  # two attention calls per forward: cheap enough for Triton's interpreter
CALLS_PER_FORWARD = harness.ATTENTION_CALLS_PER_RUN[FAMILY] // 4
# On a CPU the kernels run only through Triton's interpreter; otherwise every Sage call falls back to ComfyUI's
# attention (counted), and both outputs are identical.
KERNELS_RUN = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
needs_kernels = pytest.mark.skipif(not KERNELS_RUN, reason="no GPU and TRITON_INTERPRET is not 1: the kernels "
                                   "cannot run here")


# ---------------------------------------------------------------------------------------------------------------
# Report images (no ComfyUI needed)


def _report_images():
    from sage_attention_pack.nodes import report_images

    return report_images


def test_side_by_side_layout_and_labels():
    ri = _report_images()
    a = torch.zeros(2, 40, 50, 3)
    b = torch.ones(2, 40, 50, 3)
    out = ri.side_by_side(a, b, "Exact", "Sage", gap=4)
    assert out.shape[0] == 2 and out.shape[2] == 104 and out.shape[3] == 3
    bar = out.shape[1] - 40
    assert bar > 0
    # the images sit under the label bar, unchanged
    assert torch.equal(out[:, bar:, :50], a) and torch.equal(out[:, bar:, 54:], b)
    # the labels are drawn (the bar is not one flat colour), over each column
    left_bar, right_bar = out[0, :bar, :50], out[0, :bar, 54:]
    assert left_bar.std() > 0.01 and right_bar.std() > 0.01
    assert out.dtype == torch.float32 and 0.0 <= float(out.min()) and float(out.max()) <= 1.0


def test_side_by_side_grey_and_alpha_inputs():
    ri = _report_images()
    grey = torch.rand(1, 16, 16, 1)
    rgba = torch.rand(1, 16, 16, 4)
    assert ri.side_by_side(grey, grey, "a", "b").shape[-1] == 3
    assert ri.side_by_side(rgba, rgba, "a", "b").shape[-1] == 3
    with pytest.raises(ValueError):
        ri.side_by_side(torch.rand(1, 8, 8, 3), torch.rand(1, 8, 9, 3), "a", "b")


def test_heat_map_zero_when_identical_and_gain():
    ri = _report_images()
    a = torch.rand(3, 12, 10, 3, generator=torch.Generator().manual_seed(0))
    heat, gain = ri.heat_map(a, a.clone(), 10.0)
    assert heat.shape == (3, 12, 10, 3) and gain == 10.0
    assert torch.count_nonzero(heat) == 0
    b = a.clone()
    b[1, 5, 5, 2] += 0.05
    heat, _ = ri.heat_map(a, b, 10.0)
    assert torch.count_nonzero(heat[0]) == 0 and torch.count_nonzero(heat[2]) == 0
    assert torch.count_nonzero(heat[1].abs().sum(-1)) == 1  # exactly one pixel lit
    assert 0.2 < float(heat[1, 5, 5].mean()) < 1.0  # 0.05 x 10 = half way: coloured, not saturated
    # auto gain: the largest difference maps to white
    heat, gain = ri.heat_map(a, b, 0.0)
    assert gain == pytest.approx(1 / 0.05, rel=1e-3)
    assert torch.allclose(heat[1, 5, 5], torch.ones(3), atol=1e-3)
    # saturation: a large difference with a large gain is white
    heat, _ = ri.heat_map(a, b, 1000.0)
    assert torch.allclose(heat[1, 5, 5], torch.ones(3))


def test_colormap_is_monotonic_in_brightness():
    ri = _report_images()
    v = torch.linspace(0, 1, 101)
    rgb = ri._colormap(v)
    assert torch.equal(rgb[0], torch.zeros(3))
    lum = rgb @ torch.tensor([0.2126, 0.7152, 0.0722])
    assert bool((lum[1:] >= lum[:-1] - 1e-6).all())


def test_probe_plot_renders():
    ri = _report_images()
    rows = [{"block": i // 2, "kind": "self" if i % 2 == 0 else "cross", "rel_l1": 0.001 * (i + 1), "cosine": 0.999,
             "sage_ms": 1.0 + i, "exact_ms": 2.0} for i in range(12)]
    img = ri.probe_plot(rows, worst_blocks=[5])
    assert img.ndim == 4 and img.shape[0] == 1 and img.shape[-1] == 3 and img.shape[2] >= 900
    empty = ri.probe_plot([])
    assert empty.shape[0] == 1


# ---------------------------------------------------------------------------------------------------------------
# Helpers that import ComfyUI


@pytest.fixture(scope="module")
def compare_mod(comfyui):
    from sage_attention_pack.nodes import compare

    return compare


def test_json_safe_and_ratio(compare_mod):
    c = compare_mod
    assert c.json_safe({"a": math.inf, "b": [-math.inf, math.nan, 1.5], "c": {"d": 2}}) == {
        "a": "inf", "b": ["-inf", "nan", 1.5], "c": {"d": 2}}
    assert c._ratio(2.0, 1.0) == 2.0 and math.isnan(c._ratio(1.0, 0.0))


def test_attention_timer_chains_and_counts(compare_mod):
    calls = []

    def func(q, k, v, heads, **kw):
        calls.append("func")
        return q + 1

    class Prev:
        previous = None

        def __call__(self, f, *args, **kwargs):
            calls.append("prev")
            return f(*args, **kwargs) * 2

    t = compare_mod.AttentionTimer(Prev())
    x = torch.zeros(2)
    assert torch.equal(t(func, x, x, x, 1), torch.full((2,), 2.0))
    assert calls == ["prev", "func"] and t.calls == 1 and t.total_seconds() >= 0.0
    t.enabled = False
    t(func, x, x, x, 1)
    assert t.calls == 1
    t.reset()
    assert t.calls == 0 and t.total_seconds() == 0.0
    bare = compare_mod.AttentionTimer(None)
    assert torch.equal(bare(func, x, x, x, 1), torch.ones(2))


def test_format_report_mentions_every_figure(compare_mod):
    r = {
        "labels": {"exact": "Exact", "sage": "Sage int8_fp16"},
        "sampler": {"seed": 1, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
                    "denoise": 1.0},
        "device": "cpu", "timing_note": "note",
        "exact": {"sampling_s": 2.0, "attention_s": 1.0, "attention_calls": 8},
        "sage": {"sampling_s": 1.0, "attention_s": 0.25, "attention_calls": 8,
                 "counters": {"sage": {"int8_fp16": 6}, "exact": {"block kept exact": 2}, "fallback": {},
                              "recomputed": 0, "total": 8}},
        "speedup": 2.0, "attention_speedup": 4.0, "psnr": math.inf, "ssim": 1.0, "max_abs_diff": 0.0,
        "max_diff_8bit": 0, "latent_cosine": 1.0,
        "frames": [{"frame": 0, "psnr": math.inf, "ssim": 1.0, "max_abs_diff": 0.0, "max_diff_8bit": 0},
                   {"frame": 1, "psnr": 40.0, "ssim": 0.99, "max_abs_diff": 0.01, "max_diff_8bit": 3}],
    }
    text = compare_mod.format_report(r)
    for needle in ("2.000 s", "1.000 s", "2.00x", "4.00x", "inf dB", "int8_fp16 6", "block kept exact: 2",
                   "latent cosine similarity 1.0000000", "per frame", "40.00 dB", "3/255"):
        assert needle in text, needle
    assert "rotary" not in text  # no model rotated inside the quantization: nothing said of it
    r["sage"]["counters"]["rotary_fused"] = 3
    assert "rotary embedding inside the quantization: 3" in compare_mod.format_report(r)


# ---------------------------------------------------------------------------------------------------------------
# The node inside ComfyUI


def compare_prompt(family, models, *, kernel="int8_fp16", patch=None, steps=STEPS, warmup=WARMUP, seed=7,
                   frames=5, exact_blocks="", heat_gain=10.0, timed_runs=None):
    """Loaders and encoders from the harness workflow, KSampler/VAEDecode replaced by the Compare node."""
    p = harness.workflow_api(family, models, model_patch=patch, steps=steps, output=None, frames=frames)
    ks = p.pop(harness.NODE_IDS["sampler"])
    dec = p.pop(harness.NODE_IDS["decode"])
    i = ks["inputs"]
    p[COMPARE_ID] = {"class_type": "SageAttentionCompare", "inputs": {
        "model": i["model"], "positive": i["positive"], "negative": i["negative"], "latent_image": i["latent_image"],
        "vae": dec["inputs"]["vae"], "seed": seed, "steps": steps, "cfg": i["cfg"], "sampler_name": i["sampler_name"],
        "scheduler": i["scheduler"], "denoise": 1.0, "kernel": kernel, "smooth_k": True, "smooth_v": False,
        "qk_granularity": "per_warp", "quant_block": "128", "exact_blocks": exact_blocks, "warmup_steps": warmup,
        "heat_gain": heat_gain}}
    if timed_runs is not None:
        p[COMPARE_ID]["inputs"]["timed_runs"] = timed_runs
    return p


def sage_patch(kernel="int8_fp16", exact_blocks=""):
    return ("SageAttention", {"kernel": kernel, "smooth_k": True, "smooth_v": False, "qk_granularity": "per_warp",
                              "quant_block": "128", "exact_blocks": exact_blocks, "start_percent": 0.0,
                              "end_percent": 1.0, "on_unsupported": "fallback"})


def outputs(run):
    out = run.outputs[COMPARE_ID]
    return [o[0] if isinstance(o, list) and len(o) == 1 else o for o in out]


def payload(run):
    return run.ui[COMPARE_ID]["sage_compare"][0]


@pytest.fixture(scope="module")
def main_run(comfy_inprocess, small_models):
    return comfy_inprocess.run_prompt(compare_prompt(FAMILY, small_models, kernel="int8_fp16"), fresh=True)


def test_compare_returns_images_and_report(main_run):
    exact, sage, sbs, heat, text = outputs(main_run)
    assert exact.shape == sage.shape == harness.expected_image_shape(FAMILY)
    assert sbs.shape[0] == 1 and sbs.shape[2] == 2 * exact.shape[2] + 4 and sbs.shape[1] > exact.shape[1]
    assert heat.shape == exact.shape
    p = payload(main_run)
    assert 0.5 < p["ssim"] <= 1.0 and 0.99 < p["latent_cosine"] <= 1.0
    assert p["max_diff_8bit"] >= 0 and len(p["frames"]) == 1
    calls = CALLS_PER_FORWARD * STEPS
    assert p["exact"]["attention_calls"] == calls and p["sage"]["attention_calls"] == calls
    counters = p["sage"]["counters"]
    assert counters["total"] == calls
    assert sum(counters["sage"].values()) + sum(counters["fallback"].values()) == calls
    for k in ("sampling_s", "attention_s"):
        assert p["exact"][k] > 0 and p["sage"][k] > 0
    assert p["exact"]["attention_s"] < p["exact"]["sampling_s"]
    assert p["speedup"] == pytest.approx(p["exact"]["sampling_s"] / p["sage"]["sampling_s"])
    assert p["warmup_steps"] == WARMUP and "warm-up" in p["timing_note"]
    assert "PSNR" in text and "latent cosine similarity" in text
    # previews for the frontend, and the same payload over the websocket
    assert len(p["images"]["exact"]) == len(p["images"]["sage"]) == 1
    events = main_run.events("sage_attention.compare")
    assert events and events[-1]["psnr"] == p["psnr"] and events[-1]["node"] == COMPARE_ID
    if not KERNELS_RUN:  # every call fell back to ComfyUI's attention, and says why
        assert list(counters["fallback"]) and p["psnr"] == "inf"


@needs_kernels
def test_compare_sage_differs_measurably(main_run):
    p = payload(main_run)
    assert sum(p["sage"]["counters"]["sage"].values()) == CALLS_PER_FORWARD * STEPS
    assert isinstance(p["psnr"], float) and math.isfinite(p["psnr"]) and p["psnr"] > 25
    assert p["latent_cosine"] < 1.0
    exact, sage, _, heat, text = outputs(main_run)
    assert not torch.equal(exact, sage) and torch.count_nonzero(heat) > 0
    assert f"{p['psnr']:.2f} dB" in text


def test_compare_progress_covers_both_runs(main_run):
    total = 2 * (WARMUP + STEPS)
    prog = [d for d in main_run.events("progress") if d.get("node") == COMPARE_ID]
    values = [d["value"] for d in prog]
    assert prog and all(d["max"] == total for d in prog)
    assert values == sorted(values)
    assert WARMUP + STEPS in values and values[-1] == total  # end of the exact run, end of the Sage run


def test_compare_off_is_identical(comfy_inprocess, small_models):
    run = comfy_inprocess.run_prompt(compare_prompt(FAMILY, small_models, kernel="off", seed=3))
    exact, sage, _, heat, text = outputs(run)
    assert torch.equal(exact, sage)
    assert torch.count_nonzero(heat) == 0
    p = payload(run)
    assert p["psnr"] == "inf" and p["max_diff_8bit"] == 0 and p["max_abs_diff"] == 0.0
    assert p["latent_cosine"] == 1.0 and p["ssim"] == pytest.approx(1.0)
    assert p["sage"]["counters"]["exact"] == {"kernel off": p["sage"]["attention_calls"]}
    assert "inf dB" in text


def test_compare_alternating_timed_runs_report_the_median(comfy_inprocess, small_models):
    run = comfy_inprocess.run_prompt(compare_prompt(FAMILY, small_models, kernel="off", seed=13, timed_runs=3))
    p = payload(run)
    assert p["timed_runs"] == 3 and "median of 3 alternating timed runs" in p["timing_note"]
    for side in ("exact", "sage"):
        runs = p[side]["sampling_runs_s"]
        assert len(runs) == 3 and p[side]["sampling_s"] == sorted(runs)[1]
        assert p[side]["attention_s"] == sorted(p[side]["attention_runs_s"])[1]
        assert p[side]["attention_calls"] == CALLS_PER_FORWARD * STEPS  # per run, not summed
    assert p["speedup"] == pytest.approx(p["exact"]["sampling_s"] / p["sage"]["sampling_s"])
    assert p["sage"]["counters"]["total"] == CALLS_PER_FORWARD * STEPS  # the last run's counters
    prog = [d for d in run.events("progress") if d.get("node") == COMPARE_ID]
    assert prog[-1]["value"] == prog[-1]["max"] == 2 * (WARMUP + 3 * STEPS)


def test_compare_from_model_uses_the_patch(comfy_inprocess, small_models):
    run = comfy_inprocess.run_prompt(compare_prompt(
        FAMILY, small_models, kernel="from model", patch=sage_patch("int8_fp16", exact_blocks="0"), seed=5))
    p = payload(run)
    assert p["settings"]["from_model"] is True and p["settings"]["kernel"] == "int8_fp16"
    counters = p["sage"]["counters"]
    # block 0 of every forward stays exact (the first joint-attention block)
    assert counters["exact"] == {"block kept exact": STEPS}
    assert counters["total"] == CALLS_PER_FORWARD * STEPS
    assert p["psnr"] == "inf" or math.isfinite(p["psnr"])
    # the exact run used ComfyUI's attention, not the patch
    assert p["exact"]["attention_calls"] == CALLS_PER_FORWARD * STEPS
    # the patch node reported its own counters (its id) for the Sage run
    stats = [d for d in run.events("sage_attention.stats") if d.get("node") == harness.NODE_IDS["patch"]]
    assert stats and stats[-1]["exact"] == counters["exact"]


def test_compare_from_model_without_patch_fails_clearly(comfy_inprocess, small_models):
    run = comfy_inprocess.run_prompt(compare_prompt(FAMILY, small_models, kernel="from model", seed=9),
                                     raise_on_error=False)
    assert not run.success
    assert "carries no Sage patch" in (run.error or {}).get("exception_message", "")


def test_compare_patched_input_still_runs_exact(comfy_inprocess, small_models):
    """A model patched by the Sage node, compared with kernel 'off': the exact run removed the patch."""
    run = comfy_inprocess.run_prompt(compare_prompt(FAMILY, small_models, kernel="off",
                                                    patch=sage_patch("int8_fp16"), seed=11))
    exact, sage, *_ = outputs(run)
    assert torch.equal(exact, sage)
    p = payload(run)
    assert p["sage"]["counters"]["exact"] == {"kernel off": CALLS_PER_FORWARD * STEPS}


def test_compare_video_reports_per_frame(comfy_inprocess, small_models):
    run = comfy_inprocess.run_prompt(compare_prompt("wan", small_models, kernel="int8_fp16", steps=2, frames=5))
    exact, sage, sbs, heat, text = outputs(run)
    n = harness.expected_image_shape("wan", frames=5)[0]
    assert exact.shape[0] == n and sbs.shape[0] == n and heat.shape[0] == n
    p = payload(run)
    assert [f["frame"] for f in p["frames"]] == list(range(n))
    assert all(isinstance(f["psnr"], float) or f["psnr"] == "inf" for f in p["frames"])
    assert len(p["images"]["exact"]) == n and p["images"]["frames"] == list(range(n))
    assert "per frame" in text
