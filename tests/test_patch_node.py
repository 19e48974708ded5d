"""The "Sage Attention" node inside a real ComfyUI: small random-weight SD1.5 UNet, SD3 MMDiT and Wan2.1
DiT sample on the CPU with the real Triton kernels (through the interpreter)."""
import os
import sys

import pytest
import torch

from comfy_harness import ATTENTION_CALLS_PER_RUN, NODE_IDS, workflow_api

pytestmark = [pytest.mark.comfy,
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="TRITON_INTERPRET=1 is needed to run the kernels on the CPU")]
FAMILIES = ["sd15", "sd3", "wan"]
# Patched vs unpatched decoded images of the random-weight models (pixels in [0, 1]).
MIN_PSNR_DB = 30.0


def sage(**inputs):
    base = {"kernel": "int8_fp16", "smooth_k": True, "smooth_v": False, "qk_granularity": "per_warp",
            "quant_block": "128", "exact_blocks": "", "start_percent": 0.0, "end_percent": 1.0,
            "on_unsupported": "fallback"}
    base.update(inputs)
    return ("SageAttention", base)


def psnr(a, b):
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def stats_of(run):
    events = run.events("sage_attention.stats")
    assert len(events) == 1, f"one stats report per sampling run, got {len(events)}"
    return events[0]


def loaded_call_plans():
    """PLANS of every loaded copy of the pack's kernels (ComfyUI loads the pack under its folder's name)."""
    return [m.PLANS for name, m in list(sys.modules.items())
            if name.endswith("kernels.call_plan") and hasattr(m, "PLANS")]


@pytest.fixture(scope="module")
def unpatched(run_prompt, small_models):
    return {f: run_prompt(workflow_api(f, small_models, output="PreviewImage")).image() for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_attention_call_goes_through_sage_and_stays_close(family, run_prompt, small_models, unpatched):
    reused_before = {id(plans): plans.reused for plans in loaded_call_plans()}
    run = run_prompt(workflow_api(family, small_models, model_patch=sage(), output="PreviewImage"))
    # the run's repeated call shapes reused their kept buffers, and the run's end returned them (other copies of
    # the module, such as the one the kernel tests import, keep what their own calls left)
    used = [p for p in loaded_call_plans() if p.reused > reused_before.get(id(p), 0)]
    assert used and all(not p.plans and p.nbytes == 0 for p in used)
    stats = stats_of(run)
    assert stats["total"] == ATTENTION_CALLS_PER_RUN[family]
    assert stats["sage"] == {"int8_fp16": ATTENTION_CALLS_PER_RUN[family]}
    assert stats["fallback"] == {} and stats["exact"] == {}
    # Wan's self-attention calls (half of its calls: each block's cross-attention has no rotary embedding) hand
    # their rotation to the quantization (nodes/rotary_handoff.py); SD1.5 and SD3 have none
    assert stats["rotary_fused"] == (ATTENTION_CALLS_PER_RUN[family] // 2 if family == "wan" else 0)
    image = run.image()
    assert image.shape == unpatched[family].shape and torch.isfinite(image).all()
    assert psnr(image, unpatched[family]) >= MIN_PSNR_DB


@pytest.mark.parametrize("family", FAMILIES)
def test_kernel_off_is_bit_identical(family, run_prompt, small_models, unpatched):
    run = run_prompt(workflow_api(family, small_models, model_patch=sage(kernel="off"), output="PreviewImage"))
    assert torch.equal(run.image(), unpatched[family])
    assert stats_of(run)["exact"] == {"kernel off": ATTENTION_CALLS_PER_RUN[family]}


def test_fp8_pv_variant_runs_on_every_call(run_prompt, small_models, unpatched):
    run = run_prompt(workflow_api("sd3", small_models, model_patch=sage(kernel="int8_fp8", smooth_v=True),
                                  output="PreviewImage"))
    assert stats_of(run)["sage"] == {"int8_fp8": ATTENTION_CALLS_PER_RUN["sd3"]}
    assert psnr(run.image(), unpatched["sd3"]) >= MIN_PSNR_DB - 5


@pytest.mark.parametrize("family,blocks,exact_calls", [
    ("sd15", "0-1", 16),  # 4 transformer blocks × (self + cross) per forward, 4 forwards: blocks 0 and 1
    ("sd15", "3", 8),
    ("sd3", "1", 4),  # 2 joint blocks, one attention each
    ("wan", "0", 8),  # 1 block: its self and cross attention both stay exact
])
def test_exact_blocks_route_exactly_the_named_calls(family, blocks, exact_calls, run_prompt, small_models):
    run = run_prompt(workflow_api(family, small_models, model_patch=sage(exact_blocks=blocks), output="PreviewImage"))
    stats = stats_of(run)
    assert stats["exact"] == {"block kept exact": exact_calls}
    assert sum(stats["sage"].values()) == ATTENTION_CALLS_PER_RUN[family] - exact_calls


def test_step_range_routes_exactly_the_steps_inside(run_prompt, small_models, comfy_inprocess):
    import comfy.samplers
    import comfy.sd

    start, end, steps = 0.3, 0.8, 4
    # which of the 4 steps fall inside [0.3, 0.8] of the schedule, from ComfyUI's own model sampling
    unet = comfy.sd.load_diffusion_model(str(small_models.path("sd3", "unet")))
    ms = unet.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "simple", steps)[:-1]
    s_hi, s_lo = float(ms.percent_to_sigma(start)), float(ms.percent_to_sigma(end))
    inside = sum(1 for s in sigmas.tolist() if s_lo <= s <= s_hi)
    assert 0 < inside < steps  # the range really splits the schedule
    per_step = ATTENTION_CALLS_PER_RUN["sd3"] // steps
    prompt = workflow_api("sd3", small_models, model_patch=sage(start_percent=start, end_percent=end),
                          scheduler="simple", steps=steps, output="PreviewImage")
    stats = stats_of(run_prompt(prompt))
    assert sum(stats["sage"].values()) == inside * per_step
    assert stats["exact"] == {"outside step range": (steps - inside) * per_step}


def test_stacked_nodes_do_not_stack_and_unpatched_runs_stay_identical(run_prompt, small_models, unpatched):
    stacked = run_prompt(workflow_api("sd15", small_models, model_patch=[sage(kernel="int8_fp8"), sage()],
                                      output="PreviewImage"))
    single = run_prompt(workflow_api("sd15", small_models, model_patch=sage(), output="PreviewImage"))
    assert torch.equal(stacked.image(), single.image())  # the last node's settings, applied once
    assert stats_of(stacked)["sage"] == {"int8_fp16": ATTENTION_CALLS_PER_RUN["sd15"]}
    # after patched runs, the same graph without the node gives exactly what it gave before
    again = run_prompt(workflow_api("sd15", small_models, output="PreviewImage"))
    assert torch.equal(again.image(), unpatched["sd15"])
    assert again.events("sage_attention.stats") == []


def test_without_interpreter_falls_back_to_comfy_attention_and_says_why(run_prompt, small_models, unpatched,
                                                                           monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    run = run_prompt(workflow_api("wan", small_models, model_patch=sage(), output="PreviewImage"))
    stats = stats_of(run)
    assert list(stats["fallback"]) == ["CPU tensors (set TRITON_INTERPRET=1 to run the kernels through "
                                       "Triton's interpreter)"]
    assert stats["fallback"][list(stats["fallback"])[0]] == ATTENTION_CALLS_PER_RUN["wan"]
    assert torch.equal(run.image(), unpatched["wan"])  # the fallback is ComfyUI's own attention


def test_on_unsupported_raise_fails_the_prompt_with_the_reason(run_prompt, small_models, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(Exception, match="CPU tensors"):
        run_prompt(workflow_api("wan", small_models, model_patch=sage(on_unsupported="raise"),
                                output="PreviewImage"))


def test_bad_block_list_is_rejected_before_any_work(comfy_inprocess, small_models):
    prompt = workflow_api("sd15", small_models, model_patch=sage(exact_blocks="3-1"), output="PreviewImage")
    valid = comfy_inprocess.validate(prompt)
    assert not valid[0]
    assert "runs backwards" in str(valid)


def test_patch_leaves_input_model_untouched(comfy_inprocess, small_models):
    import comfy.sd

    from sage_attention_pack.nodes.patch import OVERRIDE_KEY, SageConfig, apply_sage, get_sage_override, remove_sage

    model = comfy.sd.load_diffusion_model(str(small_models.path("wan", "unet")))
    before = repr(model.model_options)
    patched = apply_sage(model, SageConfig(kernel="int8_fp16"), exact_blocks="0")
    assert get_sage_override(patched) is not None and get_sage_override(model) is None
    assert repr(model.model_options) == before
    restored = remove_sage(patched)
    assert OVERRIDE_KEY not in restored.model_options.get("transformer_options", {})
    assert not restored.get_wrappers("apply_model", "sage_attention_pack")


def test_override_chains_an_earlier_override(comfy_inprocess, small_models):
    import comfy.sd

    from sage_attention_pack.nodes.patch import OVERRIDE_KEY, SageConfig, apply_sage, remove_sage

    model = comfy.sd.load_diffusion_model(str(small_models.path("wan", "unet")))
    seen = []

    def other_override(func, *args, **kwargs):
        seen.append(1)
        return func(*args, **kwargs)

    model.model_options.setdefault("transformer_options", {})[OVERRIDE_KEY] = other_override
    patched = apply_sage(model, SageConfig(kernel="off"))
    q = torch.randn(1, 16, 2 * 64)
    out = patched.model_options["transformer_options"][OVERRIDE_KEY](
        lambda q, k, v, heads, **kw: q, q, q, q, 2, transformer_options={})
    assert seen == [1] and out is q  # "off" hands the call to the earlier override
    assert remove_sage(patched).model_options["transformer_options"][OVERRIDE_KEY] is other_override


def test_compiled_model_has_no_graph_break_on_sage(comfy_inprocess):
    from sage_attention_pack.nodes.patch import SageConfig, SageOverride

    override = SageOverride(SageConfig(kernel="int8_fp16"))

    def comfy_attention(q, k, v, heads, **kwargs):
        raise AssertionError("the exact path must not run")

    def block(x):
        return override(comfy_attention, x, x, x, 2, transformer_options={}) * 2

    x = torch.randn(1, 64, 2 * 64)
    explanation = torch._dynamo.explain(block)(x)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), block(x))


@pytest.mark.comfy_server
def test_sage_node_over_http(comfy_server, small_models):
    info = comfy_server.object_info("SageAttention")["SageAttention"]
    assert info["display_name"] == "Sage Attention"
    prompt = workflow_api("sd3", small_models, model_patch=sage(), filename_prefix="sage_http")
    entry = comfy_server.run(prompt)
    files = comfy_server.output_files(entry)
    assert files and all(f.exists() and f.stat().st_size > 0 for f in files)
    assert NODE_IDS["save"] in entry["outputs"]


@pytest.mark.comfy_server
def test_startup_logs_one_line_and_imports_fast(comfy_server):
    import re

    log = comfy_server.log_path.read_text(errors="replace")
    lines = [ln for ln in log.splitlines() if "Sage Attention Pack 0." in ln]
    assert len(lines) == 1, lines
    assert "device cpu" in lines[0] and "serving:" in lines[0]
    times = [float(m.group(1)) for m in re.finditer(r"^\s*([0-9.]+) seconds: .*sage-attention-pack\s*$", log, re.M)]
    assert times and times[-1] < 1.0  # ComfyUI's own import-time report for the pack


def test_with_comfy_torch_compile_node(run_prompt, small_models, unpatched):
    """ComfyUI's own TorchCompileModel node (inductor) after the Sage node: every call still served by the
    kernels through the custom op, no graph break attributed to it, and the image close to the unpatched run."""
    from torch._dynamo.utils import counters

    counters.clear()
    compile_node = ("TorchCompileModel", {"backend": "inductor"})
    run = run_prompt(workflow_api("wan", small_models, model_patch=[sage(), compile_node], output="PreviewImage"))
    assert stats_of(run)["sage"] == {"int8_fp16": ATTENTION_CALLS_PER_RUN["wan"]}
    breaks = [reason for reason in counters["graph_break"] if "sage" in reason.lower()]
    assert breaks == []
    assert psnr(run.image(), unpatched["wan"]) >= MIN_PSNR_DB


def carried_sites_modules():
    """Every loaded copy of the pack's kernels.carried_stats (ComfyUI loads the pack under its folder's name)."""
    return [m for name, m in list(sys.modules.items())
            if name.endswith("kernels.carried_stats") and hasattr(m, "SITES")]


@pytest.mark.parametrize("family,plain", [("wan", False), ("sd3", False), ("sd3", True), ("wan", True)])
def test_fp8_calls_carry_their_statistics_across_steps_and_runs_repeat(family, plain, run_prompt, small_models,
                                                                       unpatched, monkeypatch):
    """With FP8 P·V each attention call of a sampling run is a site (block, call, cond or uncond): its first step
    measures its statistics and every later step carries them from the step before (one quantization launch), with
    nothing repaired. As shipped only calls with the rotary table inside the quantization do (Wan's self-attention,
    half of its calls; carried_stats.ROTARY), calls without a table too where carried_stats.PLAIN is on. The run's
    end drops the sites, so the same prompt renders the same pixels again."""
    def api(blanks):  # the same settings in another prompt: ComfyUI runs a prompt it has cached no second time
        return workflow_api(family, small_models, model_patch=sage(kernel="int8_fp8", exact_blocks=" " * blanks),
                            output="PreviewImage")
    run_prompt(api(0))  # loads the kernels' modules into the copy of the pack ComfyUI runs
    keys, used = [], set()
    for module in carried_sites_modules():
        sites = module.SITES
        monkeypatch.setattr(module, "PLAIN", plain)

        def site(key, *args, _sites=sites, _site=sites.site, **kwargs):
            keys.append(key)
            used.add(_sites)
            return _site(key, *args, **kwargs)
        monkeypatch.setattr(sites, "site", site)
    first = run_prompt(api(1))
    stats = stats_of(first)
    calls = ATTENTION_CALLS_PER_RUN[family]
    carried = calls if plain else (calls // 2 if family == "wan" else 0)
    assert stats["sage"] == {"int8_fp8": calls} and stats["recomputed"] == 0
    assert len(keys) == carried and len(set(keys)) == carried // 4  # 4 steps: 1 priming call, 3 carried, per site
    assert all(len(sites) == 0 for sites in used)  # released with the run
    assert psnr(first.image(), unpatched[family]) >= MIN_PSNR_DB - 5
    assert torch.equal(run_prompt(api(2)).image(), first.image())
